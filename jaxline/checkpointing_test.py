"""Tests for `jaxline.checkpointing.DiskCheckpointer` (Orbax on disk).

The experiment state is set up as `train.train` and `train.evaluate` set it
up (a ConfigDict with `global_step`, `experiment_module`, `train_step_rng`),
and every test reads real checkpoints back from disk, with a new
checkpointer, as a restarted process would.
"""

import json
import logging as pylogging
import os
import shutil
import subprocess
import sys
import threading
import time

from conftest import subprocess_env
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxline import base_config
from jaxline import checkpointing
from jaxline import experiment
from jaxline import platform
from jaxline import serialization
from jaxline import train
from jaxline import utils

_SIDE_EFFECTS = []


def _side_effect(*args, **kwargs):
  _SIDE_EFFECTS.append((args, kwargs))
  return ()


class _Opaque:
  """Needs pickle; unpickling it calls `_side_effect`."""

  def __reduce__(self):
    return (_side_effect, ("unpickled",))


@pytest.fixture(autouse=True)
def _clean_state(fresh_jaxline_state):
  del fresh_jaxline_state
  _SIDE_EFFECTS.clear()
  yield
  _SIDE_EFFECTS.clear()


def _n():
  return jax.local_device_count()


def _params(seed):
  """Haiku-style nested parameters, distinct per seed."""
  rng = np.random.default_rng(seed)
  return {
      "mlp/~/linear_0": {"w": rng.normal(size=(3, 4)).astype(np.float32),
                         "b": rng.normal(size=(4,)).astype(np.float32)},
      "mlp/~/linear_1": {"w": rng.normal(size=(4, 2)).astype(jnp.bfloat16),
                         "b": np.zeros((2,), np.float32)},
  }


def _optimizer():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


class _Exp(experiment.AbstractExperiment):
  """Lazily created state, as most jaxline experiments have it."""

  CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_position": "data_position",
                                    "_host": "host_state"}

  def __init__(self, mode, init_rng=None):
    super().__init__(mode=mode, init_rng=init_rng)
    self._params = None
    self._opt_state = None
    self._position = 0
    self._host = None

  def fill(self, seed):
    """What the first `step` would create."""
    params = jax.tree.map(jnp.asarray, _params(seed))
    optimizer = _optimizer()
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    self._params = utils.bcast_local_devices(params)
    self._opt_state = utils.bcast_local_devices(opt_state)
    self._position = seed * 10
    self._host = {"history": np.arange(seed + 1, dtype=np.int64),
                  "best": np.float32(seed / 2), "names": ["a", "b"],
                  "pair": (seed, 2.5), "nothing": None}

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def _config(tmp_path, **overrides):
  config = base_config.get_base_config()
  config.checkpoint_dir = str(tmp_path / "run")
  for key, value in overrides.items():
    config[key] = value
  return config


def _train_state(checkpointer, exp, step=0, key=None, series="latest"):
  """The live state as `train.train` builds it."""
  state = checkpointer.get_experiment_state(series)
  state.global_step = step
  state.experiment_module = exp
  key = jax.random.PRNGKey(42) if key is None else key
  state.train_step_rng = exp.initialize_train_step_rng(key)
  return state


def _fresh(config, mode="train", exp_class=_Exp, **kwargs):
  """A new checkpointer and experiment, as after a restart."""
  checkpointer = checkpointing.DiskCheckpointer(config, mode, **kwargs)
  exp = exp_class(mode)
  state = _train_state(checkpointer, exp, key=jax.random.PRNGKey(0))
  return checkpointer, exp, state


def _save(config, seed, step, series="latest", **kwargs):
  checkpointer, exp, state = _fresh(config, **kwargs)
  exp.fill(seed)
  state.global_step = step
  checkpointer.save(series)
  checkpointer.wait_for_checkpointing_to_finish()
  return checkpointer, exp


def _series_dir(config, series="latest"):
  return os.path.join(config.checkpoint_dir, "checkpoints", series)


def _committed_steps(config, series="latest"):
  directory = _series_dir(config, series)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _assert_per_device(x):
  assert isinstance(x, jax.Array)
  assert x.shape[0] == _n()
  assert x.sharding.device_set == set(jax.local_devices())


def _assert_tree_bits_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape
    assert a.tobytes() == e.tobytes()


def _assert_filled(exp, seed):
  """`exp` holds exactly what `_Exp.fill(seed)` put there."""
  want = _Exp("train")
  want.fill(seed)
  for attr in ("_params", "_opt_state"):
    jax.tree.map(_assert_per_device, getattr(exp, attr))
    _assert_tree_bits_equal(getattr(exp, attr), getattr(want, attr))
  assert exp._position == seed * 10 and type(exp._position) is int
  _assert_tree_bits_equal(exp._host, want._host)
  assert type(exp._host["history"]) is np.ndarray
  assert type(exp._host["best"]) is np.float32
  assert exp._host["names"] == ["a", "b"]
  assert exp._host["pair"] == (seed, 2.5)
  assert exp._host["nothing"] is None
  # optax's NamedTuple states come back as themselves.
  clip_state, adam_state = exp._opt_state
  assert type(adam_state[0]) is type(want._opt_state[1][0])
  assert type(clip_state) is type(want._opt_state[0])


# --- Factory and helpers -----------------------------------------------------


def test_create_checkpointer_is_on_disk_when_checkpoint_dir_is_set(tmp_path):
  config = _config(tmp_path)
  checkpointer = platform.create_checkpointer(config, "train")
  assert isinstance(checkpointer, checkpointing.DiskCheckpointer)
  # Checked writable at construction: the directory is there already.
  assert os.path.isdir(os.path.join(config.checkpoint_dir, "checkpoints"))
  in_memory = platform.create_checkpointer(base_config.get_base_config(),
                                           "train")
  assert isinstance(in_memory, utils.InMemoryCheckpointer)
  empty = _config(tmp_path, checkpoint_dir="")
  assert isinstance(platform.create_checkpointer(empty, "train"),
                    utils.InMemoryCheckpointer)


def test_get_checkpoint_dir_creates_it_and_needs_the_key(tmp_path):
  config = _config(tmp_path, checkpoint_dir=str(tmp_path / "a" / "b"))
  assert utils.get_checkpoint_dir(config, 3) == str(tmp_path / "a" / "b")
  assert os.path.isdir(tmp_path / "a" / "b")
  with pytest.raises(ValueError, match="checkpoint_dir"):
    utils.get_checkpoint_dir(base_config.get_base_config(), 0)


def test_in_memory_restore_accepts_the_old_snapshot_layout():
  """D1: ogb_lsc plants a 0.0.8-style entry holding an experiment instance."""
  old = _Exp("train")
  old.fill(3)
  utils.GLOBAL_CHECKPOINT_DICT["latest"] = utils.CheckpointNT(
      threading.local(), [utils.SnapshotNT(0, {
          "global_step": np.int64(12), "experiment_module": old})])
  checkpointer = platform.create_checkpointer(base_config.get_base_config(),
                                              "train")
  exp = _Exp("train")
  state = _train_state(checkpointer, exp)
  assert checkpointer.can_be_restored("latest")
  checkpointer.restore("latest")
  assert state.global_step == 12 and type(state.global_step) is int
  assert exp._params is old._params  # Per-device values, not re-broadcast.
  assert exp._position == 30


# --- Round trips -------------------------------------------------------------


def test_save_then_restore_in_a_new_checkpointer(tmp_path):
  config = _config(tmp_path)
  _, saved = _save(config, seed=1, step=7)
  saved_rng = np.asarray(utils.get_first(
      saved.initialize_train_step_rng(jax.random.PRNGKey(0))))
  checkpointer, exp, state = _fresh(config)
  assert exp._params is None  # Lazily created: nothing yet.
  assert checkpointer.can_be_restored("latest") is True
  checkpointer.restore("latest")
  _assert_filled(exp, seed=1)
  assert state.global_step == 7 and type(state.global_step) is int
  _assert_per_device(state.train_step_rng)
  np.testing.assert_array_equal(np.asarray(state.train_step_rng),
                                np.tile(saved_rng, (_n(), 1)))


def test_training_rng_state_is_the_saved_one(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  exp.fill(0)
  state.train_step_rng = exp.initialize_train_step_rng(
      jax.random.PRNGKey(1234))
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  reader, _, restored = _fresh(config)
  before = np.asarray(restored.train_step_rng).copy()
  reader.restore("latest")
  np.testing.assert_array_equal(
      np.asarray(restored.train_step_rng),
      np.tile(np.asarray(jax.random.PRNGKey(1234)), (_n(), 1)))
  assert not np.array_equal(before, np.asarray(restored.train_step_rng))


def test_typed_key_rng_state_round_trips(tmp_path):
  config = _config(tmp_path)
  checkpointer = checkpointing.DiskCheckpointer(config, "train")
  exp = _Exp("train")
  exp.fill(0)
  _train_state(checkpointer, exp, key=jax.random.key(9))
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  reader = checkpointing.DiskCheckpointer(config, "train")
  restored = _train_state(reader, _Exp("train"), key=jax.random.key(1))
  reader.restore("latest")
  keys = restored.train_step_rng
  assert jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
  assert keys.shape == (_n(),)
  _assert_per_device(keys)
  np.testing.assert_array_equal(
      np.asarray(jax.random.key_data(keys)),
      np.tile(np.asarray(jax.random.key_data(jax.random.key(9))), (_n(), 1)))


def test_state_saved_before_the_first_step_restores_as_none(tmp_path):
  config = _config(tmp_path)
  checkpointer, _, state = _fresh(config)
  state.global_step = 0
  checkpointer.save("latest")  # save_initial_train_checkpoint: all None.
  checkpointer.wait_for_checkpointing_to_finish()
  reader, exp, restored = _fresh(config)
  exp.fill(5)  # Whatever is live is replaced by the saved None.
  reader.restore("latest")
  assert exp._params is None and exp._opt_state is None
  assert exp._host is None and exp._position == 0
  assert restored.global_step == 0


def test_restore_replaces_eagerly_created_state(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=2, step=3)
  checkpointer, exp, _ = _fresh(config)
  exp.fill(2)  # Created in __init__: same structure, other values.
  exp._params = jax.tree.map(lambda x: x + 100, exp._params)
  exp._opt_state = jax.tree.map(lambda x: x * 0, exp._opt_state)
  exp._host["history"][:] = -5
  exp._host["names"] = ["c", "d"]
  exp._position = 1
  checkpointer.restore("latest")
  _assert_filled(exp, seed=2)


def test_growing_host_containers_restore(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  exp._host = {"losses": [0.5, 0.25], "seen": {"a": 1}}
  state.global_step = 2
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  reader, restored_exp, _ = _fresh(config)
  restored_exp._host = {"losses": [], "seen": {}}  # As __init__ made it.
  reader.restore("latest")
  assert restored_exp._host == {"losses": [0.5, 0.25], "seen": {"a": 1}}


def test_layout_and_restore_path_is_a_real_directory(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  assert checkpointer.restore_path("latest") is None
  assert checkpointer.can_be_restored("latest") is False
  exp.fill(1)
  for step in (4, 9):
    state.global_step = step
    checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  path = checkpointer.restore_path("latest")
  assert isinstance(path, str)
  assert path == os.path.join(config.checkpoint_dir, "checkpoints", "latest",
                              "9")
  assert os.path.isdir(path)
  assert {"arrays", "meta"} <= set(os.listdir(path))
  assert _committed_steps(config) == [4, 9]
  # A reader in another process sees the same path.
  reader = checkpointing.DiskCheckpointer(config, "eval")
  assert reader.restore_path("latest") == path


def test_max_checkpoints_to_keep_applies_per_series(tmp_path):
  config = _config(tmp_path, max_checkpoints_to_keep=2)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  best = checkpointer.get_experiment_state("best")
  best.experiment_module = exp
  best.train_step_rng = None
  best.best_model_eval_metric = "score"
  for step in range(1, 6):
    state.global_step = step
    checkpointer.save("latest")
    if step in (2, 3, 4):
      best.global_step = step * 10
      best.best_eval_metric_value = float(step)
      checkpointer.save("best")
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config, "latest") == [4, 5]
  assert _committed_steps(config, "best") == [30, 40]
  assert checkpointer.restore_path("best").endswith(os.sep + "40")


def test_async_save_keeps_the_values_at_save_time(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config, async_save=True)
  exp.fill(4)
  state.global_step = 1
  checkpointer.save("latest")
  # The loop goes on while the write is in flight: change everything.
  exp._host["history"][:] = -1
  exp._params = jax.tree.map(lambda x: x + 1, exp._params)
  exp._position = 999
  state.global_step = 2
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config) == [1]
  assert not [d for d in os.listdir(_series_dir(config)) if "tmp" in d]
  reader, restored_exp, restored = _fresh(config)
  reader.restore("latest")
  _assert_filled(restored_exp, seed=4)
  assert restored.global_step == 1


def test_synchronous_save_is_on_disk_when_save_returns(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config, async_save=False)
  exp.fill(2)
  state.global_step = 5
  checkpointer.save("latest")
  assert _committed_steps(config) == [5]  # No wait needed.
  reader, restored_exp, _ = _fresh(config)
  reader.restore("latest")
  _assert_filled(restored_exp, seed=2)


def test_best_series_holds_the_metric(tmp_path):
  config = _config(tmp_path, best_model_eval_metric="accuracy")
  checkpointer = checkpointing.DiskCheckpointer(config, "eval")
  exp = _Exp("eval")
  exp.fill(6)
  best = checkpointer.get_experiment_state("best")
  best.best_eval_metric_value = -float("inf")
  best.best_model_eval_metric = "accuracy"
  best.experiment_module = exp
  best.global_step = 40
  best.best_eval_metric_value = 0.8125
  best.train_step_rng = None
  checkpointer.save("best")
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config, "best") == [40]
  assert _committed_steps(config, "latest") == []

  # An eval job restarting builds its best state like train.evaluate does.
  reader = checkpointing.DiskCheckpointer(config, "eval")
  restored_exp = _Exp("eval")
  restored = reader.get_experiment_state("best")
  restored.best_eval_metric_value = -float("inf")
  restored.best_model_eval_metric = "accuracy"
  restored.experiment_module = restored_exp
  assert reader.can_be_restored("best")
  reader.restore("best")
  assert restored.best_eval_metric_value == 0.8125
  assert type(restored.best_eval_metric_value) is float
  assert restored.best_model_eval_metric == "accuracy"
  assert "global_step" not in restored  # Only live fields are restored.
  _assert_filled(restored_exp, seed=6)


def test_series_are_independent(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  state.global_step = 3
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  assert checkpointer.can_be_restored("latest")
  assert not checkpointer.can_be_restored("best")
  assert checkpointer.restore_path("best") is None
  with pytest.raises(KeyError):
    checkpointer.save("never_created")


def test_saving_a_step_again_keeps_the_first(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  state.global_step = 8
  checkpointer.save("latest")
  exp.fill(2)
  checkpointer.save("latest")  # The final save after a periodic one.
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config) == [8]
  reader, restored_exp, _ = _fresh(config)
  reader.restore("latest")
  _assert_filled(restored_exp, seed=1)


def test_reader_follows_checkpoints_written_after_it_started(tmp_path):
  config = _config(tmp_path)
  reader, exp, state = _fresh(config, mode="eval")
  assert not reader.can_be_restored("latest")
  assert reader.restore_path("latest") is None
  _save(config, seed=1, step=2)
  assert reader.can_be_restored("latest")
  assert reader.restore_path("latest").endswith(os.sep + "2")
  _save(config, seed=3, step=4)
  assert reader.restore_path("latest").endswith(os.sep + "4")
  reader.restore("latest")
  assert state.global_step == 4
  _assert_filled(exp, seed=3)


def test_uncommitted_directory_is_never_restored(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  # What a save killed before its commit leaves behind.
  partial = os.path.join(_series_dir(config), "6.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(_series_dir(config), "2"), partial)
  with open(os.path.join(partial, "meta", "metadata"), "w") as f:
    f.write("{")
  checkpointer, exp, state = _fresh(config)
  assert checkpointer.restore_path("latest").endswith(os.sep + "2")
  checkpointer.restore("latest")
  assert state.global_step == 2
  _assert_filled(exp, seed=1)
  # Saving that step again replaces the leftover.
  exp.fill(7)
  state.global_step = 6
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config) == [2, 6]
  reader, restored_exp, _ = _fresh(config)
  reader.restore("latest")
  _assert_filled(restored_exp, seed=7)


@pytest.mark.parametrize("eval_dir", ["step", "series", "root"])
def test_eval_specific_checkpoint_dir_names_the_checkpoint(tmp_path,
                                                           eval_dir):
  source = _config(tmp_path)
  for seed, step in ((1, 3), (2, 6)):
    _save(source, seed=seed, step=step)
  named = {"step": os.path.join(_series_dir(source), "3"),
           "series": _series_dir(source),
           "root": source.checkpoint_dir}[eval_dir]
  want_step, want_seed = (3, 1) if eval_dir == "step" else (6, 2)
  config = _config(tmp_path, checkpoint_dir=str(tmp_path / "eval_job"),
                   eval_specific_checkpoint_dir=named)
  checkpointer, exp, state = _fresh(config, mode="eval")
  assert checkpointer.restore_path("latest") == os.path.join(
      _series_dir(source), str(want_step))
  checkpointer.restore("latest")
  assert state.global_step == want_step
  _assert_filled(exp, seed=want_seed)
  # Training ignores the key.
  trainer = checkpointing.DiskCheckpointer(config, "train")
  assert trainer.restore_path("latest") is None


def test_eval_specific_checkpoint_dir_that_does_not_exist(tmp_path):
  config = _config(tmp_path,
                   eval_specific_checkpoint_dir=str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="eval_specific_checkpoint_dir"):
    checkpointing.DiskCheckpointer(config, "eval")


# --- Bad input ---------------------------------------------------------------


def test_object_needing_pickle_is_refused_at_save_naming_the_attribute(
    tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  exp._host = {"good": np.ones(2), "bad": _Opaque()}
  state.global_step = 1
  with pytest.raises(serialization.UnsupportedValueError) as info:
    checkpointer.save("latest")
  message = str(info.value)
  assert "_host" in message and "host_state" in message
  assert "['bad']" in message and "checkpoint_allow_pickle" in message
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config) == []
  assert not checkpointer.can_be_restored("latest")


def test_pickle_is_used_only_with_the_flag(tmp_path, caplog):
  config = _config(tmp_path, checkpoint_allow_pickle=True)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  exp._host = {"opaque": _Opaque()}
  state.global_step = 4
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config) == [4]

  # Without the flag, loading refuses, loudly (not as a damaged file that a
  # restart would silently skip): no code from the file runs.
  strict = _config(tmp_path)
  reader, restored_exp, restored = _fresh(strict)
  with pytest.raises(serialization.RestoreRefusedError,
                     match="checkpoint_allow_pickle"):
    reader.restore("latest")
  assert not _SIDE_EFFECTS
  assert restored_exp._host is None and restored.global_step == 0

  # With it, the object is unpickled (which here runs `_side_effect`).
  trusting, trusting_exp, trusting_state = _fresh(config)
  trusting.restore("latest")
  assert _SIDE_EFFECTS == [(("unpickled",), {})]
  assert trusting_exp._host == {"opaque": ()}
  assert trusting_state.global_step == 4


class _ExpExtraAttr(_Exp):
  NON_BROADCAST_CHECKPOINT_ATTRS = dict(_Exp.NON_BROADCAST_CHECKPOINT_ATTRS,
                                        _extra="extra_counter")

  def __init__(self, mode, init_rng=None):
    super().__init__(mode, init_rng)
    self._extra = 0


class _ExpFewerAttrs(_Exp):
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_position": "data_position"}


def test_checkpoint_missing_an_attribute_is_an_error(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  checkpointer, exp, _ = _fresh(config, exp_class=_ExpExtraAttr)
  exp.fill(5)
  with pytest.raises(ValueError) as info:
    checkpointer.restore("latest")
  message = str(info.value)
  assert "extra_counter" in message and "_extra" in message
  # Both sides' entries are listed.
  assert "host_state" in message and "data_position" in message
  _assert_filled(exp, seed=5)  # The experiment is left as it was.


def test_checkpoint_with_an_extra_attribute_is_an_error(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  checkpointer, exp, _ = _fresh(config, exp_class=_ExpFewerAttrs)
  with pytest.raises(ValueError) as info:
    checkpointer.restore("latest")
  message = str(info.value)
  assert "host_state" in message
  assert "data_position" in message and "opt_state" in message
  assert exp._params is None


def test_checkpoint_with_another_tree_structure_is_an_error(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  checkpointer, exp, _ = _fresh(config)
  exp.fill(1)
  exp._params = utils.bcast_local_devices(
      {"mlp/~/linear_0": {"w": np.zeros((3, 4), np.float32)}})
  with pytest.raises(ValueError) as info:
    checkpointer.restore("latest")
  message = str(info.value)
  assert "'params'" in message and "_params" in message
  # The paths that differ, on each side.
  saved_part, live_part = message.split("only in the experiment:")
  assert "only in the checkpoint: [\"['mlp/~/linear_0']['b']\"" in saved_part
  assert "linear_1']['w']" in saved_part
  assert "linear" not in live_part.split("]")[0]
  # Nothing was replaced.
  assert set(utils.get_first(exp._params)) == {"mlp/~/linear_0"}


def test_checkpoint_with_other_leaf_shapes_is_an_error(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  checkpointer, exp, _ = _fresh(config)
  exp.fill(1)
  exp._params = jax.tree.map(lambda x: jnp.concatenate([x, x], axis=-1),
                             exp._params)
  with pytest.raises(ValueError, match="params"):
    checkpointer.restore("latest")


def _damage(step_dir, how):
  files = []
  for root, _, names in os.walk(os.path.join(step_dir, "arrays")):
    files += [os.path.join(root, n) for n in names
              if n != "commit_success.txt"]
  assert files
  for path in files:
    if how == "delete":
      os.remove(path)
    elif how == "truncate":
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    else:
      with open(path, "wb") as f:
        f.write(b"\x00garbage")


@pytest.mark.parametrize("how", ["delete", "truncate", "garbage"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path, caplog, how):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  _save(config, seed=2, step=4)
  _damage(os.path.join(_series_dir(config), "4"), how)
  checkpointer, exp, state = _fresh(config)
  with caplog.at_level(pylogging.WARNING):
    checkpointer.restore("latest")
  assert state.global_step == 2
  _assert_filled(exp, seed=1)
  warnings = [r for r in caplog.records if r.levelno == pylogging.WARNING]
  assert any("step 4" in r.getMessage() and "falling back" in r.getMessage()
             for r in warnings)
  # The bad one is no longer offered.
  assert checkpointer.restore_path("latest").endswith(os.sep + "2")


def test_damaged_meta_falls_back_too(tmp_path, caplog):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  _save(config, seed=2, step=4)
  with open(os.path.join(_series_dir(config), "4", "meta", "metadata"),
            "r+b") as f:
    f.truncate(10)
  checkpointer, exp, state = _fresh(config)
  with caplog.at_level(pylogging.WARNING):
    checkpointer.restore("latest")
  assert state.global_step == 2
  _assert_filled(exp, seed=1)
  assert "falling back" in caplog.text


def test_nothing_restorable_starts_fresh_with_a_warning(tmp_path, caplog):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  _damage(os.path.join(_series_dir(config), "2"), "delete")
  checkpointer, exp, state = _fresh(config)
  with caplog.at_level(pylogging.WARNING):
    checkpointer.restore("latest")
  assert "starting fresh" in caplog.text
  assert state.global_step == 0 and exp._params is None
  assert checkpointer.restore_path("latest") is None


class _Counter(experiment.AbstractExperiment):
  """Adds 1 to lazily created per-device params each step."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_steps": "steps"}

  def __init__(self, mode, init_rng=None):
    super().__init__(mode, init_rng)
    self._params = None
    self._steps = 0

  def step(self, *, global_step, rng, writer):
    if self._params is None:
      self._params = utils.bcast_local_devices({"w": np.zeros(3, np.float32)})
    self._params = jax.tree.map(lambda x: x + 1, self._params)
    self._steps += 1
    return {"w0": self._params["w"][0, 0]}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def _train_config(tmp_path, **overrides):
  return _config(tmp_path, training_steps=4, interval_type="steps",
                 save_checkpoint_interval=2, log_tensors_interval=100,
                 log_train_data_interval=None, **overrides)


def test_train_resumes_from_disk_and_starts_fresh_from_garbage(tmp_path):
  config = _train_config(tmp_path)
  train.train(_Counter, config, platform.create_checkpointer(config, "train"),
              None)
  assert _committed_steps(config) == [2, 4]

  # The same command again: restores step 4 and has nothing left to do.
  calls = []

  class Recording(_Counter):

    def step(self, **kwargs):
      calls.append(1)
      return super().step(**kwargs)

  train.train(Recording, config,
              platform.create_checkpointer(config, "train"), None)
  assert not calls
  assert _committed_steps(config) == [2, 4]

  # A second run with more steps resumes from step 4.
  config.training_steps = 6
  train.train(_Counter, config, platform.create_checkpointer(config, "train"),
              None)
  reader, exp, state = _fresh(config, exp_class=_Counter)
  reader.restore("latest")
  assert state.global_step == 6 and exp._steps == 6
  np.testing.assert_array_equal(np.asarray(exp._params["w"]),
                                np.full((_n(), 3), 6.0))

  # Every checkpoint damaged: the next run starts from 0 and replaces them.
  for step in _committed_steps(config):
    _damage(os.path.join(_series_dir(config), str(step)), "garbage")
  train.train(_Counter, config, platform.create_checkpointer(config, "train"),
              None)
  reader, exp, state = _fresh(config, exp_class=_Counter)
  reader.restore("latest")
  assert state.global_step == 6 and exp._steps == 6
  np.testing.assert_array_equal(np.asarray(exp._params["w"]),
                                np.full((_n(), 3), 6.0))


def test_checkpoint_dir_that_is_a_file_fails_at_start(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  config = _config(tmp_path, checkpoint_dir=str(path))
  with pytest.raises(ValueError, match="a_file"):
    platform.create_checkpointer(config, "train")
  with pytest.raises(ValueError, match="a_file"):
    platform.create_checkpointer(config, "eval")


def test_checkpoint_dir_in_a_read_only_place_fails_at_start():
  config = base_config.get_base_config()
  config.checkpoint_dir = "/proc/jaxline_checkpointing_test"
  with pytest.raises(ValueError, match="jaxline_checkpointing_test"):
    platform.create_checkpointer(config, "train")


def test_checkpoint_dir_that_is_a_file_stops_train_before_any_step(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  config = _train_config(tmp_path, checkpoint_dir=str(path))
  steps_run = []

  class Exp(_Counter):

    def step(self, **kwargs):
      steps_run.append(1)
      return super().step(**kwargs)

  with pytest.raises(ValueError):
    train.train(Exp, config, platform.create_checkpointer(config, "train"),
                None)
  assert not steps_run


# --- Regressions for bugs found in review ------------------------------------


class _HostOnly(experiment.AbstractExperiment):
  """State that is all Python values; arrays only come later, if ever."""

  NON_BROADCAST_CHECKPOINT_ATTRS = {"_counters": "counters"}

  def __init__(self, mode, init_rng=None):
    super().__init__(mode, init_rng)
    self._counters = None

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def test_checkpoint_without_arrays_saves_and_restores(tmp_path):
  config = _config(tmp_path)
  checkpointer = checkpointing.DiskCheckpointer(config, "eval")
  exp = _HostOnly("eval")
  exp._counters = {"seen": 3, "best_loss": 0.25}
  best = checkpointer.get_experiment_state("best")
  best.best_eval_metric_value = 0.5
  best.best_model_eval_metric = "score"
  best.experiment_module = exp
  best.global_step = 10
  best.train_step_rng = None  # As train.evaluate sets it.
  checkpointer.save("best")
  checkpointer.wait_for_checkpointing_to_finish()
  reader = checkpointing.DiskCheckpointer(config, "eval")
  restored_exp = _HostOnly("eval")
  restored = reader.get_experiment_state("best")
  restored.best_eval_metric_value = 0.0
  restored.experiment_module = restored_exp
  reader.restore("best")
  assert restored_exp._counters == {"seen": 3, "best_loss": 0.25}
  assert restored.best_eval_metric_value == 0.5


def test_zero_size_array_round_trips(tmp_path):
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  exp._host = {"buffer": np.zeros((0, 3), np.float32)}
  state.global_step = 1
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  reader, restored_exp, _ = _fresh(config)
  reader.restore("latest")
  assert restored_exp._host["buffer"].shape == (0, 3)


def test_tampered_host_item_cannot_call_functions(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  host_path = os.path.join(_series_dir(config), "2", "host", "process_0.json")
  with open(host_path) as f:
    host = json.load(f)
  entry = host["entries"]["host_state"]
  entry["c"][entry["k"].index(["str", "pair"])] = {
      "t": "namedtuple", "cls": f"{__name__}:_side_effect",
      "c": [{"t": "py", "v": "payload"}]}
  with open(host_path, "w") as f:
    json.dump(host, f)
  checkpointer, _, _ = _fresh(config)
  with pytest.raises(serialization.RestoreRefusedError,
                     match="_side_effect.*register_checkpoint_class"):
    checkpointer.restore("latest")
  assert not _SIDE_EFFECTS, "restoring ran a function named by the file"


class _FixedHost(_Exp):
  """Host state of the same shape at every step."""

  def fill(self, seed):
    super().fill(seed)
    self._host["history"] = np.full((3,), seed, np.int64)


class _EvalRecorder(_FixedHost):
  evaluated = []

  def evaluate(self, *, global_step, rng, writer):
    _EvalRecorder.evaluated.append(
        (int(np.asarray(utils.get_first(global_step))), self._position))
    return {}


class _GrowingEvalRecorder(_EvalRecorder):
  """`_Exp`'s host history grows with the seed (one entry per step)."""

  def fill(self, seed):
    _Exp.fill(self, seed)


class _CommitsDuringPoll(checkpointing.DiskCheckpointer):
  """Training commits a checkpoint just after some `restore_path` calls."""

  def __init__(self, config, mode, commits):
    super().__init__(config, mode)
    self._commits = commits
    self._calls = 0

  def restore_path(self, ckpt_series):
    path = super().restore_path(ckpt_series)
    self._calls += 1
    commit = self._commits.pop(self._calls, None)
    if ckpt_series == "latest" and commit is not None:
      commit()
    return path


def test_eval_evaluates_the_checkpoint_at_the_path_it_polled(tmp_path):
  """A checkpoint committed between restore_path and restore waits its turn.

  Otherwise it is evaluated twice and the one at `path` never.
  """
  config = _config(tmp_path, training_steps=6, eval_poll_interval_secs=0.01)
  _save(config, seed=2, step=2, exp_class=_FixedHost)
  _EvalRecorder.evaluated = []
  checkpointer = _CommitsDuringPoll(config, "eval", {
      1: lambda: _save(config, seed=4, step=4, exp_class=_FixedHost),
      3: lambda: _save(config, seed=6, step=6, exp_class=_FixedHost)})
  train.evaluate(_EvalRecorder, config, checkpointer, None, "eval")
  assert _EvalRecorder.evaluated == [(2, 20), (4, 40), (6, 60)]


def test_eval_follows_checkpoints_whose_host_arrays_grow(tmp_path):
  config = _config(tmp_path, training_steps=4, eval_poll_interval_secs=0.01)
  _save(config, seed=1, step=2)
  _EvalRecorder.evaluated = []
  checkpointer = _CommitsDuringPoll(config, "eval", {
      2: lambda: _save(config, seed=3, step=4)})
  train.evaluate(_GrowingEvalRecorder, config, checkpointer, None, "eval")
  assert _EvalRecorder.evaluated == [(2, 10), (4, 30)]


def test_reader_survives_checkpoints_deleted_while_it_lists_them(tmp_path):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  series = _series_dir(config)
  reader = checkpointing.DiskCheckpointer(config, "eval")
  stop = threading.Event()

  def churn():  # A writer saving step 7 and deleting it, over and over.
    while not stop.is_set():
      shutil.copytree(os.path.join(series, "2"), os.path.join(series, "7"))
      shutil.rmtree(os.path.join(series, "7"))

  thread = threading.Thread(target=churn)
  thread.start()
  try:
    deadline = time.monotonic() + 8
    polls = 0
    while time.monotonic() < deadline and polls < 600:
      # A reader that lists again, and one that lists as it starts (an eval
      # job started while training runs): Orbax lists in both.
      for each in (reader, checkpointing.DiskCheckpointer(config, "eval")):
        assert each.can_be_restored("latest")
        assert each.restore_path("latest").rsplit(os.sep, 1)[1] in ("2", "7")
      polls += 1
  finally:
    stop.set()
    thread.join()


def test_reader_that_cannot_list_uses_the_last_listing(tmp_path, caplog,
                                                      monkeypatch):
  config = _config(tmp_path)
  _save(config, seed=1, step=2)
  reader = checkpointing.DiskCheckpointer(config, "eval")
  assert reader.can_be_restored("latest")
  # A listing that keeps failing, as while a writer deletes steps; the
  # real race is the test above, too rare to force three times in a row.
  manager = reader._manager("latest", create=False)
  def failing_reload():
    raise FileNotFoundError("a step vanished while listing")
  monkeypatch.setattr(manager, "reload", failing_reload)
  monkeypatch.setattr(checkpointing.time, "sleep", lambda _: None)
  with caplog.at_level(pylogging.WARNING):
    assert reader.can_be_restored("latest")
  assert reader.restore_path("latest").endswith(os.sep + "2")
  assert "using the last listing" in caplog.text


# --- Across device counts ----------------------------------------------------

_DEVICE_SCRIPT = r"""
import json, sys
import jax, numpy as np, optax
from jaxline import base_config, checkpointing, experiment, utils

class Exp(experiment.AbstractExperiment):
  CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_position": "position",
                                    "_whole": "per_device_whole"}
  def __init__(self, mode, init_rng=None):
    self._params = self._opt_state = self._whole = None
    self._position = 0
  def step(self, **kw): return {}
  def evaluate(self, **kw): return {}

action, directory = sys.argv[1:]
n = jax.local_device_count()
config = base_config.get_base_config()
config.checkpoint_dir = directory
checkpointer = checkpointing.DiskCheckpointer(config, "train")
exp = Exp("train")
state = checkpointer.get_experiment_state("latest")
state.global_step = 0
state.experiment_module = exp
state.train_step_rng = exp.initialize_train_step_rng(jax.random.PRNGKey(0))
base = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.float32(0.5) * np.ones(3, np.float32)}
if action == "write":
  # Slice i differs per device: only device 0's slice may be saved.
  offsets = np.arange(n, dtype=np.float32)
  exp._params = jax.tree.map(
      lambda x: utils.bcast_local_devices(x) +
      offsets.reshape((n,) + (1,) * x.ndim), base)
  opt = optax.adam(0.1)
  exp._opt_state = utils.bcast_local_devices(opt.init(base))
  exp._position = 17
  exp._whole = utils.bcast_local_devices(np.arange(2, dtype=np.int32))
  state.train_step_rng = exp.initialize_train_step_rng(
      jax.random.PRNGKey(1234))
  state.global_step = 7
  checkpointer.save("latest")
  checkpointer.wait_for_checkpointing_to_finish()
  print("RESULT " + json.dumps({"n": n}))
else:
  checkpointer.restore("latest")
  def per_device_ok(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return (x.shape[0] == n and
            x.sharding.device_set == set(jax.local_devices()) and
            [s.device for s in shards] == list(jax.local_devices()))
  leaves = jax.tree.leaves(exp._params) + jax.tree.leaves(exp._opt_state)
  print("RESULT " + json.dumps({
      "n": n,
      "global_step": state.global_step,
      "per_device": all(per_device_ok(x) for x in leaves),
      "params": {k: np.asarray(v).tolist() for k, v in exp._params.items()},
      "base": {k: np.broadcast_to(v, (n,) + v.shape).tolist()
               for k, v in base.items()},
      "opt_types": [type(s).__name__ for s in exp._opt_state],
      "opt_count": np.asarray(exp._opt_state[0].count).tolist(),
      "position": [exp._position, type(exp._position).__name__],
      "whole": np.asarray(exp._whole).tolist(),
      "rng_per_device": per_device_ok(state.train_step_rng),
      "rng": np.asarray(state.train_step_rng).tolist(),
  }))
"""


def _run_device_script(action, directory, num_devices):
  result = subprocess.run(
      [sys.executable, "-c", _DEVICE_SCRIPT, action, directory],
      env=subprocess_env(num_devices), capture_output=True, text=True,
      timeout=180)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  assert line, result.stdout[-2000:] + result.stderr[-2000:]
  return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("written_on, restored_on", [(8, 1), (1, 8)])
def test_checkpoint_restores_on_another_device_count(tmp_path, written_on,
                                                     restored_on):
  directory = str(tmp_path / "run")
  assert _run_device_script("write", directory, written_on)["n"] == written_on
  got = _run_device_script("read", directory, restored_on)
  assert got["n"] == restored_on
  assert got["global_step"] == 7
  # Device 0's slice was saved and now sits on every new local device.
  assert got["per_device"]
  assert got["params"] == got["base"]
  assert got["opt_types"] == ["ScaleByAdamState", "EmptyState"]
  assert got["opt_count"] == [0] * restored_on
  assert got["position"] == [17, "int"]
  # A non-broadcast value comes back whole, with the writer's device axis.
  assert got["whole"] == [[0, 1]] * written_on
  assert got["rng_per_device"]
  assert got["rng"] == [[0, 1234]] * restored_on


# --- Saves in the background (issue 12) --------------------------------------


@pytest.mark.parametrize("style", ["pmap", "sharded"])
def test_state_donated_right_after_an_async_save_is_saved_as_it_was(
    tmp_path, style):
  # The loop goes on while Orbax writes: the next step may donate (and so
  # delete) the live buffers, and overwrite them, before the write reads.
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  if style == "sharded":
    setattr(exp, experiment.STYLE_ATTR, "sharded")
  exp.fill(1)
  if style == "sharded":  # Whole global arrays, as the sharded style has.
    exp._params = utils.get_first(exp._params)
    exp._opt_state = utils.get_first(exp._opt_state)
  # Expected values from a twin: a host view of the live arrays would keep
  # XLA:CPU from donating them.
  twin = _Exp("train")
  twin.fill(1)
  saved = jax.device_get((twin._params, twin._opt_state))
  if style == "sharded":
    saved = utils.get_first(saved)
  del twin
  state.global_step = 5
  # Hold the writer thread until the donation is done, so the write surely
  # reads after it.
  hold = threading.Event()
  checkpointer._writer.submit(hold.wait, 60)  # pylint: disable=protected-access
  checkpointer.save("latest")
  bump = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t),
                 donate_argnums=0)
  exp._params = bump(exp._params)
  exp._opt_state = bump(exp._opt_state)
  hold.set()
  checkpointer.wait_for_checkpointing_to_finish()
  assert _committed_steps(config) == [5]

  checkpointer, exp, state = _fresh(config)
  if style == "sharded":
    setattr(exp, experiment.STYLE_ATTR, "sharded")
  checkpointer.restore("latest")
  first = (lambda x: x) if style == "sharded" else utils.get_first
  _assert_tree_bits_equal(first(exp._params), first(saved[0]))
  _assert_tree_bits_equal(first(exp._opt_state), first(saved[1]))


def test_an_async_save_that_fails_in_the_background_raises_at_the_wait(
    tmp_path, monkeypatch):
  # A full disk cannot be made here; Orbax's save raising in the writer
  # thread stands for it.
  config = _config(tmp_path)
  checkpointer, exp, state = _fresh(config)
  exp.fill(1)
  state.global_step = 1
  threads = []

  def failing_save(self, step, *args, **kwargs):
    del self, args, kwargs
    threads.append(threading.current_thread().name)
    raise OSError(f"No space left on device (step {step})")

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "save",
                      failing_save)
  checkpointer.save("latest")  # Returns: the write runs in the background.
  with pytest.raises(OSError, match="No space left on device"):
    checkpointer.wait_for_checkpointing_to_finish()
  assert threads and threads[0] != threading.current_thread().name
  assert _committed_steps(config) == []
  checkpointer.close()
