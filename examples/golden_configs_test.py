"""Every example config must match its golden file in examples/testdata.

A failure means a config changed what a run does. If that is intended,
rewrite the files (from the repository root) and review the diff:

  JAXLINE_UPDATE_GOLDEN=1 python -m pytest examples/golden_configs_test.py
"""

import subprocess
import sys

from jaxline import base_config
from jaxline import golden_configs
import pytest

import conftest

_PATTERN = "examples/*/config.py"
_GOLDEN_DIR = "examples/testdata"
_CONFIG_IDS = golden_configs.discover(_PATTERN, root=conftest.REPO_ROOT)


def test_example_configs_match_their_golden_files():
  # The one call a user's project makes, too.
  golden_configs.check(_PATTERN, _GOLDEN_DIR, root=conftest.REPO_ROOT)


def test_every_example_and_preset_is_discovered():
  names = {str(c) for c in _CONFIG_IDS}
  assert {"examples/mnist/config.py", "examples/mnist/config.py:mnist",
          "examples/imagenet/config.py", "examples/imagenet/config.py:tiny",
          "examples/charlm/config.py:tiny"} <= names
  # charlm's "default" preset is get_config() itself: no second file.
  assert "examples/charlm/config.py:default" not in names


@pytest.mark.parametrize("config_id", _CONFIG_IDS, ids=str)
def test_config_is_valid_and_names_its_experiment(config_id):
  config = golden_configs.load(config_id, root=conftest.REPO_ROOT)
  base_config.validate_config(config)
  example = config_id.path.split("/")[1]
  assert config.experiment_class == f"examples.{example}.experiment:Experiment"


def test_configs_resolve_without_tensorflow():
  # In a fresh process: this one may have imported TensorFlow for others.
  script = (
      "import sys\n"
      "from jaxline import golden_configs\n"
      f"golden_configs.check({_PATTERN!r}, {_GOLDEN_DIR!r})\n"
      "loaded = sorted(m for m in sys.modules\n"
      "                if m.split('.')[0] in ('tensorflow',\n"
      "                                       'tensorflow_datasets'))\n"
      "assert not loaded, loaded\n")
  result = subprocess.run(
      [sys.executable, "-c", script], cwd=conftest.REPO_ROOT,
      env=conftest.subprocess_env(1), capture_output=True, text=True,
      timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_every_preset_has_its_own_relative_run_directory():
  # A shared absolute default (/tmp/...) lets two users, or two presets,
  # resume each other's checkpoints by accident.
  directories = {}
  for config_id in _CONFIG_IDS:
    config = golden_configs.load(config_id, root=conftest.REPO_ROOT)
    directory = config.checkpoint_dir
    assert directory and not directory.startswith("/"), (config_id, directory)
    assert "tmp" not in directory.split("/"), (config_id, directory)
    directories.setdefault(directory, []).append(str(config_id))
  shared = {d: ids for d, ids in directories.items() if len(ids) > 1}
  assert not shared, shared
