"""Tests for `jaxline.train.train` and `jaxline.train.evaluate` (contract §3).

Checkpointers used: the real `utils.InMemoryCheckpointer`, and a duck-typed
test checkpointer that hands out one shared state object for every series and
plays back a scripted "latest" history (§3.4 says the harness must work with
such checkpointers).
"""

import copy
import functools
import logging as pylogging
import math
import re
import signal
import threading
import time

from absl.testing import flagsaver
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import pytest

from jaxline import base_config
from jaxline import experiment
from jaxline import train
from jaxline import utils
from jaxline import writers

# Contract §4 reference vectors: seed 42, JAX 0.10.2 defaults, process 0.
_SEED_KEY_42 = [0, 42]
_INIT_KEY_42 = [64467757, 2916123636]
_STEP_KEYS = {
    0: [[2852371275, 1535037118], [1415740534, 3212940511],
        [964605173, 3278640507]],
    1: [[2232176465, 33846082], [3288317168, 3869482587],
        [3557650011, 3028360806]],
}
_EVAL_KEYS_UNIQUE = {0: [1012194634, 3152801799], 1: [1705926158, 899080142]}

_WAIT_RE = re.compile(r"Checkpoint (\S+) invalid or already evaluated, "
                      r"waiting (\S+)s\.")


pytestmark = pytest.mark.usefixtures("fresh_jaxline_state")


@pytest.fixture(autouse=True)
def _deadline():
  """Fails a test whose poll loop never ends, instead of hanging the run."""

  def expire(signum, frame):
    del signum, frame
    raise TimeoutError("Test still running after 120 s: a loop that should "
                       "have ended did not.")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(120)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def absl_info(caplog):
  caplog.set_level(pylogging.INFO, logger="absl")
  return caplog


def _n():
  return jax.local_device_count()


def _messages(caplog):
  return [r.getMessage() for r in caplog.records]


# --- Test doubles ------------------------------------------------------------


class _Log:
  """What the experiments and doubles saw, shared across threads."""

  def __init__(self):
    self.inits = []
    self.steps = []
    self.rngs = []
    self.evals = []
    self.events = []
    self.instances = []


def _make_experiment(log, *, metrics=None, step_error=None, step_error_at=None,
                     eval_error=None):
  """An experiment class that records into `Exp.log`, options in `Exp.opts`.

  Both are read through the class at call time, so one class can serve
  several runs in a thread: the live in-memory state is a type-safe
  ConfigDict, so its `experiment_module` keeps one class per thread.
  Params are a per-device [2] float vector, created lazily at the first step
  and incremented once per step, so after k steps every entry is k.
  """

  class Exp(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_params": "params"}
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_host_steps": "host_steps"}

    def __init__(self, mode, init_rng=None, **kwargs):
      log = type(self).log
      super().__init__(mode, init_rng=init_rng)
      self.mode = mode
      self._params = None
      self._host_steps = 0
      log.inits.append(dict(
          mode=mode, kwargs=kwargs,
          init_rng=None if init_rng is None else np.asarray(init_rng)))
      log.instances.append(self)

    def step(self, *, global_step, rng, writer):
      log, step_error, step_error_at = (
          self.log, self.opts["step_error"], self.opts["step_error_at"])
      index = int(np.asarray(global_step)[0])
      log.steps.append(index)
      log.rngs.append(np.asarray(rng))
      if step_error is not None and index == step_error_at:
        raise step_error
      if self._params is None:
        self._params = utils.bcast_local_devices(np.zeros([2], np.float32))
      self._params = self._params + 1.0
      self._host_steps += 1
      return {"loss": np.float32(index)}

    def evaluate(self, *, global_step, rng, writer):
      log, metrics, eval_error = (
          self.log, self.opts["metrics"], self.opts["eval_error"])
      step = np.asarray(global_step)
      params = None if self._params is None else np.asarray(self._params)
      log.evals.append(dict(global_step=step, rng=rng, params=params,
                            host_steps=self._host_steps))
      if eval_error is not None:
        raise eval_error
      if metrics is None:
        return {"eval_step": np.int32(step[0])}
      return {"metric": metrics[len(log.evals) - 1], "other": 0.0}

  Exp.log = log
  Exp.opts = dict(metrics=metrics, step_error=step_error,
                  step_error_at=step_error_at, eval_error=eval_error)
  return Exp


class _RecordingWriter:
  """A writer that records writes and flushes, optionally slowly."""

  def __init__(self, events, delay=0.0):
    self._events = events
    self._delay = delay

  def write_scalars(self, global_step, scalars):
    if self._delay:
      time.sleep(self._delay)
    self._events.append(("write", global_step, dict(scalars)))

  def flush(self):
    self._events.append(("flush",))


class _SharedStateCheckpointer:
  """Duck-typed: one live state object for every series.

  "latest" follows a script: each `restore_path("latest")` call returns the
  next entry (the last one repeats); `checkpoints[path]` is the global step
  stored under that path.
  """

  def __init__(self, events, script=(None,), checkpoints=None):
    self.state = config_dict.ConfigDict()
    self.events = events
    self.saves = []
    self.restores = []
    self._script = list(script)
    self._checkpoints = dict(checkpoints or {})
    self._current = None
    self._best = []

  def get_experiment_state(self, ckpt_series):
    self.events.append(("get", ckpt_series))
    return self.state

  def save(self, ckpt_series):
    state = self.state
    record = dict(series=ckpt_series, global_step=state.global_step,
                  snapshot=copy.deepcopy(jax.device_get(
                      state.experiment_module.snapshot_state())))
    if ckpt_series == "best":
      record["best_eval_metric_value"] = state.best_eval_metric_value
      record["note"] = state.get("note")
      self._best.append(record)
    self.saves.append(record)
    self.events.append(("save", ckpt_series, state.global_step))

  def restore(self, ckpt_series):
    self.restores.append(ckpt_series)
    self.events.append(("restore", ckpt_series))
    if ckpt_series == "best":
      record = self._best[-1]
      self.state.best_eval_metric_value = record["best_eval_metric_value"]
      self.state.global_step = record["global_step"]
      self.state.experiment_module.restore_from_snapshot(record["snapshot"])
      return
    step = self._checkpoints[self._current]
    self.state.global_step = step
    self.state.experiment_module.restore_from_snapshot(
        {"params": np.full([2], step, np.float32), "host_steps": step})

  def restore_path(self, ckpt_series):
    assert ckpt_series == "latest"
    self._current = self._script.pop(0) if len(self._script) > 1 else (
        self._script[0])
    return self._current

  def can_be_restored(self, ckpt_series):
    if ckpt_series == "best":
      return bool(self._best)
    return self._current is not None

  def wait_for_checkpointing_to_finish(self):
    self.events.append(("wait",))


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


def _history(series):
  return utils.GLOBAL_CHECKPOINT_DICT[series].history


def _memory(config, mode="train"):
  return utils.InMemoryCheckpointer(config, mode)


def _run_train(exp_class, config, checkpointer=None, writer=None, **kwargs):
  checkpointer = checkpointer or _memory(config)
  train.train(exp_class, config, checkpointer, writer, **kwargs)
  return checkpointer


def _run_eval(exp_class, config, checkpointer=None, writer=None,
              jaxline_mode="eval"):
  checkpointer = checkpointer or _memory(config, jaxline_mode)
  train.evaluate(exp_class, config, checkpointer, writer,
                 jaxline_mode=jaxline_mode)
  return checkpointer


# --- Building the experiment (§3.1) -----------------------------------------


def test_train_constructor_gets_mode_init_key_and_same_config_objects():
  log = _Log()
  config = _config(training_steps=1)
  inner = config_dict.ConfigDict({"lr": 0.1, "nested": {"a": 1}})
  config.experiment_kwargs.config = inner
  config.experiment_kwargs.other = 3
  config.lock()
  _run_train(_make_experiment(log), config)
  (init,) = log.inits
  assert init["mode"] == "train"
  np.testing.assert_array_equal(init["init_rng"], _INIT_KEY_42)
  assert set(init["kwargs"]) == {"config", "other"}
  assert init["kwargs"]["config"] is inner  # Not converted, not copied.
  assert init["kwargs"]["config"].is_locked
  assert init["kwargs"]["other"] == 3


def test_legacy_constructor_without_init_rng_warns(caplog):
  caplog.set_level(pylogging.WARNING, logger="absl")
  received = []
  base = _make_experiment(_Log())

  class Legacy(base):

    def __init__(self, mode, config):  # pylint: disable=super-init-not-called
      received.append((mode, config))
      self._params = None
      self._host_steps = 0

  config = _config(training_steps=1)
  config.experiment_kwargs.config = config_dict.ConfigDict({"x": 1})
  _run_train(Legacy, config)
  assert received == [("train", config.experiment_kwargs.config)]
  assert received[0][1] is config.experiment_kwargs.config
  assert any(r.levelno == pylogging.WARNING and "init_rng" in r.getMessage()
             for r in caplog.records)


def test_functools_partial_with_and_without_init_rng():
  log = _Log()
  exp_class = _make_experiment(log)
  _run_train(functools.partial(exp_class, extra="from partial"),
             _config(training_steps=1))
  assert log.inits[0]["kwargs"] == {"extra": "from partial"}
  np.testing.assert_array_equal(log.inits[0]["init_rng"], _INIT_KEY_42)

  received = []

  class Legacy(exp_class):

    def __init__(self, mode, experiment=None):  # pylint: disable=super-init-not-called
      received.append((mode, experiment))
      self._params = None
      self._host_steps = 0

  utils.GLOBAL_CHECKPOINT_DICT = {}
  _run_train(functools.partial(Legacy, experiment="wrapped"),
             _config(training_steps=1))
  assert received == [("train", "wrapped")]


def test_mode_is_passed_positionally_and_init_rng_by_keyword():
  received = []
  base = _make_experiment(_Log())

  class PositionalOnly(base):

    def __init__(self, mode, /, config, init_rng=None):  # pylint: disable=super-init-not-called
      received.append((mode, config, np.asarray(init_rng)))
      self._params = None
      self._host_steps = 0

  config = _config(training_steps=1)
  config.experiment_kwargs.config = config_dict.ConfigDict({"x": 1})
  _run_train(PositionalOnly, config)
  (mode, received_config, init_rng) = received[0]
  assert mode == "train"
  assert received_config is config.experiment_kwargs.config
  np.testing.assert_array_equal(init_rng, _INIT_KEY_42)


def test_legacy_random_seed_behavior_uses_seed_key_for_both():
  log = _Log()
  _run_train(_make_experiment(log),
             _config(training_steps=2, legacy_random_seed_behavior=True))
  np.testing.assert_array_equal(log.inits[0]["init_rng"], _SEED_KEY_42)
  s = jax.random.PRNGKey(42)
  for rng in log.rngs:
    key, s = jax.random.split(s)
    for d in range(_n()):
      expected = jax.random.fold_in(jax.random.fold_in(key, 0), d)
      np.testing.assert_array_equal(rng[d], np.asarray(expected))


def test_evaluate_constructor_gets_unsplit_seed_key_and_mode():
  log = _Log()
  _run_eval(_make_experiment(log),
            _config(one_off_evaluate=True, eval_initial_weights=True,
                    random_seed=7),
            jaxline_mode="eval_metric")
  (init,) = log.inits
  assert init["mode"] == "eval_metric"
  np.testing.assert_array_equal(init["init_rng"],
                                np.asarray(jax.random.PRNGKey(7)))


def test_evaluate_mode_defaults_to_flag():
  from jaxline import platform  # pylint: disable=g-import-not-at-top,unused-import
  log = _Log()
  config = _config(one_off_evaluate=True, eval_initial_weights=True)
  with flagsaver.flagsaver(jaxline_mode="eval_test_average"):
    train.evaluate(_make_experiment(log), config, _memory(config), None)
  assert log.inits[0]["mode"] == "eval_test_average"


# --- Calling conventions for step and evaluate (§2.4) -----------------------


def _signature_variant(variant, log):
  """An experiment whose step/evaluate use one of the real-world signatures."""
  base = _make_experiment(log)

  def record(kind, global_step, rng, **extra):
    log.events.append((kind, int(np.asarray(global_step)[0]),
                       np.asarray(rng).shape, extra))

  if variant == "positional_varargs":  # nfnets, perceiver, tapnet

    class Exp(base):

      def step(self, global_step, rng, *unused_args, **unused_kwargs):
        record("step", global_step, rng, args=unused_args,
               kwargs=sorted(unused_kwargs))
        return {}

      def evaluate(self, global_step, rng, *unused_args, **unused_kwargs):
        record("evaluate", global_step, rng, args=unused_args,
               kwargs=sorted(unused_kwargs))
        return {}

  elif variant == "kwargs_only_rest":  # ogb_lsc, ithaca, eigengame

    class Exp(base):

      def step(self, global_step, rng, **unused):
        record("step", global_step, rng, kwargs=sorted(unused))
        return {}

      def evaluate(self, global_step, rng, **unused):
        record("evaluate", global_step, rng, kwargs=sorted(unused))
        return {}

  elif variant == "keyword_only":  # c3, jax_privacy, ssl_hsic

    class Exp(base):

      def step(self, *, global_step, rng, writer):
        record("step", global_step, rng, writer=writer)
        return {}

      def evaluate(self, *, global_step, rng, writer):
        record("evaluate", global_step, rng, writer=writer)
        return {}

  elif variant == "positional_writer":  # distribution_shift_framework

    class Exp(base):

      def step(self, global_step, rng, writer, extra=None):
        record("step", global_step, rng, writer=writer, extra=extra)
        return {}

      def evaluate(self, global_step, rng, writer, extra=None):
        record("evaluate", global_step, rng, writer=writer, extra=extra)
        return {}

  elif variant == "evaluate_with_mode":  # tapnet, adversarial_robustness

    class Exp(base):

      def step(self, global_step, rng, *unused_args, **unused_kwargs):
        # User code calls evaluate positionally from step.
        out = self.evaluate(global_step, rng)
        record("step", global_step, rng, nested=out)
        return {}

      def evaluate(self, global_step, rng, mode=None, **kwargs):
        record("evaluate", global_step, rng, mode=mode,
               kwargs=sorted(kwargs))
        return {"mode_is_none": float(mode is None)}

  return Exp


@pytest.mark.parametrize("variant", [
    "positional_varargs", "kwargs_only_rest", "keyword_only",
    "positional_writer", "evaluate_with_mode"])
def test_user_step_and_evaluate_signatures(variant):
  log = _Log()
  exp_class = _signature_variant(variant, log)
  events = []
  writer = _RecordingWriter(events)
  _run_train(exp_class, _config(training_steps=2, log_train_data_interval=None),
             writer=writer)
  steps = [e for e in log.events if e[0] == "step"]
  assert [e[1] for e in steps] == [0, 1]
  assert all(e[2] == (_n(), 2) for e in steps)
  if variant == "positional_varargs":
    assert steps[0][3] == {"args": (), "kwargs": ["writer"]}
  elif variant == "kwargs_only_rest":
    assert steps[0][3] == {"kwargs": ["writer"]}
  elif variant in ("keyword_only", "positional_writer"):
    assert steps[0][3]["writer"] is writer
    assert steps[0][3].get("extra") is None
  elif variant == "evaluate_with_mode":
    nested = [e for e in log.events if e[0] == "evaluate"]
    assert [e[3] for e in nested] == [{"mode": None, "kwargs": []}] * 2
    assert steps[0][3] == {"nested": {"mode_is_none": 1.0}}

  log.events.clear()
  config = _config(one_off_evaluate=True, eval_initial_weights=True)
  _run_eval(exp_class, config, writer=writer)
  evals = [e for e in log.events if e[0] == "evaluate"]
  assert len(evals) == 1
  assert evals[0][1:3] == (2, (_n(), 2))  # One-off: the trained checkpoint.
  if variant == "evaluate_with_mode":
    assert evals[0][3] == {"mode": None, "kwargs": ["writer"]}
  elif variant in ("keyword_only", "positional_writer"):
    assert evals[0][3]["writer"] is writer
  # The harness never replaces step/evaluate on the instance.
  for instance in log.instances:
    assert "step" not in vars(instance)
    assert "evaluate" not in vars(instance)


# --- RNG (§4) ---------------------------------------------------------------


def test_step_rng_matches_reference_vectors():
  log = _Log()
  _run_train(_make_experiment(log), _config(training_steps=3))
  assert log.steps == [0, 1, 2]
  for i, rng in enumerate(log.rngs):
    assert rng.shape == (_n(), 2) and rng.dtype == np.uint32
    np.testing.assert_array_equal(rng[0], _STEP_KEYS[0][i])
    if _n() > 1:
      np.testing.assert_array_equal(rng[1], _STEP_KEYS[1][i])


def test_resumed_run_reproduces_uninterrupted_keys_and_params():
  straight = _Log()
  _run_train(_make_experiment(straight), _config(training_steps=5))
  straight_final = _history("latest")[-1].pickle_nest

  utils.GLOBAL_CHECKPOINT_DICT = {}
  first, second = _Log(), _Log()
  exp_class = _make_experiment(first)
  _run_train(exp_class, _config(training_steps=3))
  exp_class.log = second
  _run_train(exp_class, _config(training_steps=5))
  assert first.steps == [0, 1, 2]
  assert second.steps == [3, 4]
  for a, b in zip(straight.rngs, first.rngs + second.rngs):
    np.testing.assert_array_equal(a, b)
  final = _history("latest")[-1].pickle_nest
  assert final["global_step"] == straight_final["global_step"] == 5
  np.testing.assert_array_equal(final["experiment_module"]["params"],
                                [5.0, 5.0])
  assert final["experiment_module"]["host_steps"] == 5
  np.testing.assert_array_equal(final["train_step_rng"],
                                straight_final["train_step_rng"])


@pytest.mark.parametrize("mode", ["same_host_same_device",
                                  "unique_host_unique_device"])
def test_eval_rng_is_seed_key_specialised_and_reused(mode):
  log = _Log()
  events = []
  checkpointer = _SharedStateCheckpointer(
      events, script=[None, "a", "b"], checkpoints={"a": 1, "b": 3})
  _run_eval(_make_experiment(log),
            _config(eval_initial_weights=True, random_mode_eval=mode),
            checkpointer=checkpointer)
  assert len(log.evals) == 3
  rngs = [np.asarray(e["rng"]) for e in log.evals]
  assert rngs[0].shape == (_n(), 2)
  if mode == "same_host_same_device":
    np.testing.assert_array_equal(rngs[0], np.tile(_SEED_KEY_42, (_n(), 1)))
  else:
    np.testing.assert_array_equal(rngs[0][0], _EVAL_KEYS_UNIQUE[0])
    if _n() > 1:
      np.testing.assert_array_equal(rngs[0][1], _EVAL_KEYS_UNIQUE[1])
  for rng in rngs[1:]:
    np.testing.assert_array_equal(rng, rngs[0])


# --- Periodic actions (§3.2 step 5) ------------------------------------------


class _EventHandler(pylogging.Handler):
  """Turns the stdout progress line into an event, in the logging thread."""

  def __init__(self, events):
    super().__init__(level=pylogging.INFO)
    self._events = events

  def emit(self, record):
    match = re.match(r"global_step: (\d+), ", record.getMessage())
    if match:
      self._events.append(("log", int(match.group(1))))


@pytest.fixture
def log_events(absl_info):
  del absl_info
  events = []
  handler = _EventHandler(events)
  logger = pylogging.getLogger("absl")
  logger.addHandler(handler)
  yield events
  logger.removeHandler(handler)


class _CallerAction:

  def __init__(self, events):
    self._events = events
    self.updates = []

  def __call__(self, t, step, scalar_outputs):
    self._events.append(("caller", step))

  def update_time(self, t, step):
    self.updates.append(step)

  def wait_to_finish(self):
    self._events.append(("caller_wait",))


def test_actions_run_in_contract_order(log_events):
  events = log_events
  caller = _CallerAction(events)
  caller_actions = [caller]
  checkpointer = _SharedStateCheckpointer(events)
  _run_train(_make_experiment(_Log()),
             _config(training_steps=3, save_checkpoint_interval=1,
                     log_async=False),
             checkpointer=checkpointer, writer=_RecordingWriter(events),
             periodic_actions=caller_actions)
  assert caller_actions == [caller]  # The caller's sequence is not mutated.
  assert caller.updates == [0]  # update_time(time, global_step) once.
  for step in (1, 2, 3):
    kinds = []
    for event in events:
      if event[0] in ("caller", "log") and event[1] == step:
        kinds.append(event[0])
      elif event[0] == "save" and event[2] == step:
        kinds.append("save")
      elif event[0] == "write" and event[1] == step:
        kinds.append("write")
    if step == 3:
      # The final save after the loop; the async write may land after it.
      assert kinds.count("save") == 2
      kinds.reverse()
      kinds.remove("save")
      kinds.reverse()
    assert kinds == ["caller", "log", "save", "write"], (step, kinds)
  assert ("caller_wait",) in events


def test_stdout_line_reports_completed_steps_and_scalars(absl_info):
  _run_train(_make_experiment(_Log()),
             _config(training_steps=3, log_async=False))
  lines = [m for m in _messages(absl_info) if m.startswith("global_step:")]
  assert [int(re.match(r"global_step: (\d+),", m).group(1))
          for m in lines] == [1, 2, 3]
  # "global_step: 3" reports the scalars of the step that received 2.
  assert "'loss': 2.0" in lines[-1]
  # Progress replaces steps_per_sec: the rate is printed once, after the dict.
  assert "steps_per_sec" not in lines[-1]
  assert re.search(r"\[3/3 \(100\.0%\), [\d.e+]+ steps/s, ETA 0:00:00\]$",
                   lines[-1]), lines[-1]


@pytest.mark.parametrize("key", ["log_tensors_interval",
                                 "save_checkpoint_interval",
                                 "log_train_data_interval"])
def test_none_interval_turns_that_action_off(key, absl_info):
  events = []
  checkpointer = _SharedStateCheckpointer(events)
  config = _config(training_steps=3, save_checkpoint_interval=1,
                   log_async=False)
  config[key] = None
  _run_train(_make_experiment(_Log()), config, checkpointer=checkpointer,
             writer=_RecordingWriter(events))
  log_lines = [m for m in _messages(absl_info)
               if m.startswith("global_step:")]
  saves = [e[2] for e in events if e[0] == "save"]
  writes = [e[1] for e in events if e[0] == "write"]
  if key == "log_tensors_interval":
    assert not log_lines
  else:
    assert len(log_lines) == 3
  if key == "save_checkpoint_interval":
    assert saves == [3]  # The final save still happens.
  else:
    assert saves == [1, 2, 3, 3]
  if key == "log_train_data_interval":
    assert not writes
  else:
    assert writes == [1, 2, 3]


@pytest.mark.parametrize("interval", [0, -1])
def test_non_positive_checkpoint_interval_keeps_only_final_save(interval):
  events = []
  checkpointer = _SharedStateCheckpointer(events)
  _run_train(_make_experiment(_Log()),
             _config(training_steps=3, save_checkpoint_interval=interval),
             checkpointer=checkpointer)
  assert [e[2] for e in events if e[0] == "save"] == [3]


def test_kfac_style_locked_config_without_training_steps():
  log = _Log()
  base = _make_experiment(log)

  class Exp(base):

    def should_run_step(self, global_step, config):
      return global_step < config.experiment_kwargs.steps

  config = _config(training_steps=None, interval_type=None,
                   logging_interval_type="steps",
                   checkpoint_interval_type="steps",
                   save_checkpoint_interval=2)
  config.experiment_kwargs.steps = 4
  config.lock()
  events = []
  _run_train(Exp, config, checkpointer=_SharedStateCheckpointer(events),
             writer=_RecordingWriter(events))
  assert log.steps == [0, 1, 2, 3]
  assert [e[2] for e in events if e[0] == "save"] == [2, 4, 4]
  assert [e[1] for e in events if e[0] == "write"] == [1, 2, 3, 4]


def test_writer_fires_at_training_steps_and_can_log_all_data():
  events = []
  config = _config(training_steps=4, interval_type="secs",
                   log_train_data_interval=10_000.0,
                   log_tensors_interval=10_000)
  _run_train(_make_experiment(_Log()), config, writer=_RecordingWriter(events))
  writes = [e for e in events if e[0] == "write"]
  assert [w[1] for w in writes] == [4]  # end_step_to_action=training_steps.
  assert set(writes[0][2]) == {"loss", "steps_per_sec"}
  assert float(writes[0][2]["loss"]) == 3.0

  events.clear()
  utils.GLOBAL_CHECKPOINT_DICT = {}
  config.log_all_train_data = True
  _run_train(_make_experiment(_Log()), config, writer=_RecordingWriter(events))
  writes = [e for e in events if e[0] == "write"]
  assert [w[1] for w in writes] == [1, 2, 3, 4]
  assert [float(w[2]["loss"]) for w in writes] == [0.0, 1.0, 2.0, 3.0]
  # steps_per_sec goes on the triggering step's entry only.
  assert ["steps_per_sec" in w[2] for w in writes] == [False] * 3 + [True]


def test_non_chief_host_saves_and_writes_only_when_configured(monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  events = []
  checkpointer = _SharedStateCheckpointer(events)
  _run_train(_make_experiment(_Log()),
             _config(training_steps=2, save_checkpoint_interval=1),
             checkpointer=checkpointer, writer=_RecordingWriter(events))
  assert not [e for e in events if e[0] in ("save", "write")]

  events.clear()
  _run_train(_make_experiment(_Log()),
             _config(training_steps=2, save_checkpoint_interval=1,
                     train_checkpoint_all_hosts=True, log_all_hosts=True),
             checkpointer=_SharedStateCheckpointer(events),
             writer=_RecordingWriter(events))
  assert [e[2] for e in events if e[0] == "save"] == [1, 2, 2]
  assert [e[1] for e in events if e[0] == "write"] == [1, 2]


# --- Checkpoints in train (§3.2 steps 3-9) -----------------------------------


def test_save_initial_train_checkpoint():
  config = _config(training_steps=2, save_initial_train_checkpoint=True)
  exp_class = _make_experiment(_Log())
  _run_train(exp_class, config)
  history = _history("latest")
  assert [s.pickle_nest["global_step"] for s in history] == [0, 2]
  assert history[0].pickle_nest["experiment_module"]["params"] is None
  np.testing.assert_array_equal(
      history[1].pickle_nest["experiment_module"]["params"], [2.0, 2.0])

  # Something can be restored now, so no initial save on the next run.
  config.training_steps = 3
  _run_train(exp_class, config)
  assert [s.pickle_nest["global_step"] for s in _history("latest")] == [
      0, 2, 3]


def test_no_initial_checkpoint_by_default():
  events = []
  _run_train(_make_experiment(_Log()), _config(training_steps=1),
             checkpointer=_SharedStateCheckpointer(events))
  assert [e[2] for e in events if e[0] == "save"] == [1]


def test_final_save_even_with_zero_steps():
  log = _Log()
  events = []
  checkpointer = _SharedStateCheckpointer(events)
  _run_train(_make_experiment(log), _config(training_steps=0),
             checkpointer=checkpointer)
  assert not log.steps
  (save,) = checkpointer.saves
  assert save["series"] == "latest" and save["global_step"] == 0
  assert save["snapshot"] == {"params": None, "host_steps": 0}
  # The final save is followed by a wait for checkpointing.
  tail = [e for e in events if e[0] in ("save", "wait")]
  assert tail == [("save", "latest", 0), ("wait",)]


def test_train_restores_latest_and_continues():
  first, second = _Log(), _Log()
  exp_class = _make_experiment(first)
  _run_train(exp_class, _config(training_steps=2))
  assert first.steps == [0, 1]
  exp_class.log = second
  _run_train(exp_class, _config(training_steps=4))
  assert second.steps == [2, 3]
  exp = second.instances[0]
  assert exp._host_steps == 4
  np.testing.assert_array_equal(np.asarray(exp._params),
                                np.full([_n(), 2], 4.0))
  final = _history("latest")[-1].pickle_nest
  assert final["global_step"] == 4
  assert type(final["global_step"]) is int  # pylint: disable=unidiomatic-typecheck


def test_train_with_shared_state_checkpointer():
  events = []
  checkpointer = _SharedStateCheckpointer(events)
  _run_train(_make_experiment(_Log()), _config(training_steps=3),
             checkpointer=checkpointer)
  assert ("get", "latest") in events
  assert not [e for e in events if e[0] == "get" and e[1] != "latest"]
  (save,) = checkpointer.saves
  assert save["global_step"] == 3
  np.testing.assert_array_equal(save["snapshot"]["params"], [3.0, 3.0])
  assert checkpointer.state.train_step_rng.shape == (_n(), 2)


def test_train_loop_failure_waits_flushes_and_reraises():
  log = _Log()
  events = []
  error = RuntimeError("step exploded")
  checkpointer = _SharedStateCheckpointer(events)
  writer = _RecordingWriter(events, delay=0.2)
  exp_class = _make_experiment(log, step_error=error, step_error_at=2)
  caller = _CallerAction(events)
  with pytest.raises(RuntimeError) as raised:
    _run_train(exp_class, _config(training_steps=5),
               checkpointer=checkpointer, writer=writer,
               periodic_actions=[caller])
  assert raised.value is error
  assert log.steps == [0, 1, 2]
  # No final checkpoint of the failed state.
  assert not checkpointer.saves
  # The slow async writes submitted before the failure were waited for,
  # then the writer was flushed.
  names = [e[0] for e in events if e[0] in ("write", "flush")]
  assert [e[1] for e in events if e[0] == "write"] == [1, 2]
  assert names[-1] == "flush"
  assert ("caller_wait",) in events


# --- evaluate (§3.3) ---------------------------------------------------------


def test_evaluate_follows_latest_and_skips_evaluated(absl_info):
  log = _Log()
  events = []
  writer = _RecordingWriter(events)
  checkpointer = _SharedStateCheckpointer(
      events, script=[None, "a", "a", "b"], checkpoints={"a": 1, "b": 3})
  config = _config(training_steps=3, eval_poll_interval_secs=0.02)
  _run_eval(_make_experiment(log), config, checkpointer=checkpointer,
            writer=writer)
  assert [int(e["global_step"][0]) for e in log.evals] == [1, 3]
  for e in log.evals:
    assert e["global_step"].dtype == np.int32
    assert e["global_step"].shape == (_n(),)
  np.testing.assert_array_equal(log.evals[1]["params"],
                                np.full([_n(), 2], 3.0))
  assert checkpointer.restores == ["latest", "latest"]
  waits = [_WAIT_RE.search(m) for m in _messages(absl_info)]
  waits = [m.groups() for m in waits if m]
  assert waits == [("None", "0.02"), ("a", "0.02")]
  # Scalars go to the writer synchronously with the host step.
  writes = [(e[1], e[2]) for e in events if e[0] == "write"]
  assert writes == [(1, {"eval_step": 1}), (3, {"eval_step": 3})]
  assert type(writes[0][0]) is int  # pylint: disable=unidiomatic-typecheck
  assert any(m == "Last checkpoint (iteration 3) evaluated, exiting."
             for m in _messages(absl_info))
  # Tracking is off: "best" is never touched.
  assert not [e for e in events if len(e) > 1 and e[1] == "best"]
  # Checkpointing waited for and writer flushed on the way out.
  assert events[-2:] in ([("wait",), ("flush",)], [("flush",), ("wait",)])


def test_evaluate_poll_interval_is_configurable(absl_info, monkeypatch):
  # Record how long the evaluating thread asks to wait, however it waits.
  waited = []
  me = threading.current_thread()
  real_sleep, real_wait = time.sleep, threading.Event.wait

  def sleep(secs):
    if threading.current_thread() is me:
      waited.append(secs)
    real_sleep(secs)

  def wait(event, timeout=None):
    if threading.current_thread() is me and timeout is not None:
      waited.append(timeout)
    return real_wait(event, timeout)

  monkeypatch.setattr(time, "sleep", sleep)
  monkeypatch.setattr(threading.Event, "wait", wait)
  log = _Log()
  checkpointer = _SharedStateCheckpointer(
      [], script=[None, None, "a"], checkpoints={"a": 3})
  _run_eval(_make_experiment(log),
            _config(eval_poll_interval_secs=0.125),
            checkpointer=checkpointer)
  assert waited.count(0.125) == 2, waited
  waits = [_WAIT_RE.search(m) for m in _messages(absl_info)]
  assert [m.group(2) for m in waits if m] == ["0.125", "0.125"]


def test_evaluate_initial_weights_then_checkpoints():
  log = _Log()
  checkpointer = _SharedStateCheckpointer(
      [], script=[None, None, "a"], checkpoints={"a": 3})
  _run_eval(_make_experiment(log), _config(eval_initial_weights=True),
            checkpointer=checkpointer)
  assert [int(e["global_step"][0]) for e in log.evals] == [0, 3]
  assert log.evals[0]["params"] is None  # Nothing restored.
  assert checkpointer.restores == ["latest"]


def test_one_off_evaluate_without_checkpoint_raises_exact_error():
  log = _Log()
  events = []
  with pytest.raises(ValueError) as raised:
    _run_eval(_make_experiment(log), _config(one_off_evaluate=True),
              checkpointer=_SharedStateCheckpointer(events),
              writer=_RecordingWriter(events))
  assert str(raised.value) == (
      "Checkpoint invalid and eval_initial_weights set to False")
  assert not log.evals
  assert ("wait",) in events and ("flush",) in events


def test_one_off_evaluate_initial_weights():
  log = _Log()
  events = []
  _run_eval(_make_experiment(log),
            _config(one_off_evaluate=True, eval_initial_weights=True),
            checkpointer=_SharedStateCheckpointer(events),
            writer=_RecordingWriter(events))
  assert [int(e["global_step"][0]) for e in log.evals] == [0]
  assert [e[1] for e in events if e[0] == "write"] == [0]


def test_one_off_evaluate_restores_once_and_exits_before_the_end():
  log = _Log()
  checkpointer = _SharedStateCheckpointer(
      [], script=["a", "b"], checkpoints={"a": 1, "b": 2})
  _run_eval(_make_experiment(log),
            _config(one_off_evaluate=True, training_steps=100),
            checkpointer=checkpointer)
  assert [int(e["global_step"][0]) for e in log.evals] == [1]
  assert checkpointer.restores == ["latest"]


def test_evaluate_sees_only_the_newest_in_memory_checkpoint():
  log = _Log()
  config = _config(training_steps=3, save_checkpoint_interval=1)
  exp_class = _make_experiment(_Log())
  _run_train(exp_class, config)
  assert len(_history("latest")) == 4  # Saves at 1, 2, 3 and the final one.
  exp_class.log = log
  _run_eval(exp_class, config)
  assert [int(e["global_step"][0]) for e in log.evals] == [3]
  np.testing.assert_array_equal(log.evals[0]["params"],
                                np.full([_n(), 2], 3.0))
  assert log.evals[0]["host_steps"] == 3
  assert "best" not in utils.GLOBAL_CHECKPOINT_DICT


def test_none_scalars_reach_no_writer_and_strings_fail_naming_the_key(
    absl_info, monkeypatch):
  """kfac-jax's classifiers return statistics that are None on some steps."""
  monkeypatch.setattr(writers, "_none_keys_warned", set())
  base = _make_experiment(_Log())

  class Exp(base):

    def step(self, *, global_step, rng, writer):
      out = dict(super().step(global_step=global_step, rng=rng,
                              writer=writer))
      out["rho"] = None
      out["lr"] = None if int(np.asarray(global_step)[0]) < 2 else 0.1
      return out

    def evaluate(self, *, global_step, rng, writer):
      return {"accuracy": 0.5, "ece": None}

  events = []
  config = _config(training_steps=3)
  _run_train(Exp, config, writer=_RecordingWriter(events))
  writes = [e[2] for e in events if e[0] == "write"]
  assert [set(w) - {"steps_per_sec"} for w in writes] == [
      {"loss"}, {"loss"}, {"loss", "lr"}]
  lines = [m for m in _messages(absl_info) if m.startswith("global_step:")]
  assert "rho" not in lines[-1] and "'lr': 0.1" in lines[-1]
  assert len([m for m in _messages(absl_info) if "'rho' is None" in m]) == 1

  events.clear()
  _run_eval(Exp, _config(one_off_evaluate=True),
            writer=_RecordingWriter(events))
  assert [e for e in events if e[0] == "write"] == [
      ("write", 3, {"accuracy": 0.5})]

  class StringAtStep2(base):

    def step(self, *, global_step, rng, writer):
      out = dict(super().step(global_step=global_step, rng=rng,
                              writer=writer))
      if int(np.asarray(global_step)[0]) == 2:
        out["schedule"] = "warmup"
      return out

  utils.GLOBAL_CHECKPOINT_DICT = {}
  with pytest.raises(TypeError, match="'schedule'.*string"):
    _run_train(StringAtStep2, _config(training_steps=3),
               writer=_RecordingWriter([]))


def test_evaluate_none_return_is_empty_dict():
  base = _make_experiment(_Log())

  class Exp(base):

    def evaluate(self, *, global_step, rng, writer):
      return None

  events = []
  _run_eval(Exp, _config(one_off_evaluate=True, eval_initial_weights=True),
            writer=_RecordingWriter(events))
  assert [e for e in events if e[0] == "write"] == [("write", 0, {})]


def test_evaluate_failure_waits_flushes_and_reraises():
  error = RuntimeError("eval exploded")
  events = []
  with pytest.raises(RuntimeError) as raised:
    _run_eval(_make_experiment(_Log(), eval_error=error),
              _config(eval_initial_weights=True),
              checkpointer=_SharedStateCheckpointer(events),
              writer=_RecordingWriter(events))
  assert raised.value is error
  assert ("wait",) in events and ("flush",) in events


def test_evaluate_skips_a_checkpoint_that_became_unavailable(absl_info):
  # The disk checkpointer raises this for a step deleted after it was
  # listed. train.py names the error without importing jaxline.checkpointing
  # (Orbax) itself; building a disk checkpointer imports it.
  from jaxline import checkpointing  # pylint: disable=g-import-not-at-top

  class Vanishing(_SharedStateCheckpointer):

    def restore(self, ckpt_series):
      if self._current == "a":
        self.restores.append(ckpt_series)
        raise checkpointing.CheckpointUnavailableError("Step a is gone.")
      super().restore(ckpt_series)

  log = _Log()
  checkpointer = Vanishing([], script=["a", "b"], checkpoints={"b": 3})
  _run_eval(_make_experiment(log), _config(), checkpointer=checkpointer)
  assert [int(e["global_step"][0]) for e in log.evals] == [3]
  assert checkpointer.restores == ["latest", "latest"]
  assert any("Step a is gone. Skipping it" in m
             for m in _messages(absl_info))


# --- Best tracking (§3.3 step 7) ---------------------------------------------


def _best_run(metrics, *, higher_is_better=True, checkpointer=None, log=None):
  log = log or _Log()
  events = []
  checkpointer = checkpointer or _SharedStateCheckpointer(
      events, script=["a", "b", "c"], checkpoints={"a": 1, "b": 2, "c": 3})
  config = _config(best_model_eval_metric="metric",
                   best_model_eval_metric_higher_is_better=higher_is_better)
  _run_eval(_make_experiment(log, metrics=metrics), config,
            checkpointer=checkpointer)
  return checkpointer, log


@pytest.mark.parametrize("as_type", [
    float, np.float32, np.float64, lambda v: np.array(v, np.float32),
    lambda v: jnp.asarray(v, jnp.float32), lambda v: np.int32(int(v))],
                         ids=["float", "np.float32", "np.float64", "0-d array",
                              "jax.Array", "np.int32"])
def test_best_tracking_coerces_metric_to_float(as_type):
  checkpointer, log = _best_run([as_type(1.0), as_type(3.0), as_type(2.0)])
  assert len(log.evals) == 3
  best = [s for s in checkpointer.saves if s["series"] == "best"]
  assert [s["global_step"] for s in best] == [1, 2]
  assert [s["best_eval_metric_value"] for s in best] == [1.0, 3.0]
  for s in best:
    assert type(s["best_eval_metric_value"]) is float  # pylint: disable=unidiomatic-typecheck
  np.testing.assert_array_equal(best[-1]["snapshot"]["params"], [2.0, 2.0])
  assert not [s for s in checkpointer.saves if s["series"] == "latest"]


def test_best_tracking_with_in_memory_checkpointer():
  config = _config(training_steps=2)
  exp_class = _make_experiment(_Log(), metrics=[np.float32(0.5)])
  _run_train(exp_class, config)
  config.best_model_eval_metric = "metric"
  _run_eval(exp_class, config)
  (best,) = _history("best")
  assert best.pickle_nest["best_eval_metric_value"] == 0.5
  assert type(best.pickle_nest["best_eval_metric_value"]) is float  # pylint: disable=unidiomatic-typecheck
  assert best.pickle_nest["best_model_eval_metric"] == "metric"
  assert best.pickle_nest["global_step"] == 2
  np.testing.assert_array_equal(
      best.pickle_nest["experiment_module"]["params"], [2.0, 2.0])


def test_nan_is_never_better():
  checkpointer, _ = _best_run([float("nan"), 1.0, float("nan")])
  best = [s for s in checkpointer.saves if s["series"] == "best"]
  assert [s["best_eval_metric_value"] for s in best] == [1.0]
  assert [s["global_step"] for s in best] == [2]


def test_lower_is_better():
  checkpointer, _ = _best_run([3.0, 1.0, 2.0], higher_is_better=False)
  best = [s for s in checkpointer.saves if s["series"] == "best"]
  assert [s["best_eval_metric_value"] for s in best] == [3.0, 1.0]


def test_equal_value_is_not_better():
  checkpointer, _ = _best_run([2.0, 2.0, 1.0])
  best = [s for s in checkpointer.saves if s["series"] == "best"]
  assert [s["global_step"] for s in best] == [1]


def test_missing_metric_key_lists_returned_keys():
  base = _make_experiment(_Log())

  class Exp(base):

    def evaluate(self, *, global_step, rng, writer):
      return {"accuracy": 1.0, "xent": 2.0}

  config = _config(best_model_eval_metric="top_1_acc", one_off_evaluate=True,
                   eval_initial_weights=True)
  with pytest.raises(ValueError) as raised:
    _run_eval(Exp, config)
  message = str(raised.value)
  assert "top_1_acc" in message
  assert "accuracy" in message and "xent" in message


def test_non_scalar_metric_raises_value_error_naming_key():
  with pytest.raises(ValueError, match="metric"):
    _best_run([np.ones([3], np.float32)] * 3)


def test_on_new_best_model_runs_before_save_and_may_mutate():
  seen = []
  base = _make_experiment(_Log(), metrics=[1.0, 5.0])

  class Exp(base):

    def on_new_best_model(self, best_state):
      history = utils.GLOBAL_CHECKPOINT_DICT.get("best")
      seen.append((best_state.global_step, best_state.best_eval_metric_value,
                   len(history.history) if history else 0))
      best_state.note = f"hook saw step {best_state.global_step}"

  config = _config(training_steps=1, best_model_eval_metric="metric")
  _run_train(Exp, config)
  _run_eval(Exp, config)
  # The hook ran with the new best state, before anything was saved.
  assert seen == [(1, 1.0, 0)]
  (best,) = _history("best")
  # Its mutation of the live best state is in the saved checkpoint.
  assert best.pickle_nest["note"] == "hook saw step 1"


def test_on_new_best_model_called_before_save_with_shared_state():
  events = []
  base = _make_experiment(_Log(), metrics=[1.0, 0.5, 3.0])

  class Exp(base):

    def on_new_best_model(self, best_state):
      events.append(("hook", best_state.global_step))
      best_state.note = "from hook"

  checkpointer = _SharedStateCheckpointer(
      events, script=["a", "b", "c"], checkpoints={"a": 1, "b": 2, "c": 3})
  config = _config(best_model_eval_metric="metric")
  _run_eval(Exp, config, checkpointer=checkpointer)
  order = [e for e in events if e[0] == "hook" or e[:2] == ("save", "best")]
  assert order == [("hook", 1), ("save", "best", 1),
                   ("hook", 3), ("save", "best", 3)]
  assert [s["note"] for s in checkpointer.saves] == ["from hook"] * 2


def test_best_value_is_restored_after_restart():
  config = _config(training_steps=2, best_model_eval_metric="metric")
  exp_class = _make_experiment(_Log(), metrics=[0.5])
  _run_train(exp_class, _config(training_steps=2))
  _run_eval(exp_class, config)
  assert len(_history("best")) == 1

  # A restarted evaluator: a worse value must not replace the best.
  threading_result = []

  def restarted():
    log = _Log()
    _run_eval(_make_experiment(log, metrics=[0.4]), config)
    threading_result.append(log)

  # A fresh thread has a fresh live state, like a new process would.
  thread = threading.Thread(target=restarted)
  thread.start()
  thread.join()
  assert len(threading_result) == 1
  assert len(_history("best")) == 1
  assert _history("best")[-1].pickle_nest["best_eval_metric_value"] == 0.5

  thread = threading.Thread(target=lambda: _run_eval(
      _make_experiment(_Log(), metrics=[0.7]), config))
  thread.start()
  thread.join()
  assert [s.pickle_nest["best_eval_metric_value"]
          for s in _history("best")] == [0.5, 0.7]


def test_best_tracking_off_for_non_chief_unless_all_hosts(monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  events = []
  _best_run([1.0, 2.0, 3.0], checkpointer=_SharedStateCheckpointer(
      events, script=["a", "b", "c"], checkpoints={"a": 1, "b": 2, "c": 3}))
  assert not [e for e in events if len(e) > 1 and e[1] == "best"]

  log = _Log()
  checkpointer = _SharedStateCheckpointer(
      [], script=["a", "b", "c"], checkpoints={"a": 1, "b": 2, "c": 3})
  config = _config(best_model_eval_metric="metric",
                   best_checkpoint_all_hosts=True)
  _run_eval(_make_experiment(log, metrics=[1.0, 2.0, 3.0]), config,
            checkpointer=checkpointer)
  assert [s["global_step"] for s in checkpointer.saves] == [1, 2, 3]


def test_best_metric_none_means_tracking_off():
  config = _config(training_steps=1, best_model_eval_metric=None)
  exp_class = _make_experiment(_Log(), metrics=[1.0])
  _run_train(exp_class, _config(training_steps=1))
  _run_eval(exp_class, config)
  assert "best" not in utils.GLOBAL_CHECKPOINT_DICT


def test_eval_steps_beyond_training_steps_exit_immediately():
  log = _Log()
  checkpointer = _SharedStateCheckpointer(
      [], script=["a", "b"], checkpoints={"a": 7, "b": 9})
  _run_eval(_make_experiment(log), _config(training_steps=5),
            checkpointer=checkpointer)
  assert [int(e["global_step"][0]) for e in log.evals] == [7]


def test_multithreaded_style_train_then_eval_share_history():
  """Train in a thread and evaluate here, as train_eval_multithreaded does."""
  eval_log = _Log()
  config = _config(training_steps=4, save_checkpoint_interval=1,
                   eval_poll_interval_secs=0.01)
  errors = []

  def train_thread():
    try:
      _run_train(_make_experiment(_Log()), config)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=train_thread)
  thread.start()
  _run_eval(_make_experiment(eval_log), config)
  thread.join()
  assert not errors
  steps = [int(e["global_step"][0]) for e in eval_log.evals]
  assert steps[-1] == 4
  # Non-decreasing: a save between reading the path and restoring may make
  # two polls see the same step (as in 0.0.8), never an older one.
  assert steps == sorted(steps)
  assert math.isfinite(float(eval_log.evals[-1]["params"][0, 0]))
