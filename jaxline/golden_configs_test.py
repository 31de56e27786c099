"""The golden-config helper as a user's project calls it, on a tmp project."""

import os
import textwrap

import pytest

from jaxline import golden_configs

_CONFIG = '''
"""Presets: configs/model.py:small and configs/model.py:same."""
from jaxline import base_config


def get_config(preset=None):
  config = base_config.get_base_config()
  config.training_steps = {None: 100, "small": 10, "same": 100}[preset]
  config.experiment_kwargs.width = config.get_ref("training_steps") * 2
  return config
'''


@pytest.fixture
def project(tmp_path):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "model.py").write_text(textwrap.dedent(_CONFIG))
  return str(tmp_path)


def _check(project, **kwargs):
  return golden_configs.check("configs/*.py", "configs/golden", root=project,
                              **kwargs)


def test_update_then_check_passes(project):
  result = _check(project, update=True)
  names = sorted(os.path.basename(p) for p in result.written)
  # "same" resolves to the default: no file of its own.
  assert names == ["model_default.py", "model_small.py"]
  assert [str(c) for c in result.checked] == [
      "configs/model.py", "configs/model.py:small"]
  again = _check(project)
  assert again.written == [] and again.removed == []
  text = open(os.path.join(project, "configs", "golden",
                           "model_small.py")).read()
  assert text.startswith('r"""Golden config of configs/model.py:small')
  assert "config.training_steps = 10\n" in text
  assert ("config.experiment_kwargs.width = 20  # computed from "
          "config.training_steps") in text


def test_a_change_fails_with_the_diff_and_the_commands(project, monkeypatch):
  _check(project, update=True)
  path = os.path.join(project, "configs", "model.py")
  with open(path) as f:
    source = f.read()
  with open(path, "w") as f:
    f.write(source.replace('"small": 10', '"small": 12'))
  monkeypatch.setenv("PYTEST_CURRENT_TEST", "proj/configs_test.py::test_x "
                     "(call)")
  with pytest.raises(AssertionError) as info:
    _check(project)
  message = str(info.value)
  assert "model_small.py no longer matches configs/model.py:small" in message
  assert "-  config.training_steps = 10\n" in message
  assert "+  config.training_steps = 12\n" in message
  assert ("JAXLINE_UPDATE_GOLDEN=1 python -m pytest "
          "'proj/configs_test.py::test_x'") in message
  assert ("python -m jaxline.golden_configs --update "
          "--golden_dir=configs/golden 'configs/*.py'") in message
  assert "model_default.py" not in message  # Only what changed.
  # The environment variable rewrites, as the message says.
  monkeypatch.setenv(golden_configs.UPDATE_ENV, "1")
  assert len(_check(project).written) == 1
  monkeypatch.delenv(golden_configs.UPDATE_ENV)
  _check(project)


def test_missing_and_stale_files(project):
  with pytest.raises(AssertionError, match="model_default.py is missing"):
    _check(project)
  _check(project, update=True)
  golden = os.path.join(project, "configs", "golden")
  stale = os.path.join(golden, "old_default.py")
  with open(os.path.join(golden, "model_default.py")) as f:
    text = f.read()
  with open(stale, "w") as f:
    f.write(text)
  mine = os.path.join(golden, "notes.py")  # Not a golden file: left alone.
  with open(mine, "w") as f:
    f.write("x = 1\n")
  with pytest.raises(AssertionError, match="old_default.py is stale"):
    _check(project)
  assert _check(project, update=True).removed == [stale]
  assert os.path.exists(mine)


def test_golden_file_is_a_runnable_config(project):
  _check(project, update=True)
  config_id = golden_configs.ConfigId("configs/golden/model_small.py", None,
                                      "model_small")
  rebuilt = golden_configs.load(config_id, root=project)
  original = golden_configs.load(
      golden_configs.ConfigId("configs/model.py", "small", "model"),
      root=project)
  assert rebuilt.training_steps == original.training_steps == 10
  assert rebuilt.experiment_kwargs.width == 20
  assert rebuilt.terminate_on_nan is True  # Defaults written out.


def test_two_files_that_would_share_a_golden_name_are_an_error(tmp_path):
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "model.py").write_text(textwrap.dedent(_CONFIG))
  with pytest.raises(ValueError, match="would share the golden file"):
    golden_configs.discover("*/model.py", root=str(tmp_path))


def test_a_pattern_that_matches_nothing_is_an_error(project):
  with pytest.raises(ValueError, match="No config file matches"):
    golden_configs.discover("configs/nothing*.py", root=project)


def test_command_line(project, capsys, monkeypatch):
  monkeypatch.chdir(project)
  assert golden_configs.main(
      ["--golden_dir=configs/golden", "configs/*.py"]) == 1
  assert "is missing" in capsys.readouterr().out
  assert golden_configs.main(
      ["--update", "--golden_dir=configs/golden", "configs/*.py"]) == 0
  assert "2 configs checked, 2 golden files changed." in (
      capsys.readouterr().out)
  assert golden_configs.main(
      ["--golden_dir=configs/golden", "configs/*.py"]) == 0
