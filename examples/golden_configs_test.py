"""Every example config must match its golden file in examples/testdata.

A failure means a config changed what a run does. If that is intended,
regenerate the files from the repository root with

  python -m examples.golden_configs --update

and review the diff with the change.
"""

import subprocess
import sys

from jaxline import base_config
import pytest

import conftest
from examples import golden_configs

_CONFIG_IDS = golden_configs.discover()


def test_every_example_is_discovered():
  examples = {c.example for c in _CONFIG_IDS}
  assert {"imagenet", "mnist"} <= examples
  assert golden_configs.ConfigId("imagenet", "tiny") in _CONFIG_IDS


@pytest.mark.parametrize("config_id", _CONFIG_IDS, ids=str)
def test_config_matches_golden_file(config_id):
  golden = golden_configs.read_golden(config_id)
  current = golden_configs.render(config_id)
  if golden != current:
    pytest.fail(golden_configs.mismatch_message(config_id, golden, current),
                pytrace=False)


@pytest.mark.parametrize("config_id", _CONFIG_IDS, ids=str)
def test_config_is_valid_for_jaxline(config_id):
  base_config.validate_config(golden_configs.resolve(config_id))


def test_no_stale_golden_files():
  stale = golden_configs.stale_files(_CONFIG_IDS)
  assert not stale, (
      f"Golden files no config produces: {stale}. Remove them with "
      f"{golden_configs.UPDATE_COMMAND}")


def test_mismatch_message_names_the_regeneration_command():
  config_id = golden_configs.ConfigId("imagenet", "tiny")
  current = golden_configs.render(config_id)
  golden = current.replace("training_steps = 6", "training_steps = 7")
  message = golden_configs.mismatch_message(config_id, golden, current)
  assert "python -m examples.golden_configs --update" in message
  assert "-training_steps = 7" in message
  assert "+training_steps = 6" in message
  missing = golden_configs.mismatch_message(config_id, None, current)
  assert "is missing" in missing and golden_configs.UPDATE_COMMAND in missing


def test_rendering_is_exact_and_follows_references():
  config_id = golden_configs.ConfigId("imagenet", None)
  text = golden_configs.render(config_id)
  # Types survive: tuples stay tuples, floats floats, strings quoted.
  assert "experiment_kwargs.config.model.blocks_per_group = (3, 4, 6, 3)" in (
      text)
  assert "experiment_kwargs.config.optimizer.peak_learning_rate = 0.4" in text
  assert "experiment_kwargs.config.dataset.name = 'imagenet2012'" in text
  # 90 epochs of floor(1,281,167 / 1024) steps, through FieldReferences.
  assert "\ntraining_steps = 112590\n" in text
  lines = [l for l in text.splitlines() if not l.startswith("#")]
  assert lines == sorted(lines)


def test_configs_resolve_without_tensorflow():
  # In a fresh process: this one may have imported TensorFlow for others.
  script = (
      "import sys\n"
      "from examples import golden_configs\n"
      "for config_id in golden_configs.discover():\n"
      "  golden_configs.render(config_id)\n"
      "loaded = sorted(m for m in sys.modules\n"
      "                if m.split('.')[0] in ('tensorflow',\n"
      "                                       'tensorflow_datasets'))\n"
      "assert not loaded, loaded\n")
  result = subprocess.run(
      [sys.executable, "-c", script], cwd=conftest.REPO_ROOT,
      env=conftest.subprocess_env(1), capture_output=True, text=True,
      timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_check_mode_passes_on_the_checked_in_files():
  result = subprocess.run(
      [sys.executable, "-m", "examples.golden_configs"],
      cwd=conftest.REPO_ROOT, env=conftest.subprocess_env(1),
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"{len(_CONFIG_IDS)} configs checked, 0 problem(s)." in result.stdout


def test_every_preset_has_its_own_relative_run_directory():
  # A shared absolute default (/tmp/...) lets two users, or two presets,
  # resume each other's checkpoints by accident.
  directories = {}
  for config_id in _CONFIG_IDS:
    directory = golden_configs.resolve(config_id).checkpoint_dir
    assert directory and not directory.startswith("/"), (config_id, directory)
    assert "tmp" not in directory.split("/"), (config_id, directory)
    directories.setdefault(directory, []).append(str(config_id))
  shared = {d: ids for d, ids in directories.items() if len(ids) > 1}
  assert not shared, shared
