"""The run's recorded config: JSON and Python, and what changed since."""

import glob
import json
import logging

import jax
from ml_collections import config_dict
import numpy as np
import pytest

from jaxline import run_config


def _config(root, **overrides):
  config = config_dict.ConfigDict()
  config.checkpoint_dir = str(root)
  config.training_steps = 10
  config.experiment_kwargs = config_dict.ConfigDict(
      {"config": {"lr": 0.1, "layers": (4, 4)}})
  for key, value in overrides.items():
    config[key] = value
  return config


def _record(config, mode="train", text="# python\n"):
  return run_config.record(config, mode=mode, python_text=text,
                           defaults={"terminate_on_nan": True})


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def test_first_run_writes_both_forms(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  assert _record(_config(tmp_path), text="def get_config(): ...\n") == str(
      tmp_path)
  saved = _read_json(tmp_path / run_config.CONFIG_JSON)
  assert saved == {"checkpoint_dir": str(tmp_path), "training_steps": 10,
                   "experiment_kwargs": {"config": {"lr": 0.1,
                                                    "layers": [4, 4]}},
                   "terminate_on_nan": True}
  assert (tmp_path / run_config.CONFIG_PY).read_text() == (
      "def get_config(): ...\n")
  assert not any(r.levelno >= logging.WARNING for r in caplog.records)
  assert not glob.glob(str(tmp_path / ".*tmp*"))  # No temporary left.


def test_resume_logs_each_changed_key_and_keeps_the_old_record(
    tmp_path, caplog):
  _record(_config(tmp_path), text="old\n")
  old = _read_json(tmp_path / run_config.CONFIG_JSON)
  _record(_config(tmp_path), text="same\n")  # Unchanged: nothing kept.
  assert not glob.glob(str(tmp_path / "config.*.json"))
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

  changed = _config(tmp_path, training_steps=20)
  changed.experiment_kwargs.config.lr = 0.2
  _record(changed, text="new\n")
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert (f"The config changed since the last run in {tmp_path}: 2 config "
          "key(s) differ") in warnings[0]
  assert "experiment_kwargs.config.lr: 0.1 -> 0.2" in warnings[0]
  assert "training_steps: 10 -> 20" in warnings[0]
  assert _read_json(tmp_path / run_config.CONFIG_JSON)["training_steps"] == 20
  kept_json = glob.glob(str(tmp_path / "config.*.json"))
  kept_py = glob.glob(str(tmp_path / "config.*.py"))
  assert len(kept_json) == 1 and len(kept_py) == 1
  assert _read_json(kept_json[0]) == old
  with open(kept_py[0]) as f:
    assert f.read() == "same\n"


def test_eval_job_compares_with_training_and_writes_beside_its_logs(
    tmp_path, caplog):
  _record(_config(tmp_path))
  training = _read_json(tmp_path / run_config.CONFIG_JSON)
  eval_config = _config(tmp_path)
  eval_config.experiment_kwargs.config.lr = 0.5
  assert _record(eval_config, mode="eval_test") == str(tmp_path / "eval_test")
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "eval_test job's config is not the training job's" in warnings[0]
  assert "experiment_kwargs.config.lr: 0.1 -> 0.5" in warnings[0]
  assert _read_json(tmp_path / run_config.CONFIG_JSON) == training
  assert _read_json(tmp_path / "eval_test" / run_config.CONFIG_JSON)[
      "experiment_kwargs"]["config"]["lr"] == 0.5


def test_no_checkpoint_dir_records_nothing(tmp_path):
  assert _record(_config("")) is None


def test_an_unreadable_record_is_replaced_with_a_warning(tmp_path, caplog):
  (tmp_path / run_config.CONFIG_JSON).write_text("{not json")
  _record(_config(tmp_path))
  assert any("Could not read the recorded config" in r.getMessage()
             for r in caplog.records)
  assert _read_json(tmp_path / run_config.CONFIG_JSON)["training_steps"] == 10


def test_a_record_that_cannot_be_written_does_not_stop_the_run(
    tmp_path, caplog):
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert _record(_config(blocker / "run")) is None  # A file is in the way.
  assert any("Could not record the config" in r.getMessage()
             for r in caplog.records)


def test_nan_and_types_compare_exactly():
  assert run_config.changed_keys({"a": float("nan")},
                                 {"a": float("nan")}) == []
  assert run_config.changed_keys({"a": 1}, {"a": 1.0}) == ["a: 1 -> 1.0"]
  assert run_config.changed_keys({"a": 1}, {"a": True}) == ["a: 1 -> True"]


@pytest.mark.parametrize("value,expected", [
    (np.int32(3), 3), ((1, (2,)), [1, [2]]), (None, None),
    (config_dict.placeholder(int), None)])
def test_json_values(value, expected):
  assert run_config.json_value(value) == expected

def _kwargs(hidden=16, **extra):
  config = config_dict.ConfigDict()
  config.model = config_dict.ConfigDict()
  config.model.hidden = hidden
  config.model.width = config_dict.FieldReference(hidden * 2)
  config.model.width_copy = config.model.get_ref("width")
  config.model.layers = (hidden, hidden, 10)
  config.optimizer = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]}
  config.seed = np.int32(3)
  config.activation = jax.nn.relu
  config.nothing = None
  for key, value in extra.items():
    config[key] = value
  return config


def test_flatten_config_gives_dotted_json_values():
  flat = run_config.flatten(_kwargs())
  assert flat["model.hidden"] == 16
  assert flat["model.width"] == 32
  assert flat["model.width_copy"] == 32  # The reference, resolved.
  assert flat["model.layers"] == [16, 16, 10]  # Tuples as lists.
  assert flat["optimizer.name"] == "adam"
  assert flat["optimizer.betas"] == [0.9, 0.999]
  assert flat["seed"] == 3 and type(flat["seed"]) is int
  # Functions and classes by their import path.
  assert flat["activation"] == (
      f"{jax.nn.relu.__module__}.{jax.nn.relu.__qualname__}")
  assert flat["nothing"] is None
  assert "model" not in flat and "optimizer" not in flat
  assert run_config.flatten(None) == {}
  assert run_config.flatten({"a": {"b": (1, (2,))}}) == {
      "a.b": [1, [2]]}


def test_objects_in_the_config_are_described_without_their_address():
  """adversarial_robustness puts attack objects and functions in its config.

  Their default repr holds an address that differs in every process, which
  made every resume report them as changed.
  """

  class Attack:
    pass

  def loss_fn():
    pass

  first = run_config.flatten({"attack": Attack(), "loss": loss_fn})
  second = run_config.flatten({"attack": Attack(), "loss": loss_fn})
  assert "0x" not in first["attack"] and "Attack object" in first["attack"]
  assert first["loss"].endswith("loss_fn")
  assert run_config.changed_keys(first, second) == []


def test_changed_keys_lists_each_difference():
  saved = run_config.flatten(_kwargs(hidden=16, dropout=0.1))
  current = run_config.flatten(_kwargs(hidden=32, label="x"))
  changed = run_config.changed_keys(saved, current)
  assert "model.hidden: 16 -> 32" in changed
  assert "model.width: 32 -> 64" in changed
  assert "model.layers: [16, 16, 10] -> [32, 32, 10]" in changed
  removed = [line for line in changed if line.startswith("dropout: ")]
  added = [line for line in changed if line.startswith("label: ")]
  assert len(removed) == 1 and "0.1 -> " in removed[0]
  assert "absent" in removed[0]
  assert len(added) == 1 and added[0].endswith("-> 'x'")
  assert "absent" in added[0]
  assert changed == sorted(changed)
  assert not any(line.startswith(("seed", "optimizer")) for line in changed)
  assert run_config.changed_keys(saved, saved) == []
