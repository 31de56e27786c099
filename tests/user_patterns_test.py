"""Usage patterns of public research code written for jaxline 0.0.8.

Each test re-creates, in our own small experiment, one way that a public
codebase drives jaxline (kfac-jax's examples, eigengame, tapnet,
emergent_communication_at_scale, distribution_shift_framework,
adversarial_robustness, jax_privacy, ogb_lsc, c3_neural_compression), and
checks that it behaves as it did on 0.0.8. The experiments are tiny and
device-count agnostic: they run on 1 CPU device and on several forced ones.

Most tests run `platform.main` in this process, as those codebases' own
tests do, under `flagsaver`; the config-file test needs its own process,
because the config is loaded while flags are parsed.
"""

import dataclasses
import functools
import logging as pylogging
import math
import os
import sys
import threading
import time

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import conftest
from jaxline import base_config
from jaxline import experiment
from jaxline import platform
from jaxline import train
from jaxline import utils

FLAGS = flags.FLAGS

pytestmark = pytest.mark.usefixtures("fresh_jaxline_state")

_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "testdata", "user_patterns")
_TIMEOUT_SECS = 120

# One compiled program per shape, shared by every experiment below.
_add_one = jax.pmap(lambda x: x + 1.0)


def _n():
  return jax.local_device_count()


def _config(training_steps=4, **overrides):
  """A base config counting steps, logging every step, saving rarely."""
  config = base_config.get_base_config()
  config.training_steps = training_steps
  config.interval_type = "steps"
  config.log_tensors_interval = 1
  config.log_train_data_interval = 1
  config.save_checkpoint_interval = 1000
  config.eval_poll_interval_secs = 0.05
  config.experiment_kwargs = config_dict.ConfigDict({"config": {}})
  for key, value in overrides.items():
    config[key] = value
  return config


class _RecordingWriter:
  """A writer that keeps what it is given, per mode."""

  def __init__(self):
    self.scalars = []  # (mode, step, dict)
    self.images = []
    self._lock = threading.Lock()

  def factory(self, config, mode):
    del config
    outer = self

    class _ModeWriter:

      def write_scalars(self, step, scalars):
        with outer._lock:
          outer.scalars.append((mode, int(step), dict(scalars)))

      def write_images(self, step, images):
        with outer._lock:
          outer.images.append((mode, int(step), dict(images)))

      def flush(self):
        pass

      def close(self):
        pass

    return _ModeWriter()

  def steps(self, mode, key):
    return [step for m, step, s in self.scalars if m == mode and key in s]

  def values(self, mode, key):
    return [s[key] for m, _, s in self.scalars if m == mode and key in s]


def _main(experiment_class, config, mode="train", **kwargs):
  with flagsaver.flagsaver(config=config, jaxline_mode=mode):
    platform.main(experiment_class, [], **kwargs)


# --- kfac-jax (examples/training.py) ------------------------------------------


class _KfacStyle(experiment.AbstractExperiment):
  """kfac-jax's JaxlineExperiment, reduced to its jaxline-facing parts."""

  @property
  def CHECKPOINT_ATTRS(self):  # pylint: disable=invalid-name
    attrs = {"_params": "params"}
    if self.mode != "eval":
      attrs["_opt_state"] = "opt_state"
    return attrs

  NON_BROADCAST_CHECKPOINT_ATTRS = {"_python_step": "python_step"}

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self.mode = mode
    self.config = config
    self._params = None
    self._opt_state = None
    self._python_step = 0

  def should_run_step(self, global_step, config):
    del config  # training_steps is None; the experiment counts itself.
    return global_step < self.config.steps

  def _maybe_initialize(self):
    if self._params is None:
      self._params = utils.bcast_local_devices(jnp.zeros([2]))
      self._opt_state = self.config.make_opt_state()

  def step(self, global_step, rng, **unused_kwargs):
    self._maybe_initialize()
    self._params = _add_one(self._params)
    self._opt_state = self.config.update_opt_state(self._opt_state)
    self._python_step += 1
    stats = {"loss": 1.0 / self._python_step,
             "progress": self._python_step / self.config.steps}
    # Statistics computed only every few steps: None (or NaN) in between.
    updated = self._python_step % 3 == 0
    stats[self.config.none_key] = 0.5 if updated else None
    stats["rho"] = 0.9 if updated else self.config.invalid_metric_value
    return stats

  def evaluate(self, global_step, rng, **unused_kwargs):
    return {"eval_loss": float(utils.get_first(self._params)[0])}


def _kfac_config(none_key, steps=4, **experiment_config):
  """kfac-jax's pipeline config: no training_steps, mixed intervals, locked.

  Each test names its own None statistic: the one warning per key is per
  process.
  """
  config = base_config.get_base_config()
  config.training_steps = None
  config.interval_type = None
  config.logging_interval_type = "steps"
  config.log_train_data_interval = 1
  config.log_tensors_interval = 1
  config.checkpoint_interval_type = "steps"
  config.save_checkpoint_interval = 2
  config.train_checkpoint_all_hosts = False
  defaults = dict(
      steps=steps, none_key=none_key, invalid_metric_value=0.0,
      make_opt_state=lambda: utils.bcast_local_devices(jnp.zeros([])),
      update_opt_state=_add_one)
  defaults.update(experiment_config)
  config.experiment_kwargs = config_dict.ConfigDict({"config": defaults})
  config.lock()
  return config


def test_kfac_style_none_statistics_mode_keyed_attrs_and_locked_config(caplog):
  """kfac-jax's examples: None stats, @property CHECKPOINT_ATTRS, step counter.

  Their config is locked, has `training_steps=None` with `interval_type=None`
  and per-action interval types, and `should_run_step` is overridden. Stats
  that are None on some steps are left out of the writer with one warning
  naming the key. An eval run in the same process restores the host step
  counter and the parameters but, as the property says for mode "eval", not
  the optimizer state.
  """
  config = _kfac_config("kfac_unset_stat", steps=4)
  writer = _RecordingWriter()
  with caplog.at_level(pylogging.WARNING):
    _main(_KfacStyle, config, writer_factory=writer.factory)
  assert writer.steps("train", "loss") == [1, 2, 3, 4]
  assert writer.steps("train", "kfac_unset_stat") == [3]
  none_warnings = [r.getMessage() for r in caplog.records
                   if "kfac_unset_stat" in r.getMessage()]
  assert len(none_warnings) == 1, none_warnings
  assert "None" in none_warnings[0]

  evaluated = []

  class _Eval(_KfacStyle):

    def evaluate(self, global_step, rng, **unused_kwargs):
      evaluated.append((self.mode, self._python_step, self._opt_state,
                        np.asarray(utils.get_first(self._params))))
      return {"eval_loss": 0.0}

  eval_config = _kfac_config("kfac_unset_stat", steps=4)
  with eval_config.unlocked():
    eval_config.one_off_evaluate = True
  _main(_Eval, eval_config, mode="eval", writer_factory=writer.factory)
  assert len(evaluated) == 1
  mode, python_step, opt_state, params = evaluated[0]
  assert mode == "eval"
  assert python_step == 4
  assert opt_state is None  # Not in CHECKPOINT_ATTRS for mode "eval".
  np.testing.assert_array_equal(params, [4.0, 4.0])


def test_kfac_style_nan_statistics_by_design_stop_with_the_difference_named():
  """kfac-jax's adaptive damping reports `rho`/`new_loss` as NaN by design.

  kfac's optimizer fills statistics it did not compute this step with
  `invalid_metric_value` (NaN by default). 0.0.8 logged them and trained
  on; jaxline's NaN guard (on by default) stops the run, with an error that
  names the NaN, what 0.0.8 did and the key that restores it.
  """
  config = _kfac_config("kfac_unset_stat_nan_run", steps=4,
                        invalid_metric_value=float("nan"))
  with pytest.raises(SystemExit) as raised:
    _main(_KfacStyle, config, writer_factory=_RecordingWriter().factory)
  assert raised.value.code == 1
  error = raised.value.__context__
  assert "'rho' is nan" in str(error), error
  assert "jaxline 0.0.8" in str(error)
  assert "config.terminate_on_nan = False" in str(error)

  utils.GLOBAL_CHECKPOINT_DICT = {}
  with config.unlocked():
    config.terminate_on_nan = False
  writer = _RecordingWriter()
  _main(_KfacStyle, config, writer_factory=writer.factory)
  assert writer.steps("train", "loss") == [1, 2, 3, 4]
  rho = writer.values("train", "rho")
  assert [math.isnan(v) for v in rho] == [True, True, False, True]


@dataclasses.dataclass
class _OptimizerState:
  """Like kfac-jax's `Optimizer.State`: a user dataclass made a pytree."""
  velocities: object
  step_counter: object


jax.tree_util.register_pytree_node(
    _OptimizerState,
    lambda s: ((s.velocities, s.step_counter), None),
    lambda _, children: _OptimizerState(*children))


def test_kfac_style_pytree_dataclass_state_with_checkpoint_dir(tmp_path):
  """kfac-jax's config sets `checkpoint_dir` and its opt state is a dataclass.

  kfac-jax registers its state classes as pytrees itself
  (`utils.register_state_class`) and its config sets `checkpoint_dir`
  (for the TensorBoard logs). On 0.0.8 checkpoints stayed in memory, so the
  run saved at every interval and finished; a run in the same process then
  evaluates the trained state. Here that needs
  `checkpoint_backend='memory'`, which the disk checkpointer's error names.
  """

  def make_opt_state():
    return utils.bcast_local_devices(
        _OptimizerState(velocities=jnp.zeros([2]), step_counter=jnp.zeros([])))

  def update_opt_state(state):
    return _OptimizerState(_add_one(state.velocities),
                           _add_one(state.step_counter))

  config = _kfac_config("kfac_unset_stat_pytree_run", steps=4,
                        make_opt_state=make_opt_state,
                        update_opt_state=update_opt_state)
  with config.unlocked():
    config.checkpoint_dir = str(tmp_path / "disk")
  # On disk, a class that a restore may not rebuild is refused at the first
  # save, naming both ways out.
  with pytest.raises(TypeError) as raised:
    _main(_KfacStyle, config, writer_factory=_RecordingWriter().factory)
  assert "_OptimizerState" in str(raised.value)
  assert "register_checkpoint_class" in str(raised.value)
  assert "checkpoint_backend='memory'" in str(raised.value)
  assert "jaxline 0.0.8" in str(raised.value)

  utils.GLOBAL_CHECKPOINT_DICT = {}
  with config.unlocked():
    config.checkpoint_dir = str(tmp_path / "memory")
    config.checkpoint_backend = "memory"
  writer = _RecordingWriter()
  _main(_KfacStyle, config, writer_factory=writer.factory)
  assert writer.steps("train", "loss") == [1, 2, 3, 4]

  evaluated = []

  class _Eval(_KfacStyle):

    def evaluate(self, global_step, rng, **unused_kwargs):
      evaluated.append(self._python_step)
      return {}

  with config.unlocked():
    config.one_off_evaluate = True
  _main(_Eval, config, mode="eval", writer_factory=writer.factory)
  assert evaluated == [4]


# --- eigengame (eg_experiment.py, eg_utils.py) ---------------------------------


def test_eigengame_in_memory_checkpointer_subclass_and_whole_device_arrays():
  """eigengame: an `InMemoryCheckpointer` subclass reading the global dict.

  Its `save` calls `super().save`, then reads
  `utils.GLOBAL_CHECKPOINT_DICT[series].history[-1]` and the live experiment
  through `get_experiment_state(series)`. Per-device arrays live in
  `NON_BROADCAST_CHECKPOINT_ATTRS`, so they are stored whole (with their
  device axis), `step` returns `{}`, `train_checkpoint_all_hosts` is on, and
  it runs `train_eval_multithreaded`, where the eval experiment's mode is
  that mode string.
  """
  saves = []

  class _SaveVectors(utils.InMemoryCheckpointer):

    def save(self, ckpt_series):
      super().save(ckpt_series)
      series = utils.GLOBAL_CHECKPOINT_DICT[ckpt_series]
      live = self.get_experiment_state(ckpt_series)
      newest = series.history[-1]
      saves.append((newest.id, newest.pickle_nest["global_step"],
                    np.asarray(newest.pickle_nest["experiment_module"]
                               ["vectors"]),
                    np.asarray(live.experiment_module.get_vectors())))

  evaluations = []

  class _EigenGame(experiment.AbstractExperiment):
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_vectors": "vectors",
                                      "_opt_state": "opt_state"}

    def __init__(self, mode, init_rng, config):
      super().__init__(mode=mode, init_rng=init_rng)
      self.mode = mode
      self._vectors = utils.bcast_local_devices(jnp.zeros([3]))
      self._opt_state = None if mode != "train" else (
          utils.bcast_local_devices(jnp.zeros([])))

    def get_vectors(self):
      return utils.get_first(self._vectors)

    def step(self, global_step, rng, **unused_kwargs):
      self._vectors = _add_one(self._vectors)
      self._opt_state = _add_one(self._opt_state)
      return {}

    def evaluate(self, global_step, rng, **unused_kwargs):
      evaluations.append((self.mode, int(utils.get_first(global_step)),
                          np.asarray(self._vectors)))
      return {"cosine_similarity_0": float(self.get_vectors()[0])}

  config = _config(training_steps=4, save_checkpoint_interval=2,
                   train_checkpoint_all_hosts=True)
  _main(_EigenGame, config, mode="train_eval_multithreaded",
        checkpointer_factory=_SaveVectors)

  ids = [s[0] for s in saves]
  assert ids == list(range(len(ids)))
  assert [s[1] for s in saves][:2] == [2, 4]  # Periodic saves, then final.
  for _, step, stored, live in saves:
    assert stored.shape == (_n(), 3)  # Whole, with the device axis.
    np.testing.assert_array_equal(stored, np.full((_n(), 3), step))
    np.testing.assert_array_equal(live, np.full(3, step))
  assert evaluations, "evaluate never ran"
  mode, step, vectors = evaluations[-1]
  assert mode == "train_eval_multithreaded"
  assert step == 4
  np.testing.assert_array_equal(vectors, np.full((_n(), 3), 4.0))


# --- tapnet (training/experiment.py, utils/experiment_utils.py) ----------------


class _NumpyFileCheckpointer(utils.Checkpointer):
  """tapnet's checkpointer: one .npy file, only the "latest" series."""

  def __init__(self, config, mode):
    del mode
    self._file = os.path.join(config.checkpoint_dir, "checkpoint.npy")
    self._state = config_dict.ConfigDict()

  def get_experiment_state(self, ckpt_series):
    if ckpt_series != "latest":
      raise ValueError("multiple checkpoint series are not supported")
    return self._state

  def save(self, ckpt_series):
    if ckpt_series != "latest":
      raise ValueError("multiple checkpoint series are not supported")
    module = self._state.experiment_module
    to_save = {name: np.asarray(jax.device_get(utils.get_first(
        getattr(module, attr)))) for attr, name in
               module.CHECKPOINT_ATTRS.items()}
    to_save["global_step"] = self._state.global_step
    with open(self._file + "_tmp", "wb") as f:
      np.save(f, to_save)
    os.replace(self._file + "_tmp", self._file)

  def can_be_restored(self, ckpt_series):
    if ckpt_series != "latest":
      raise ValueError("multiple checkpoint series are not supported")
    return os.path.exists(self._file)

  def restore(self, ckpt_series):
    state = self.get_experiment_state(ckpt_series)
    with open(self._file, "rb") as f:
      saved = np.load(f, allow_pickle=True).item()
    state.global_step = int(saved["global_step"])
    module = state.experiment_module
    for attr, name in module.CHECKPOINT_ATTRS.items():
      setattr(module, attr, utils.bcast_local_devices(saved[name]))

  def restore_path(self, ckpt_series):
    return self._file if self.can_be_restored(ckpt_series) else None

  def wait_for_checkpointing_to_finish(self):
    pass

  @classmethod
  def create(cls, config, mode):
    return cls(config, mode)


def test_tapnet_file_checkpointer_resume_and_evaluate_with_mode(tmp_path):
  """tapnet: its own `utils.Checkpointer` subclass and `evaluate(mode=...)`.

  The checkpointer supports only "latest", returns one ConfigDict for every
  series and is passed as `checkpointer_factory=Cls.create`. `step` takes
  `*unused_args, **unused_kwargs`, initializes lazily unless restored, and
  calls `self.evaluate(global_step, rng=rng, mode=...)` itself every few
  steps. A second training run resumes from the file; an `eval_*` mode
  reaches the constructor and is the default `mode` of `evaluate`.
  """
  first_steps = []
  modes = []

  class _Tapnet(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}

    def __init__(self, mode, init_rng, config):
      super().__init__(mode=mode, init_rng=init_rng)
      self.mode = mode
      self.config = config
      modes.append(mode)
      self._params = None
      self._opt_state = None
      self._stepped = False

    def step(self, global_step, rng, *unused_args, **unused_kwargs):
      if not self._stepped:
        first_steps.append(int(utils.get_first(global_step)))
        self._stepped = True
      if self._params is None:
        self._params = utils.bcast_local_devices(jnp.zeros([2]))
      if self._opt_state is None:
        self._opt_state = utils.bcast_local_devices(jnp.zeros([]))
      self._params = _add_one(self._params)
      scalars = {"loss": float(utils.get_first(self._params)[0])}
      if (int(utils.get_first(global_step)) + 1) % 2 == 0:
        for mode in self.config.eval_modes:
          scalars.update(self.evaluate(global_step, rng=rng, mode=mode))
      return scalars

    def evaluate(self, global_step, rng, mode=None, **unused_args):
      mode = mode or self.mode
      return {f"eval/{mode}/params": float(utils.get_first(self._params)[0])}

  def config_for(steps):
    config = _config(training_steps=steps, checkpoint_dir=str(tmp_path),
                     save_checkpoint_interval=2, eval_initial_weights=True)
    config.experiment_kwargs.config.eval_modes = ("eval_davis_points",)
    return config

  writer = _RecordingWriter()
  _main(_Tapnet, config_for(2), writer_factory=writer.factory,
        checkpointer_factory=_NumpyFileCheckpointer.create)
  _main(_Tapnet, config_for(4), writer_factory=writer.factory,
        checkpointer_factory=_NumpyFileCheckpointer.create)
  assert first_steps == [0, 2]  # The second run resumed from the file.
  assert writer.values("train", "eval/eval_davis_points/params") == [2.0, 4.0]

  _main(_Tapnet, config_for(4), mode="eval_davis_points",
        writer_factory=writer.factory,
        checkpointer_factory=_NumpyFileCheckpointer.create)
  assert modes == ["train", "train", "eval_davis_points"]
  assert [(s, v) for m, s, v in writer.scalars
          if m == "eval_davis_points"] == [
              (4, {"eval/eval_davis_points/params": 4.0})]


# --- emergent_communication_at_scale -------------------------------------------


def test_emergent_communication_train_loop_and_snapshot_overrides():
  """emergent_communication_at_scale: `train_loop` and snapshot overrides.

  `ExperimentWithCheckpointing.train_loop` appends a synchronous
  `utils.PeriodicAction` with `periodic_actions += (...)`, calls
  `update_time` on every action and then `super().train_loop`;
  `EaseOfLearningExperiment` passes `list(periodic_actions) + [collector]`,
  a duck-typed action that sees every step's scalars. `snapshot_state`
  and `restore_from_snapshot` call `super()` and add their own entries,
  which an eval run in the same process gets back.
  """
  saved_at = []
  collected = []
  restored = []

  class _Population:
    def __init__(self):
      self.params = utils.bcast_local_devices(jnp.zeros([2]))

  class _Lewis(experiment.AbstractExperiment):

    def __init__(self, mode, init_rng, config):
      super().__init__(mode=mode, init_rng=init_rng)
      self._population = _Population()

    def snapshot_state(self):
      snapshot = super().snapshot_state()
      return {**snapshot,
              "params": utils.get_first(self._population.params)}

    def restore_from_snapshot(self, snapshot_state):
      super().restore_from_snapshot(snapshot_state)
      self._population.params = utils.bcast_local_devices(
          snapshot_state["params"])
      restored.append(np.asarray(self._population.params))

    def train_loop(self, config, state, periodic_actions, writer=None):
      step = state.global_step
      periodic_actions += (utils.PeriodicAction(
          lambda x, *_: saved_at.append(x), interval_type="steps",
          interval=config.experiment_kwargs.config.save_every,
          run_async=False),)

      class _Collector:
        def update_time(self, t, step):
          del t, step

        def __call__(self, t, step, scalar_outputs):
          collected.append((step, scalar_outputs["global_accuracy"]))

      for action in periodic_actions:
        action.update_time(time.time(), step)
      super().train_loop(config, state,
                         list(periodic_actions) + [_Collector()], writer)

    def step(self, global_step, rng, **unused_kwargs):
      self._population.params = _add_one(self._population.params)
      return {"global_accuracy": utils.get_first(self._population.params)[0]}

    def evaluate(self, global_step, rng, **unused_kwargs):
      return {"acc": float(utils.get_first(self._population.params)[0])}

  config = _config(training_steps=4)
  config.experiment_kwargs.config.save_every = 2
  writer = _RecordingWriter()
  _main(_Lewis, config, writer_factory=writer.factory)
  assert saved_at == [2, 4]
  assert [step for step, _ in collected] == [1, 2, 3, 4]
  assert [float(v) for _, v in collected] == [1.0, 2.0, 3.0, 4.0]

  eval_config = _config(training_steps=4, one_off_evaluate=True)
  eval_config.experiment_kwargs.config.save_every = 2
  _main(_Lewis, eval_config, mode="eval_test_average",
        writer_factory=writer.factory)
  np.testing.assert_array_equal(restored[-1], np.full((_n(), 2), 4.0))
  assert [(m, s) for m, s, _ in writer.scalars if m != "train"] == [
      ("eval_test_average", 4)]


def test_emergent_communication_rebinding_global_dict_starts_fresh(tmp_path,
                                                                  caplog):
  """emergent_communication_at_scale's eol test: a fresh start after rebinding.

  The test trains a Lewis experiment with `train.train` and a checkpointer
  and writer from `platform.create_checkpointer/create_writer` (its config
  sets `checkpoint_dir`), then sets `utils.GLOBAL_CHECKPOINT_DICT = {}` and
  trains an ease-of-learning experiment with the same checkpointer. On
  0.0.8 the second training starts from step 0 and runs its step; here it
  does with `checkpoint_backend='memory'`, and on disk it resumes, with a
  warning that names the difference.
  """
  steps = []

  class _Lewis(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_params": "params"}

    def __init__(self, mode, init_rng, config):
      super().__init__(mode=mode, init_rng=init_rng)
      self._params = utils.bcast_local_devices(jnp.zeros([2]))

    def step(self, global_step, rng, **unused_kwargs):
      steps.append((type(self).__name__, int(utils.get_first(global_step))))
      self._params = _add_one(self._params)
      return {"global_accuracy": 0.5}

    def evaluate(self, global_step, rng, **unused_kwargs):
      return {}

  class _EaseOfLearning(_Lewis):
    pass

  def run_both(checkpoint_dir, **overrides):
    config = _config(training_steps=1, checkpoint_dir=checkpoint_dir,
                     **overrides)
    checkpointer = platform.create_checkpointer(config, "train")
    writer = platform.create_writer(config, "train")
    train.train(_Lewis, config, checkpointer, writer)
    utils.GLOBAL_CHECKPOINT_DICT = {}
    config = _config(training_steps=1, checkpoint_dir=checkpoint_dir,
                     **overrides)
    train.train(_EaseOfLearning, config, checkpointer, writer)
    writer.close()

  # As on 0.0.8, with checkpoints in memory.
  run_both(str(tmp_path / "memory"), checkpoint_backend="memory")
  assert steps == [("_Lewis", 0), ("_EaseOfLearning", 0)]

  # On disk the second run resumes the first one's checkpoint, and says why.
  steps.clear()
  utils.GLOBAL_CHECKPOINT_DICT = {}  # Else the in-memory history would win.
  with caplog.at_level(pylogging.WARNING):
    run_both(str(tmp_path / "disk"))
  assert steps == [("_Lewis", 0)]
  warnings = [r.getMessage() for r in caplog.records
              if "which this process saved earlier" in r.getMessage()]
  assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
  assert "jaxline 0.0.8 kept checkpoints in memory" in warnings[0]
  assert "checkpoint_backend='memory'" in warnings[0]


# --- distribution_shift_framework (classification/experiment_lib.py) -----------


def _dsf_experiment(algorithm_leaves, calls):
  """One algorithm of distribution_shift_framework: its own param tree."""

  class _Experiment(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_params": "params", "_d_params": "d_params"}

    def __init__(self, mode, init_rng, config):
      super().__init__(mode=mode, init_rng=init_rng)
      self.config = config
      self._params = utils.bcast_local_devices(jnp.zeros([2]))
      self._d_params = utils.bcast_local_devices(
          {name: jnp.zeros([1]) for name in algorithm_leaves})
      self._writer = None

    def step(self, *, global_step, rng, writer):
      calls.append(("step", int(utils.get_first(global_step))))
      self._params = _add_one(self._params)
      images = np.linspace(0.0, 1.0, _n() * 2 * 4 * 4 * 3, dtype=np.float32)
      images = images.reshape([_n(), 2, 4, 4, 3])
      if self.config.save_images:
        writer.write_images(np.array(utils.get_first(global_step)),
                            {"images": utils.get_first(images)})
      return {"loss": utils.get_first(self._params)[0], "top1_acc": 0.25}

    def evaluate(self, *, global_step, rng, writer):
      self._writer = writer  # Kept for on_new_best_model.
      calls.append(("evaluate", int(utils.get_first(global_step))))
      return {"top1_accuracy": np.array(0.5)}

    def on_new_best_model(self, best_state):
      calls.append(("best", best_state.global_step,
                    best_state.best_eval_metric_value))
      if self._writer is not None:
        self._writer.write_scalars(best_state.global_step, {"full_eval": 1.0})

  return _Experiment


def _dsf_config(tmp_path, save_images=False):
  config = _config(training_steps=3, checkpoint_dir=str(tmp_path))
  config.best_model_eval_metric = "top1_accuracy"
  config.experiment_kwargs.config.save_images = save_images
  return config


def test_dsf_images_from_step_and_writer_kept_for_best_model(tmp_path):
  """distribution_shift_framework: `write_images` from `step`, best model.

  `step` writes images with the writer it is given; `evaluate` returns a
  0-d numpy array as the tracked metric and keeps the writer, which
  `on_new_best_model` uses to write a full evaluation at the best step.
  """
  calls = []
  exp = _dsf_experiment(["linear"], calls)
  _main(exp, _dsf_config(tmp_path, save_images=True))
  _main(exp, _dsf_config(tmp_path, save_images=True), mode="eval")
  assert calls[:3] == [("step", 0), ("step", 1), ("step", 2)]
  assert calls[3:] == [("evaluate", 3), ("best", 3, 0.5)]
  assert isinstance(calls[-1][2], float)

  train_events = conftest.read_events(tmp_path / "train")
  image_tags = (train_events.Tags()[event_accumulator.TENSORS] +
                train_events.Tags()[event_accumulator.IMAGES])
  assert "images" in image_tags
  eval_events = conftest.read_events(tmp_path / "eval")
  assert [e.step for e in eval_events.Scalars("top1_accuracy")] == [3]
  assert [e.step for e in eval_events.Scalars("full_eval")] == [3]


def test_dsf_parameterized_runs_share_checkpoint_dir_in_one_process(tmp_path):
  """distribution_shift_framework's experiment_lib_test, two cases in a row.

  Its parameterized test runs `platform.main(Experiment, [])` under
  `flagsaver(config=cfg, jaxline_mode='train')` once per algorithm, in one
  process, with one fixed `checkpoint_dir` (its config says '/tmp'). The
  algorithms have different parameter trees. On 0.0.8 every case passes,
  as here with `checkpoint_backend='memory'`.
  """
  def memory_config():
    config = _dsf_config(tmp_path / "memory")
    config.checkpoint_backend = "memory"
    return config

  calls = []
  _main(_dsf_experiment(["coral"], calls), memory_config())
  _main(_dsf_experiment(["dann_a", "dann_b"], calls), memory_config())
  # Both cases complete. As on 0.0.8, the second restores the first one's
  # in-memory checkpoint (at training_steps), so it trains no step.
  assert [c for c in calls if c[0] == "step"] == [
      ("step", 0), ("step", 1), ("step", 2)]

  # On disk the second case meets the first one's checkpoint: an error that
  # names the entry and the difference from 0.0.8.
  utils.GLOBAL_CHECKPOINT_DICT = {}  # Else the in-memory history would win.
  _main(_dsf_experiment(["coral"], []), _dsf_config(tmp_path / "disk"))
  with pytest.raises(ValueError) as raised:
    _main(_dsf_experiment(["dann_a", "dann_b"], []),
          _dsf_config(tmp_path / "disk"))
  assert "'d_params'" in str(raised.value)
  assert "jaxline 0.0.8 kept checkpoints in memory" in str(raised.value)
  assert "checkpoint_backend='memory'" in str(raised.value)


# --- adversarial_robustness (jax/experiment.py, jax/experiment_test.py) --------


class _Robust(experiment.AbstractExperiment):
  """adversarial_robustness's Experiment, reduced to its jaxline usage."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  jitted_with_tracer = []

  def __init__(self, mode, config, init_rng):
    super().__init__(mode=mode)
    self.config = config
    self.mode = mode
    self.sync_evals = []
    self.evals = []
    if mode not in ("train", "eval", "train_eval_multithreaded"):
      raise ValueError(f'Unknown mode: "{mode}"')
    self._params = utils.bcast_local_devices(jnp.zeros([2]))
    self._train_fn = jax.pmap(lambda p: p + 1.0)
    self._probe = jax.jit(
        lambda x: _Robust.jitted_with_tracer.append(
            isinstance(x, jax.core.Tracer)) or x)

  def step(self, global_step, rng, *unused_args, **unused_kwargs):
    self._params = self._train_fn(self._params)
    self._probe(jnp.ones([]))
    step = int(utils.get_first(global_step))
    scalars = {"train_loss": utils.get_first(self._params)[0]}
    if step == FLAGS.config.get("training_steps", 1) - 1:
      eval_scalars = self.evaluate(global_step, rng)
      self.sync_evals.append(step)
      scalars.update({f"eval_{k}": v for k, v in eval_scalars.items()})
    return scalars

  def evaluate(self, global_step, rng, *unused_args, **unused_kwargs):
    value = float(utils.get_first(self._params)[0])
    self.evals.append(value)
    return {"top_1_acc": value}


def test_adversarial_robustness_constructor_order_flags_config_and_modes():
  """adversarial_robustness: `(mode, config, init_rng)` and FLAGS.config.

  The constructor takes `config` before `init_rng` and calls
  `super().__init__(mode=mode)`; it raises for modes it does not know.
  `step` reads `flags.FLAGS.config` (the very object given to jaxline) and
  runs a synchronous `self.evaluate(global_step, rng)` at the last step.
  The config carries `eval_specific_checkpoint_dir=''`.
  """
  built = []

  class _Recorded(_Robust):

    def __init__(self, mode, config, init_rng):
      super().__init__(mode, config, init_rng)
      built.append(self)

  config = _config(training_steps=3, eval_specific_checkpoint_dir="")
  writer = _RecordingWriter()
  _main(_Recorded, config, writer_factory=writer.factory)
  assert built[0].sync_evals == [2]
  assert writer.values("train", "eval_top_1_acc") == [3.0]

  eval_config = _config(training_steps=3, eval_specific_checkpoint_dir="",
                        one_off_evaluate=True)
  _main(_Recorded, eval_config, mode="eval", writer_factory=writer.factory)
  assert [b.mode for b in built] == ["train", "eval"]
  assert built[1].evals == [3.0]

  with pytest.raises(ValueError, match="Unknown mode"):
    _main(_Recorded, eval_config, mode="eval_other",
          writer_factory=writer.factory)


def test_adversarial_robustness_disable_pmap_jit_decorated_test():
  """adversarial_robustness's experiment_test: `@utils.disable_pmap_jit`.

  Its test function, decorated with `utils.disable_pmap_jit`, builds the
  experiment and calls `xp.step(global_step, rng)` positionally with
  pmapped inputs; run with `--jaxline_disable_pmap_jit=True`, functions
  the experiment jits in its constructor then run eagerly.
  """

  @utils.disable_pmap_jit
  def take_one_step():
    xp = _Robust("train", config_dict.ConfigDict(), jax.random.PRNGKey(0))
    bcast = jax.pmap(lambda x: x)
    global_step = bcast(jnp.zeros(_n()))
    rng = bcast(jnp.stack([jax.random.PRNGKey(0)] * _n()))
    return xp.step(global_step, rng)

  config = _config(training_steps=10)
  _Robust.jitted_with_tracer.clear()
  with flagsaver.flagsaver(config=config, jaxline_disable_pmap_jit=True):
    result = take_one_step()
  assert float(result["train_loss"]) == 1.0
  assert _Robust.jitted_with_tracer == [False]
  with flagsaver.flagsaver(config=config, jaxline_disable_pmap_jit=False):
    take_one_step()
  assert _Robust.jitted_with_tracer == [False, True]


def test_adversarial_robustness_object_config_values_do_not_warn(
    tmp_path, caplog):
  """adversarial_robustness keeps functions and objects in experiment_kwargs.

  Its config holds a learning-rate schedule (a closure), a model class and
  attack objects, rebuilt by `get_config()` in every process. Resuming or
  evaluating under an unchanged config must not warn that the checkpoint
  was written under other `experiment_kwargs` (only the objects' memory
  addresses differ).
  """

  class _Attack:
    def __init__(self, steps):
      self.steps = steps

  def config_for(steps):
    config = _config(training_steps=steps, checkpoint_dir=str(tmp_path),
                     save_checkpoint_interval=2)
    config.experiment_kwargs.config.learning_rate = (
        lambda step, base=0.1: base * step)  # A new closure each time.
    config.experiment_kwargs.config.attack = _Attack(10)
    config.experiment_kwargs.config.constructor = _Attack
    return config

  writer = _RecordingWriter()
  _main(_Robust, config_for(2), writer_factory=writer.factory)
  with caplog.at_level(pylogging.WARNING):
    _main(_Robust, config_for(4), writer_factory=writer.factory)
  assert writer.steps("train", "train_loss") == [1, 2, 3, 4]
  warnings = [r.getMessage() for r in caplog.records
              if "other experiment_kwargs" in r.getMessage()]
  assert not warnings, warnings


# --- jax_privacy (training/jaxline.py, run_experiment_jaxline.py) --------------


class _Updater:
  """jax_privacy's experiment object, wrapped for jaxline by a partial."""

  def __init__(self, max_num_updates):
    self.max_num_updates = max_num_updates
    self.rendezvous_calls = 0

  def _inputs(self):
    for i in range(1000):
      yield np.full([_n(), 2], float(i), np.float32)

  def initialize(self, rng):
    del rng
    utils.rendezvous()  # As its image_classification experiment does.
    self.rendezvous_calls += 1
    return (utils.bcast_local_devices(jnp.zeros([2])), 0,
            utils.py_prefetch(self._inputs))

  def update(self, state, inputs_producer, step_on_host):
    batch = inputs_producer()
    return _add_one(state), {"batch_mean": float(batch.mean())}, (
        step_on_host + 1)

  def evaluate(self, state, step_on_host):
    return {"params": float(utils.get_first(state)[0]),
            "step_on_host": step_on_host}


class _PrivacyWrapper(experiment.AbstractExperiment):
  """jax_privacy's JaxlineWrapper: never calls `super().__init__`."""

  CHECKPOINT_ATTRS = {"_updater_state": "updater_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_step_on_host": "step_on_host"}

  def __init__(self, mode, config, init_rng, *, experiment):  # pylint: disable=redefined-outer-name
    del mode, config
    self._init_rng = init_rng
    self._experiment = experiment
    self._step_on_host = None
    self._updater_state = None
    self._train_input = None

  def step(self, *, global_step, rng, writer):
    del global_step, rng, writer
    if self._train_input is None:
      state, step_on_host, self._train_input = self._experiment.initialize(
          self._init_rng)
      if self._updater_state is None:
        self._updater_state = state
      if self._step_on_host is None:
        self._step_on_host = step_on_host
    self._updater_state, scalars, self._step_on_host = self._experiment.update(
        state=self._updater_state,
        inputs_producer=functools.partial(next, self._train_input),
        step_on_host=self._step_on_host)
    return {f"train/{k}": v for k, v in scalars.items()}

  def should_run_step(self, unused_global_step, unused_config):
    if self._step_on_host is None:
      return True
    return self._step_on_host < self._experiment.max_num_updates

  def evaluate(self, *, global_step, rng, writer):
    del global_step, rng, writer
    scalars = self._experiment.evaluate(state=self._updater_state,
                                        step_on_host=self._step_on_host)
    return {f"eval/{k}": v for k, v in scalars.items()}


def test_jax_privacy_partial_wrapper_and_host_step_counter():
  """jax_privacy: `functools.partial(JaxlineWrapper, experiment=...)`.

  The experiment class is a partial; the wrapper takes `(mode, config,
  init_rng, *, experiment)`, never calls `super().__init__`, decides when to
  stop from its own host counter (`training_steps` is far too large), keeps
  that counter in `NON_BROADCAST_CHECKPOINT_ATTRS`, reads its input through
  `utils.py_prefetch` and calls `utils.rendezvous()` while initializing.
  """
  updater = _Updater(max_num_updates=3)
  experiment_class = functools.partial(_PrivacyWrapper, experiment=updater)
  config = _config(training_steps=1_000_000)
  writer = _RecordingWriter()
  _main(experiment_class, config, writer_factory=writer.factory)
  assert writer.values("train", "train/batch_mean") == [0.0, 1.0, 2.0]
  assert updater.rendezvous_calls == 1

  eval_config = _config(training_steps=1_000_000, one_off_evaluate=True)
  _main(experiment_class, eval_config, mode="eval",
        writer_factory=writer.factory)
  assert [(m, s, v) for m, s, v in writer.scalars if m == "eval"] == [
      ("eval", 3, {"eval/params": 3.0, "eval/step_on_host": 3})]


# --- ogb_lsc (mag/experiment.py, pcq/experiment.py) ----------------------------


def test_ogb_lsc_seeded_global_dict_with_checkpoint_dir(tmp_path):
  """ogb_lsc: a pretrained state seeded into `GLOBAL_CHECKPOINT_DICT`.

  With `--config.restore_path`, ogb_lsc builds a dummy experiment holding
  per-device parameters and assigns `utils.GLOBAL_CHECKPOINT_DICT['latest']
  = utils.CheckpointNT(threading.local(), [utils.SnapshotNT(0, {...})])`
  before `platform.main`; afterwards it reads
  `history[-1].pickle_nest['global_step']` to save the model. Its config
  always sets `checkpoint_dir`. Training must start from the seeded state.
  """
  first = []

  class _Ogb(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_params": "params"}

    def __init__(self, mode, init_rng, config):
      super().__init__(mode=mode, init_rng=init_rng)
      self._params = utils.bcast_local_devices(jnp.zeros([2]))

    def step(self, global_step, rng, **unused_kwargs):
      if not first:
        first.append((int(utils.get_first(global_step)),
                      np.asarray(utils.get_first(self._params))))
      self._params = _add_one(self._params)
      return {"loss": 0.0}

    def evaluate(self, global_step, rng, **unused_kwargs):
      return {}

  config = _config(training_steps=9, checkpoint_dir=str(tmp_path))
  config.restore_path = "/pretrained/ogb"
  pretrained = _Ogb("train", jax.random.PRNGKey(0), config)
  pretrained._params = utils.bcast_local_devices(jnp.full([2], 7.0))  # pylint: disable=protected-access
  utils.GLOBAL_CHECKPOINT_DICT["latest"] = utils.CheckpointNT(
      threading.local(),
      [utils.SnapshotNT(0, dict(global_step=7,
                                experiment_module=pretrained))])
  _main(_Ogb, config)
  assert first and first[0][0] == 7
  np.testing.assert_array_equal(first[0][1], [7.0, 7.0])
  newest = utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1]
  assert newest.pickle_nest["global_step"] == 9


# --- c3_neural_compression (experiments/base.py, experiments/image.py) ---------


def test_c3_single_step_no_periodic_save_and_unused_evaluate(tmp_path):
  """c3_neural_compression: one `step` that does all the work, train only.

  Its config has `training_steps=1`, `save_checkpoint_interval=-1` and a
  `checkpoint_dir`; `step(self, *, global_step, rng, writer)` indexes the
  per-device key (`rng[0]`) and returns JAX scalars (means over images) and
  per-image values; `evaluate` raises, because the project never evaluates,
  so training must not call it.
  """
  calls = []

  class _C3(experiment.AbstractExperiment):

    def __init__(self, mode, init_rng, config):
      super().__init__(mode=mode, init_rng=init_rng)

    def step(self, *, global_step, rng, writer):
      key = rng[0]
      calls.append(tuple(np.asarray(key).shape))
      per_image = {"psnr": [30.0, 32.0], "bpp": [0.5, 0.7]}
      metrics = {k: jnp.mean(jnp.array(v)) for k, v in per_image.items()}
      for i in range(2):
        metrics |= {f"{k}_{i}": v[i] for k, v in per_image.items()}
      return metrics

    def evaluate(self, global_step, rng, writer):
      raise NotImplementedError()

  config = _config(training_steps=1, save_checkpoint_interval=-1,
                   checkpoint_dir=str(tmp_path), eval_specific_checkpoint_dir="")
  config.random_seed = 0
  writer = _RecordingWriter()
  _main(_C3, config, writer_factory=writer.factory)
  assert len(calls) == 1
  assert calls[0] in ((2,), ())  # Raw or typed key, one device's.
  assert [(s, round(float(v["psnr"]), 3), v["bpp_1"])
          for _, s, v in writer.scalars] == [(1, 31.0, 0.7)]


# --- Config files: their own errors ---------------------------------------------


def test_error_inside_get_config_is_not_reported_as_an_override(tmp_path):
  """A config file whose `get_config` fails shows that error, not ours.

  distribution_shift_framework's `get_config` locks its ConfigDict; any
  later assignment there of a key it lacks raises inside the config file.
  Run with no `--config.` overrides at all, the user must see their own
  error and where it happened, as with 0.0.8, not a message blaming an
  override.
  """
  script = os.path.join(_TESTDATA, "locked_config_experiment.py")
  result = conftest.run_python(
      [sys.executable, script, f"--config={script}"], cwd=str(tmp_path),
      env=conftest.subprocess_env(), timeout=_TIMEOUT_SECS)
  output = result.stdout + result.stderr
  assert result.returncode != 0, output[-3000:]
  assert "override" not in output, output[-3000:]
  assert "host_subdir" in output, output[-3000:]
  assert "locked_config_experiment.py" in output, output[-3000:]
