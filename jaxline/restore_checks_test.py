"""Tests for `jaxline.restore_checks`: a checkpoint must fit its experiment.

The saved side is what a restore builds before it reads any array: the
decoded skeleton with `SavedArray` placeholders (shape and dtype from the
Orbax metadata), or inline host arrays. The live side is a real experiment.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxline import experiment
from jaxline import restore_checks
from jaxline import utils

_SOURCE = "/ckpt/latest/7"


class _Exp(experiment.AbstractExperiment):
  """Parameters and optimizer state created lazily; host state eagerly."""

  CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_host": "host_state"}

  def __init__(self, mode="train", init_rng=None, hidden=16, abstract=False):
    super().__init__(mode=mode, init_rng=init_rng)
    self._hidden = hidden
    self._abstract = abstract
    self._params = None
    self._opt_state = None
    self._host = {"seen": [1, 2], "buffer": np.zeros((3,), np.int64)}

  def _init(self):
    return {"w": jnp.zeros((self._hidden, 10), jnp.float32),
            "b": jnp.zeros((10,), jnp.float32)}

  def fill(self):
    params = self._init()
    self._params = utils.bcast_local_devices(params)
    self._opt_state = utils.bcast_local_devices(
        optax.adam(1e-3).init(params))

  def abstract_snapshot_state(self):
    if not self._abstract:
      return None
    params = jax.eval_shape(self._init)
    return {"params": params,
            "opt_state": jax.eval_shape(optax.adam(1e-3).init, params)}

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def _placeholders(tree):
  """`tree` as a restore sees it before reading: SavedArray leaves."""

  def placeholder(x):
    x = np.asarray(x)
    return restore_checks.SavedArray({"t": "jax", "i": "0"}, x.shape,
                                     x.dtype)

  return jax.tree.map(placeholder, tree)


def _saved(hidden=16, *, params=None, opt_state=None, host=None):
  """The entries of a checkpoint written by `_Exp(hidden=hidden)`."""
  written = _Exp(hidden=hidden)
  written.fill()
  snapshot = written.snapshot_state()
  saved = {name: _placeholders(value) for name, value in snapshot.items()
           if name != "host_state"}
  saved["host_state"] = written._host if host is None else host
  if params is not None:
    saved["params"] = params
  if opt_state is not None:
    saved["opt_state"] = opt_state
  return saved


def _wider_params(hidden=32):
  """Saved params of another width; the rest of the checkpoint fits."""
  return _saved(params=_placeholders(
      {"w": np.zeros((hidden, 10), np.float32),
       "b": np.zeros(10, np.float32)}))


def _mismatch(exp, saved) -> str:
  with pytest.raises(restore_checks.CheckpointMismatchError) as info:
    restore_checks.check_entries(exp, saved, source=_SOURCE)
  assert isinstance(info.value, ValueError)
  return str(info.value)


# --- check_entries -----------------------------------------------------------


def test_a_checkpoint_of_the_same_experiment_fits():
  exp = _Exp()
  exp.fill()
  restore_checks.check_entries(exp, _saved(), source=_SOURCE)
  # Real arrays (inline host values) are compared the same way.
  restore_checks.check_entries(exp, exp.snapshot_state(), source=_SOURCE)


def test_shape_mismatch_names_entry_attribute_path_and_both_shapes():
  exp = _Exp(hidden=16)
  exp.fill()
  message = _mismatch(exp, _wider_params())
  assert "'params' (attribute _params)" in message
  assert _SOURCE in message
  assert "at ['w']" in message
  assert "checkpoint holds float32[32, 10]" in message
  assert "experiment float32[16, 10]" in message


def test_dtype_mismatch_is_an_error():
  exp = _Exp()
  exp.fill()
  saved = _saved(params=_placeholders(
      {"w": np.zeros((16, 10), np.float16), "b": np.zeros(10, np.float32)}))
  message = _mismatch(exp, saved)
  assert "at ['w']" in message
  assert "float16[16, 10]" in message and "float32[16, 10]" in message


def test_structure_mismatch_lists_the_paths_on_each_side():
  exp = _Exp()
  exp.fill()
  saved = _saved(params=_placeholders(
      {"w": np.zeros((16, 10), np.float32),
       "gain": np.zeros(10, np.float32)}))
  message = _mismatch(exp, saved)
  assert "'params' (attribute _params)" in message
  saved_part, live_part = message.split("only in the experiment:")
  assert "['gain']" in saved_part and "['b']" not in saved_part
  assert "['b']" in live_part and "['gain']" not in live_part


def test_same_paths_in_other_containers_is_an_error():
  exp = _Exp()
  exp.fill()
  exp._params = utils.bcast_local_devices(
      [jnp.zeros((16, 10)), jnp.zeros((10,))])
  saved = _saved(params=_placeholders(
      (np.zeros((16, 10), np.float32), np.zeros(10, np.float32))))
  assert "other container types" in _mismatch(exp, saved)


def test_a_python_value_in_place_of_an_array_is_an_error():
  exp = _Exp()
  exp.fill()
  saved = _saved(params={"w": 1.0, "b": _placeholders(np.zeros(10,
                                                               np.float32))})
  message = _mismatch(exp, saved)
  assert "a Python value" in message and "float32[16, 10]" in message


def test_lazily_created_state_passes_unless_declared():
  # Nothing created yet and nothing declared: there is nothing to compare.
  restore_checks.check_entries(_Exp(hidden=16), _saved(hidden=32),
                               source=_SOURCE)
  # Declared with abstract_snapshot_state(): checked as live values are.
  declared = _Exp(hidden=16, abstract=True)
  restore_checks.check_entries(declared, _saved(hidden=16), source=_SOURCE)
  # Every declared entry is checked, the optimizer state too.
  message = _mismatch(declared, _saved(hidden=32))
  assert "'opt_state' (attribute _opt_state)" in message
  assert "at [0].mu['w']" in message
  message = _mismatch(declared, _wider_params())
  assert "'params' (attribute _params)" in message
  assert "float32[32, 10]" in message and "float32[16, 10]" in message


def test_declared_optimizer_state_is_checked_too():
  declared = _Exp(hidden=16, abstract=True)
  sgd_state = optax.sgd(0.1, momentum=0.9).init(
      {"w": np.zeros((16, 10), np.float32), "b": np.zeros(10, np.float32)})
  message = _mismatch(declared, _saved(opt_state=_placeholders(sgd_state)))
  assert "'opt_state' (attribute _opt_state)" in message


def test_a_checkpoint_entry_saved_as_none_passes():
  """A checkpoint written before the first step holds None there."""
  exp = _Exp()
  exp.fill()
  saved = _saved()
  saved["params"] = None
  restore_checks.check_entries(exp, saved, source=_SOURCE)


def test_non_broadcast_values_are_not_shape_checked():
  exp = _Exp()
  exp.fill()
  grown = {"seen": [1, 2, 3, 4, 5], "buffer": np.zeros((9, 2), np.float32),
           "new": "anything"}
  restore_checks.check_entries(exp, _saved(host=grown), source=_SOURCE)
  restore_checks.check_entries(exp, _saved(host=None), source=_SOURCE)


def test_saved_key_data_fits_a_live_typed_key():
  class KeyExp(_Exp):
    CHECKPOINT_ATTRS = {"_key": "key"}
    NON_BROADCAST_CHECKPOINT_ATTRS = {}

  exp = KeyExp()
  exp._key = utils.bcast_local_devices(jax.random.key(0))
  node = {"t": "jax", "i": "0", "key": "threefry2x32"}
  fits = {"key": restore_checks.SavedArray(node, (2,), np.uint32)}
  restore_checks.check_entries(exp, fits, source=_SOURCE)
  raw = {"key": restore_checks.SavedArray({"t": "jax", "i": "0"}, (2,),
                                          np.uint32)}
  message = _mismatch(exp, raw)
  assert "uint32[2]" in message and "key[]" in message


def test_missing_and_extra_entries_are_named():
  exp = _Exp()
  saved = _saved()
  del saved["host_state"]
  saved["old_counter"] = 3
  message = _mismatch(exp, saved)
  missing, rest = message.split("in the checkpoint but not the experiment:")
  assert "'host_state' (attribute _host)" in missing
  assert "'old_counter'" in rest.split(".")[0]
  # Both sides' entries are listed in full.
  assert "experiment entries: ['host_state', 'opt_state', 'params']" in (
      message)


# --- experiment_kwargs -------------------------------------------------------
