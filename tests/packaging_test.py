"""The built wheel: what `pip install jaxline` users get (contract §1, F21)."""

import os
import subprocess
import sys
import zipfile

from packaging import requirements
from packaging import version
import pytest

import conftest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
       str(out), conftest.REPO_ROOT], check=True, timeout=600)
  (name,) = [n for n in os.listdir(out) if n.endswith(".whl")]
  return zipfile.ZipFile(out / name)


def _metadata(wheel):
  (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
  return wheel.read(path).decode()


def test_wheel_holds_the_package_and_no_tests(wheel):
  modules = [n for n in wheel.namelist() if n.startswith("jaxline/")]
  assert "jaxline/train.py" in modules
  assert "jaxline/platform.py" in modules
  assert not [n for n in wheel.namelist() if n.endswith("_test.py")]


def test_metadata_requirements(wheel):
  metadata = _metadata(wheel).splitlines()
  fields = {}
  for line in metadata:
    key, _, value = line.partition(": ")
    fields.setdefault(key, []).append(value)
  assert version.Version(fields["Version"][0]) > version.Version("0.0.8")
  assert fields["Requires-Python"] == [">=3.11"]
  core = [requirements.Requirement(r) for r in fields["Requires-Dist"]
          if "extra ==" not in r]
  names = {r.name.lower().replace("_", "-") for r in core}
  assert {"absl-py", "chex", "jax", "ml-collections", "numpy"} <= names
  assert not any("tensorflow" in n and n != "tensorboard" for n in names)
  (ml_collections,) = [r for r in core
                       if r.name.lower().replace("_", "-") == "ml-collections"]
  assert not ml_collections.specifier.contains("0.1.0")
