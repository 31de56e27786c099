"""Tests for `jaxline.platform` (contract §7, §9)."""

import os
import pdb
import re
import subprocess
import sys
import threading
import time

from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
import pytest

from conftest import subprocess_env
from jaxline import base_config
from jaxline import checkpointing
from jaxline import experiment
from jaxline import platform
from jaxline import utils
from jaxline import writers
from tensorboard.backend.event_processing import event_accumulator

FLAGS = flags.FLAGS


pytestmark = pytest.mark.usefixtures("fresh_jaxline_state")


def _n():
  return jax.local_device_count()


class _Log:

  def __init__(self):
    self.modes = []
    self.steps = []
    self.evals = []
    self.loop_configs = []
    self.loop_params = []


def _make_experiment(log, *, step_error=None, step_error_at=None,
                     eval_error=None, step_sleep=0.0):
  """A recording experiment; one class per test (the live state is typed)."""

  class Exp(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_params": "params"}
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_host_steps": "host_steps"}

    def __init__(self, mode, init_rng=None, config=None):
      super().__init__(mode, init_rng=init_rng)
      log.modes.append(mode)
      self._params = None
      self._host_steps = 0

    def train_loop(self, config, state, periodic_actions, writer=None):
      log.loop_configs.append(config)
      log.loop_params.append(self._params)
      super().train_loop(config, state, periodic_actions, writer)

    def step(self, *, global_step, rng, writer):
      index = int(np.asarray(global_step)[0])
      log.steps.append(index)
      if step_error is not None and index == step_error_at:
        raise step_error
      if step_sleep:
        time.sleep(step_sleep)
      if self._params is None:
        self._params = utils.bcast_local_devices(np.zeros([2], np.float32))
      self._params = self._params + 1.0
      self._host_steps += 1
      return {"loss": np.float32(index)}

    def evaluate(self, *, global_step, rng, writer):
      log.evals.append(int(np.asarray(global_step)[0]))
      if eval_error is not None:
        raise eval_error
      return {"eval_step": np.int32(np.asarray(global_step)[0])}

  return Exp


class _Factories:
  """Checkpointer and writer factories that record how they were called."""

  def __init__(self):
    self.calls = []
    self.writes = []

  def checkpointer(self, config, mode):
    self.calls.append(("checkpointer", mode, threading.current_thread()))
    return utils.InMemoryCheckpointer(config, mode)

  def writer(self, config, mode):
    self.calls.append(("writer", mode, threading.current_thread()))
    factories = self

    class Writer:

      def write_scalars(self, global_step, scalars):
        factories.writes.append((mode, global_step, dict(scalars)))

    return Writer()

  def modes(self):
    return [(kind, mode) for kind, mode, _ in self.calls]


def _config(**overrides):
  config = base_config.get_base_config()
  config.training_steps = 3
  config.interval_type = "steps"
  config.log_tensors_interval = 1
  config.save_checkpoint_interval = 100
  config.log_train_data_interval = 1
  config.eval_poll_interval_secs = 0.01
  for key, value in overrides.items():
    config[key] = value
  return config


def _main(exp_class, factories, **kwargs):
  return platform.main(exp_class, ["unused"],
                       checkpointer_factory=factories.checkpointer,
                       writer_factory=factories.writer, **kwargs)


def _call_with_watchdog(fn, timeout=120.0):
  """Runs fn in a daemon thread; a hang fails the test instead of the run."""
  result = {}

  def run():
    try:
      result["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(timeout)
  assert not thread.is_alive(), f"{fn} did not return within {timeout}s"
  return result


# --- Flags -------------------------------------------------------------------


@pytest.mark.parametrize("name,flag_type,default", [
    ("jaxline_mode", "string", "train"),
    ("jaxline_tpu_driver", "string", ""),
    ("jaxline_ensure_tpu", "bool", False),
    ("jaxline_post_mortem", "bool", False),
    ("jaxline_disable_pmap_jit", "bool", False),
])
def test_flags_registered_with_defaults(name, flag_type, default):
  flag = FLAGS[name]
  assert flag.flag_type() == flag_type
  assert flag.default == default


def test_config_flag_is_a_config_file_flag_without_default():
  assert "config" in FLAGS
  assert FLAGS["config"].default is None


def test_public_names():
  assert platform.TensorBoardLogger is writers.TensorBoardLogger
  assert callable(platform.create_checkpointer)
  assert callable(platform.create_writer)
  assert platform.main.__name__ == "main"


# --- main, mode by mode ------------------------------------------------------


def test_main_train_mode():
  log = _Log()
  factories = _Factories()
  config = _config()
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    assert _main(_make_experiment(log), factories) is None
  assert factories.modes() == [("checkpointer", "train"), ("writer", "train")]
  assert log.modes == ["train"]
  assert log.steps == [0, 1, 2]
  assert [w[1] for w in factories.writes] == [1, 2, 3]
  # D4: the very config object reaches the loop.
  assert log.loop_configs[0] is config
  history = utils.GLOBAL_CHECKPOINT_DICT["latest"].history
  assert history[-1].pickle_nest["global_step"] == 3


@pytest.mark.parametrize("eval_mode", ["eval", "eval_xyz"])
def test_main_twice_in_one_process_keeps_in_memory_state(eval_mode):
  """D8: train, then evaluate and train again, in one process."""
  log = _Log()
  factories = _Factories()
  exp_class = _make_experiment(log)
  config = _config(training_steps=2)
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    _main(exp_class, factories)
  with flagsaver.flagsaver(config=config, jaxline_mode=eval_mode):
    assert _main(exp_class, factories) is None
  assert log.modes == ["train", eval_mode]
  assert log.evals == [2]  # The checkpoint from the first call.
  assert factories.modes()[2:] == [("checkpointer", eval_mode),
                                   ("writer", eval_mode)]
  assert (eval_mode, 2, {"eval_step": 2}) in factories.writes

  # User code mutates FLAGS.config directly (D4); training resumes.
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    FLAGS.config.training_steps = 4
    _main(exp_class, factories)
  assert log.steps == [0, 1, 2, 3]
  assert config.training_steps == 4


def test_main_eval_mode_with_default_writer(tmp_path):
  log = _Log()
  factories = _Factories()
  exp_class = _make_experiment(log)
  config = _config(training_steps=2)
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    _main(exp_class, factories)
  config.checkpoint_dir = str(tmp_path)
  with flagsaver.flagsaver(config=config, jaxline_mode="eval_metric"):
    platform.main(exp_class, [], checkpointer_factory=factories.checkpointer)
  assert log.modes == ["train", "eval_metric"]
  # The default writer writes under <checkpoint_dir>/<mode>, and has flushed
  # by the time main returns.
  assert os.listdir(tmp_path) == ["eval_metric"]
  accumulator = event_accumulator.EventAccumulator(
      str(tmp_path / "eval_metric"), size_guidance={"scalars": 0})
  accumulator.Reload()
  events = accumulator.Scalars("eval_step")
  assert [(e.step, e.value) for e in events] == [(2, 2.0)]


def test_main_train_eval_multithreaded():
  log = _Log()
  factories = _Factories()
  config = _config(training_steps=4, save_checkpoint_interval=1)
  with flagsaver.flagsaver(config=config,
                           jaxline_mode="train_eval_multithreaded"):
    result = _call_with_watchdog(
        lambda: _main(_make_experiment(log), factories))
  assert "error" not in result, result.get("error")
  assert result["value"] is None
  # The eval experiment's mode is the flag value, not "eval" (§3.5).
  assert sorted(log.modes) == ["train", "train_eval_multithreaded"]
  assert log.steps == [0, 1, 2, 3]
  assert log.evals and log.evals[-1] == 4
  by_mode = {}
  for kind, mode, thread in factories.calls:
    by_mode.setdefault(mode, set()).add((kind, thread))
  assert set(by_mode) == {"train", "eval"}
  train_threads = {t for _, t in by_mode["train"]}
  eval_threads = {t for _, t in by_mode["eval"]}
  assert {k for k, _ in by_mode["train"]} == {"checkpointer", "writer"}
  assert {k for k, _ in by_mode["eval"]} == {"checkpointer", "writer"}
  # Training ran in another thread than evaluation.
  assert len(train_threads) == 1 and len(eval_threads) == 1
  assert train_threads != eval_threads


def test_multithreaded_train_failure_is_reraised():
  """F5: training fails, evaluation stops polling, main re-raises."""
  log = _Log()
  error = RuntimeError("training broke")
  factories = _Factories()
  config = _config(training_steps=10)
  with flagsaver.flagsaver(config=config,
                           jaxline_mode="train_eval_multithreaded"):
    result = _call_with_watchdog(lambda: _main(
        _make_experiment(log, step_error=error, step_error_at=1), factories))
  assert result.get("error") is error
  assert log.steps == [0, 1]
  assert not log.evals  # No checkpoint ever appeared.


def test_multithreaded_eval_failure_stops_training():
  """F5: evaluation fails, training stops at a step boundary, main re-raises."""
  log = _Log()
  error = ValueError("evaluation broke")
  factories = _Factories()
  config = _config(training_steps=100_000, eval_initial_weights=True,
                   log_tensors_interval=1000, log_train_data_interval=1000)
  exp_class = _make_experiment(log, eval_error=error, step_sleep=0.002)
  with flagsaver.flagsaver(config=config,
                           jaxline_mode="train_eval_multithreaded"):
    result = _call_with_watchdog(lambda: _main(exp_class, factories))
  assert result.get("error") is error
  assert log.evals == [0]
  steps_when_main_returned = len(log.steps)
  assert steps_when_main_returned < 100_000
  time.sleep(0.3)
  assert len(log.steps) == steps_when_main_returned  # Training has stopped.


# --- main: errors before anything runs -----------------------------------------


def test_unknown_mode_lists_valid_modes():
  factories = _Factories()
  log = _Log()
  with flagsaver.flagsaver(config=_config(), jaxline_mode="bogus"):
    with pytest.raises(ValueError) as raised:
      _main(_make_experiment(log), factories)
  message = str(raised.value)
  assert message.startswith("Mode bogus not recognized")
  for mode in ("train", "eval", "train_eval_multithreaded"):
    assert re.search(rf"\b{mode}\b", message.split("recognized", 1)[1]), mode
  assert not log.modes


def test_missing_config_is_a_clear_error():
  factories = _Factories()
  with flagsaver.flagsaver(config=None, jaxline_mode="train"):
    with pytest.raises(Exception) as raised:
      _main(_make_experiment(_Log()), factories)
  assert "--config" in str(raised.value)
  assert not isinstance(raised.value, (TypeError, AttributeError))
  assert not factories.calls


def test_tpu_driver_flag_is_a_clear_error():
  factories = _Factories()
  log = _Log()
  with flagsaver.flagsaver(config=_config(), jaxline_tpu_driver="local"):
    with pytest.raises(Exception) as raised:
      _main(_make_experiment(log), factories)
  assert "tpu_driver" in str(raised.value)
  assert not factories.calls
  assert not log.modes
  # The backend is still usable.
  assert jax.device_count() >= 1


def test_ensure_tpu_fails_without_a_tpu():
  if jax.default_backend() == "tpu":
    pytest.skip("A TPU is present.")
  factories = _Factories()
  with flagsaver.flagsaver(config=_config(), jaxline_ensure_tpu=True):
    with pytest.raises(AssertionError, match="TPU"):
      _main(_make_experiment(_Log()), factories)
  assert not factories.calls


def test_misspelled_key_stops_before_training():
  factories = _Factories()
  log = _Log()
  config = _config()
  config.traning_steps = 5
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    with pytest.raises(ValueError) as raised:
      _main(_make_experiment(log), factories)
  assert "training_steps" in str(raised.value)
  assert "traning_steps" in str(raised.value)
  assert not factories.calls
  assert not log.modes


def test_missing_base_key_fails_validation():
  factories = _Factories()
  config = _config()
  del config["random_seed"]
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    with pytest.raises(ValueError, match="random_seed"):
      _main(_make_experiment(_Log()), factories)
  assert not factories.calls


def test_post_mortem_flag_opens_debugger_then_reraises(monkeypatch):
  seen = []
  monkeypatch.setattr(pdb, "post_mortem", seen.append)
  with flagsaver.flagsaver(config=_config(), jaxline_mode="bogus",
                           jaxline_post_mortem=True):
    with pytest.raises(ValueError, match="bogus"):
      _main(_make_experiment(_Log()), _Factories())
  assert len(seen) == 1 and seen[0] is not None  # The traceback.


# --- Factories -------------------------------------------------------------


def test_default_writer_factory_is_looked_up_at_call_time(monkeypatch):
  made = []

  def fake_create_writer(config, mode):
    made.append((config, mode))
    return None

  monkeypatch.setattr(platform, "create_writer", fake_create_writer)
  factories = _Factories()
  config = _config(training_steps=1)
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    platform.main(_make_experiment(_Log()), [],
                  checkpointer_factory=factories.checkpointer)
  assert made == [(config, "train")]
  assert made[0][0] is config


def test_create_checkpointer_is_in_memory_without_checkpoint_dir():
  config = _config()
  checkpointer = platform.create_checkpointer(config, "train")
  assert isinstance(checkpointer, utils.InMemoryCheckpointer)
  config.checkpoint_dir = ""
  assert isinstance(platform.create_checkpointer(config, "eval"),
                    utils.InMemoryCheckpointer)


def test_checkpoint_backend_chooses_disk_or_memory(tmp_path):
  config = _config()
  config.checkpoint_dir = str(tmp_path)
  disk = platform.create_checkpointer(config, "eval")
  assert isinstance(disk, checkpointing.DiskCheckpointer)
  disk.close()
  config.checkpoint_backend = "memory"
  assert isinstance(platform.create_checkpointer(config, "train"),
                    utils.InMemoryCheckpointer)
  config.checkpoint_backend = "Memory"
  with pytest.raises(ValueError, match="checkpoint_backend='Memory'.*'disk'"):
    base_config.validate_config(config)


def test_a_snapshot_seeded_before_main_keeps_checkpoints_in_memory(
    tmp_path, caplog):
  """ogb_lsc seeds GLOBAL_CHECKPOINT_DICT and still sets checkpoint_dir."""
  import logging as pylogging  # pylint: disable=g-import-not-at-top
  caplog.set_level(pylogging.WARNING, logger="absl")
  config = _config()
  config.checkpoint_dir = str(tmp_path)
  utils.GLOBAL_CHECKPOINT_DICT["latest"] = utils.CheckpointNT(
      threading.local(), [utils.SnapshotNT(0, {"global_step": 5})])
  checkpointer = platform.create_checkpointer(config, "train")
  assert isinstance(checkpointer, utils.InMemoryCheckpointer)
  assert any("holds a snapshot set before platform.main" in r.getMessage()
             for r in caplog.records)
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("has_key", [False, True])
def test_create_writer_without_checkpoint_dir_writes_nothing(
    has_key, tmp_path, monkeypatch, caplog):
  import logging as pylogging  # pylint: disable=g-import-not-at-top
  caplog.set_level(pylogging.WARNING, logger="absl")
  monkeypatch.chdir(tmp_path)
  config = _config()
  if has_key:
    config.checkpoint_dir = ""
  writer = platform.create_writer(config, "train")
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_images(1, {"image": np.zeros([2, 4, 4, 3], np.uint8)})
  for name in ("flush", "close"):
    if hasattr(writer, name):
      getattr(writer, name)()
  assert not list(tmp_path.iterdir())
  warnings = [r for r in caplog.records if r.levelno == pylogging.WARNING]
  assert len(warnings) == 1
  assert "checkpoint_dir" in warnings[0].getMessage()


def test_create_writer_with_checkpoint_dir_is_tensorboard(tmp_path):
  config = _config(training_steps=1)
  config.checkpoint_dir = str(tmp_path)
  writer = platform.create_writer(config, "train")
  try:
    assert isinstance(writer, platform.TensorBoardLogger)
    writer.write_scalars(3, {"x": 1.5})
  finally:
    writer.close()
  assert os.listdir(tmp_path / "train")


def test_print_config_prints_every_key_and_stops(capsys):
  factories = _Factories()
  log = _Log()
  config = _config(training_steps=1234)
  del config["eval_poll_interval_secs"]  # Optional keys print with defaults.
  with flagsaver.flagsaver(config=config, jaxline_mode="train",
                           jaxline_print_config=True):
    _main(_make_experiment(log), factories)
  out = capsys.readouterr().out
  keys = list(base_config.get_base_config().keys()) + [
      "checkpoint_dir", "eval_poll_interval_secs"]
  for key in keys:
    assert re.search(rf"^  config\.{key} = ", out, re.MULTILINE), key
  assert re.search(r"^  config\.training_steps = 1234$", out, re.MULTILINE)
  assert re.search(r"^  config\.eval_poll_interval_secs = 10\.0  # jaxline "
                   r"default$", out, re.MULTILINE)
  assert "def get_config():" in out
  assert not factories.calls
  assert not log.modes


# --- 0.0.8 state layout (D1) -------------------------------------------------


def test_old_layout_global_checkpoint_dict_entry_restores():
  log = _Log()
  exp_class = _make_experiment(log)
  old = exp_class("train", init_rng=jax.random.PRNGKey(0))
  old._params = utils.bcast_local_devices(np.full([2], 10.0, np.float32))
  old._host_steps = 5
  utils.GLOBAL_CHECKPOINT_DICT["latest"] = utils.CheckpointNT(
      threading.local(),
      [utils.SnapshotNT(0, {"global_step": np.int64(5),
                            "experiment_module": old})])
  factories = _Factories()
  with flagsaver.flagsaver(config=_config(training_steps=7),
                           jaxline_mode="train"):
    _main(exp_class, factories)
  assert log.steps == [5, 6]
  # Per-device values are copied by attribute name, not re-broadcast.
  assert log.loop_params[0] is old._params
  history = utils.GLOBAL_CHECKPOINT_DICT["latest"].history
  final = history[-1].pickle_nest
  assert final["global_step"] == 7
  assert type(final["global_step"]) is int  # pylint: disable=unidiomatic-typecheck
  np.testing.assert_array_equal(final["experiment_module"]["params"],
                                [12.0, 12.0])
  assert final["experiment_module"]["host_steps"] == 7


# --- Import-time behaviour (§1) ------------------------------------------------

_IMPORT_CHECK = r"""
import os, sys, threading
before = set(os.listdir("."))
import jaxline
assert "jax" not in sys.modules, "import jaxline imported jax"
assert not [m for m in sys.modules if m.startswith("jaxline.")], sorted(
    m for m in sys.modules if m.startswith("jaxline."))
import jaxline.platform
tf = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
assert not tf, tf[:5]
assert threading.active_count() == 1, threading.enumerate()
from jax._src import xla_bridge
assert not xla_bridge.backends_are_initialized(), "a backend was initialised"
assert set(os.listdir(".")) == before, "import wrote files"
print("IMPORTS-OK")
"""


def test_imports_have_no_side_effects(tmp_path):
  result = subprocess.run(
      [sys.executable, "-c", _IMPORT_CHECK], cwd=tmp_path,
      env=subprocess_env(1), capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "IMPORTS-OK" in result.stdout


# --- the run's recorded config -----------------------------------------------


def test_train_records_its_config_with_custom_factories(tmp_path):
  factories = _Factories()
  config = _config(checkpoint_dir=str(tmp_path))
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    _main(_make_experiment(_Log()), factories)
  assert (tmp_path / "config.json").is_file()
  text = (tmp_path / "config.py").read_text()
  assert "  config.training_steps = 3\n" in text
  assert "  config.terminate_on_nan = True  # jaxline default\n" in text


def test_a_config_that_cannot_be_recorded_does_not_stop_training(
    tmp_path, monkeypatch, caplog):

  def fail(*args, **kwargs):
    raise RuntimeError("cannot record")

  monkeypatch.setattr(platform.run_config, "record", fail)
  factories = _Factories()
  log = _Log()
  config = _config(checkpoint_dir=str(tmp_path))
  with flagsaver.flagsaver(config=config, jaxline_mode="train"):
    _main(_make_experiment(log), factories)
  assert ("train", 3) in [(w[0], w[1]) for w in factories.writes]
  assert any("Could not record the config" in r.getMessage()
             for r in caplog.records)
