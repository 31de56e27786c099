"""The built distributions: what `pip install jaxline` users get.

The wheel and the sdist are built from this checkout with `python -m build`
(the wheel from the sdist, so the sdist is known to be complete), the wheel
is installed in a fresh virtual environment, and the README's Quickstart
runs from it in an empty directory, importing nothing from the checkout.
"""

import email
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

from packaging import requirements
from packaging import version
import pytest

import conftest

_README = os.path.join(conftest.REPO_ROOT, "README.md")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
  """{"wheel": path, "sdist": path}, built without network access."""
  out = tmp_path_factory.mktemp("dist")
  # --no-isolation: the build requirements come from the test environment
  # (the `test` extra lists them), so the build needs no download.
  subprocess.run(
      [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
       conftest.REPO_ROOT], check=True, timeout=600, capture_output=True)
  names = os.listdir(out)
  (wheel,) = [n for n in names if n.endswith(".whl")]
  (sdist,) = [n for n in names if n.endswith(".tar.gz")]
  return {"wheel": out / wheel, "sdist": out / sdist}


def _metadata(wheel_path) -> email.message.Message:
  with zipfile.ZipFile(wheel_path) as wheel:
    (path,) = [n for n in wheel.namelist()
               if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(path))


def test_wheel_holds_the_package_license_and_types_but_no_tests(dists):
  with zipfile.ZipFile(dists["wheel"]) as wheel:
    names = wheel.namelist()
    modules = [n for n in names if n.startswith("jaxline/")]
    assert "jaxline/train.py" in modules
    assert "jaxline/platform.py" in modules
    assert "jaxline/__main__.py" in modules  # python -m jaxline
    assert "jaxline/py.typed" in modules
    assert not [n for n in names if n.endswith("_test.py")]
    (license_path,) = [n for n in names if n.endswith("/licenses/LICENSE")]
    assert "Apache License" in wheel.read(license_path).decode()


def test_sdist_holds_the_license_and_the_build_files(dists):
  with tarfile.open(dists["sdist"]) as sdist:
    names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
  assert {"LICENSE", "README.md", "pyproject.toml", "setup.py",
          "jaxline/py.typed", "jaxline/train.py"} <= names


def test_metadata(dists):
  metadata = _metadata(dists["wheel"])
  assert version.Version(metadata["Version"]) > version.Version("0.0.8")
  assert metadata["Requires-Python"] == ">=3.11"
  assert metadata["License-Expression"] == "Apache-2.0"
  assert metadata.get_all("License-File") == ["LICENSE"]
  classifiers = metadata.get_all("Classifier")
  assert "Typing :: Typed" in classifiers
  assert "Programming Language :: Python :: 3.11" in classifiers
  for url in metadata.get_all("Project-URL"):
    assert re.fullmatch(r"[^,]+, https://\S+", url), url
  core = [requirements.Requirement(r) for r in metadata.get_all("Requires-Dist")
          if "extra ==" not in r]
  names = {r.name.lower().replace("_", "-") for r in core}
  assert {"absl-py", "chex", "jax", "ml-collections", "numpy",
          "orbax-checkpoint", "tensorboardx"} <= names
  assert not any("tensorflow" in n or n == "tensorboard" for n in names)
  for requirement in core:
    # Every dependency has a floor that CI installs (.ci/lowest).
    assert any(s.operator in (">=", "==") for s in requirement.specifier), (
        requirement)


def test_build_requirement_matches_the_metadata():
  """PEP 639's `license = "<expression>"` needs setuptools 77."""
  with open(os.path.join(conftest.REPO_ROOT, "pyproject.toml"), "rb") as f:
    import tomllib  # pylint: disable=g-import-not-at-top
    pyproject = tomllib.load(f)
  (setuptools_req,) = [requirements.Requirement(r) for r in
                       pyproject["build-system"]["requires"]]
  assert setuptools_req.name == "setuptools"
  assert not setuptools_req.specifier.contains("76.1.0")
  assert setuptools_req.specifier.contains("77.0.1")  # 77.0.0: not released.
  assert isinstance(pyproject["project"]["license"], str)


def _quickstart_source() -> str:
  with open(_README) as f:
    readme = f.read()
  section = readme[readme.index("## Quickstart"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _runner_line() -> str:
  """The line the README adds to get_config() for `python -m jaxline`."""
  with open(_README) as f:
    readme = f.read()
  section = readme[readme.index("### The second way"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_from_the_installed_wheel(dists, tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                 timeout=300)
  python = str(venv / "bin" / "python")
  # The dependencies come from this test environment, through a .pth file:
  # the wheel's own files and metadata are what is being tested, and
  # `pip check` below proves this environment satisfies its requirements.
  purelib = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
      check=True, capture_output=True, text=True, timeout=60).stdout.strip()
  with open(os.path.join(purelib, "test_env.pth"), "w") as f:
    f.write(sysconfig.get_path("purelib") + "\n")
  subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index",
                  "-q", str(dists["wheel"])], check=True, timeout=300)
  check = subprocess.run([python, "-m", "pip", "check"], capture_output=True,
                         text=True, timeout=120)
  problems = [line for line in check.stdout.splitlines()
              if line.startswith("jaxline ")]
  assert not problems, check.stdout

  work = tmp_path / "user"
  work.mkdir()
  # As the README says: the Quickstart, with the line for the runner.
  source = _quickstart_source()
  anchor = "  config = base_config.get_base_config()\n"
  assert anchor in source
  (work / "experiment.py").write_text(
      source.replace(anchor, anchor + _runner_line(), 1))
  env = conftest.subprocess_env(1)
  env.pop("PYTHONPATH")  # Nothing from the checkout.
  where = subprocess.run(
      [python, "-c", "import jaxline, os; print(os.path.dirname("
       "jaxline.__file__))"], cwd=work, env=env, check=True,
      capture_output=True, text=True, timeout=120).stdout.strip()
  assert where == os.path.join(purelib, "jaxline")

  train = conftest.run_python(
      [python, "experiment.py", "--config=experiment.py"], cwd=work, env=env,
      timeout=300)
  assert train.returncode == 0, train.stderr[-4000:]
  assert "global_step: 200," in train.stderr
  assert (work / "runs" / "quickstart" / "checkpoints" / "latest" /
          "200").is_dir()
  assert (work / "runs" / "quickstart" / "config.json").is_file()
  # Evaluation through the generic runner, from the wheel's __main__.
  evaluation = conftest.run_python(
      [python, "-m", "jaxline", "--config=experiment.py",
       "--jaxline_mode=eval"], cwd=work, env=env, timeout=300)
  assert evaluation.returncode == 0, evaluation.stderr[-4000:]
  max_error = re.findall(r"Evaluated step 200: \{'max_error': ([\d.e-]+)\}",
                         evaluation.stderr)
  assert max_error and float(max_error[0]) < 0.05, evaluation.stderr[-3000:]
