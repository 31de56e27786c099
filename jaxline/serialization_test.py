"""Tests for `jaxline.serialization`: pytrees to a JSON skeleton and back.

Every round trip here goes through `json.dumps`/`json.loads`, as the skeleton
does on disk, so a type that only survives in memory fails.
"""

import collections
import dataclasses
import json
import os
import pickle
import sys
import typing
import uuid

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxline import serialization


class _Pair(typing.NamedTuple):
  first: typing.Any
  second: typing.Any


@dataclasses.dataclass
class _Slots:
  weights: typing.Any
  count: int
  note: str = "x"


@dataclasses.dataclass(frozen=True)
class _Frozen:
  pair: _Pair
  scale: float


class _Opaque:
  """No pytree, no dataclass: a checkpoint can hold it only with pickle."""

  def __init__(self, value):
    self.value = value

  def __eq__(self, other):
    return isinstance(other, _Opaque) and other.value == self.value


_SIDE_EFFECTS = []


def _side_effect(*args, **kwargs):
  """Stands in for any callable a hostile checkpoint could name."""
  _SIDE_EFFECTS.append((args, kwargs))
  return _Pair(1, 2)


class _RunsOnUnpickle:
  """Unpickling it calls `_side_effect`: loading it runs code."""

  def __reduce__(self):
    return (_side_effect, ("unpickled",))


@pytest.fixture(autouse=True)
def _clear_side_effects():
  _SIDE_EFFECTS.clear()
  yield
  _SIDE_EFFECTS.clear()


def _roundtrip(tree, *, allow_pickle=False, allow_pickle_on_load=None):
  skeleton, arrays = serialization.encode(tree, allow_pickle=allow_pickle)
  text = json.dumps(skeleton)  # What `meta` holds on disk.
  assert all(isinstance(v, np.ndarray) for v in arrays.values())
  if allow_pickle_on_load is None:
    allow_pickle_on_load = allow_pickle
  return serialization.decode(json.loads(text), arrays,
                              allow_pickle=allow_pickle_on_load)


def _assert_same_tree(actual, expected):
  """Same pytree structure, leaf types, dtypes and bits."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert type(a) is type(e) or (isinstance(a, jax.Array) and
                                  isinstance(e, jax.Array)), (a, e)
    if isinstance(e, (jax.Array, np.ndarray, np.generic)):
      assert a.dtype == e.dtype
      assert a.shape == e.shape
      if isinstance(e, jax.Array) and jax.dtypes.issubdtype(
          e.dtype, jax.dtypes.prng_key):
        a, e = jax.random.key_data(a), jax.random.key_data(e)
      assert np.asarray(a).tobytes() == np.asarray(e).tobytes()
    else:
      assert a == e or (a != a and e != e)  # NaN equals NaN here.


# --- Types that round-trip ---------------------------------------------------


def _adam_state():
  params = {"linear": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  state = optimizer.init(params)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  _, state = optimizer.update(grads, state, params)
  return state


def test_optax_adam_state_round_trips_with_namedtuple_types():
  state = _adam_state()
  restored = _roundtrip(state)
  _assert_same_tree(restored, state)
  # The exact optax classes are rebuilt, not tuples or dicts.
  assert type(restored) is tuple
  assert type(restored[1][0]) is type(state[1][0])
  assert type(restored[1][0]).__name__ == "ScaleByAdamState"
  assert restored[1][0].count.dtype == jnp.int32
  assert int(restored[1][0].count) == 1
  # The restored state drives the optimizer like the original.
  params = {"linear": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  grads = jax.tree.map(jnp.ones_like, params)
  want, _ = optimizer.update(grads, state, params)
  got, _ = optimizer.update(grads, restored, params)
  _assert_same_tree(got, want)


def test_optax_sgd_momentum_state_round_trips():
  params = {"w": jnp.ones((2,), jnp.float32)}
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = optimizer.init(params)
  _, state = optimizer.update({"w": jnp.full((2,), 3.0)}, state)
  restored = _roundtrip(state)
  _assert_same_tree(restored, state)
  assert type(restored[0]).__name__ == "TraceState"
  assert type(restored[1]) is type(state[1])  # EmptyState


def test_haiku_params_round_trip_as_nested_dicts():
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([4, 2])(x)))
  params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  restored = _roundtrip(params)
  _assert_same_tree(restored, params)
  assert type(restored) is dict
  assert all(type(v) is dict for v in restored.values())
  assert list(restored) == list(params)  # Haiku's key order is kept.
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(net.apply(restored, x), net.apply(params, x))


def test_namedtuple_and_dataclasses_round_trip():
  tree = {
      "pair": _Pair(np.arange(3, dtype=np.int16), [None, 2.5]),
      "slots": _Slots(weights=jnp.ones((2, 2), jnp.float16), count=7),
      "frozen": _Frozen(pair=_Pair("a", (1, 2)), scale=0.5),
  }
  restored = _roundtrip(tree)
  assert type(restored["pair"]) is _Pair
  assert type(restored["slots"]) is _Slots
  assert type(restored["frozen"]) is _Frozen
  assert restored["slots"].count == 7 and restored["slots"].note == "x"
  assert restored["frozen"].pair == _Pair("a", (1, 2))
  assert type(restored["frozen"].pair.second) is tuple
  assert type(restored["pair"].second) is list
  np.testing.assert_array_equal(restored["slots"].weights,
                                np.ones((2, 2), np.float16))
  assert restored["slots"].weights.dtype == jnp.float16
  assert restored["pair"].first.dtype == np.int16


def test_mapping_subclass_keeps_its_type_and_order():
  tree = collections.OrderedDict([("b", 1), ("a", np.float32(2))])
  restored = _roundtrip(tree)
  assert type(restored) is collections.OrderedDict
  assert list(restored) == ["b", "a"]


def test_python_scalars_keep_their_types():
  tree = {"int": 3, "big": 2**70, "float": 1.0, "bool": True, "str": "s",
          "inf": float("inf"), "nan": float("nan"), "none": None,
          "neg": -0.0}
  restored = _roundtrip(tree)
  _assert_same_tree(restored, tree)
  assert type(restored["int"]) is int
  assert type(restored["float"]) is float
  assert type(restored["bool"]) is bool
  assert restored["none"] is None
  assert np.signbit(restored["neg"])


@pytest.mark.parametrize("value", [
    np.float32(1.5),
    pytest.param(np.float64(-2.25)),
    np.int8(-3), np.int64(2**40),
    np.uint64(2**64 - 1), np.bool_(True), np.float16(0.1),
    np.complex64(1 + 2j), ml_dtypes.bfloat16(1.5)
], ids=lambda v: type(v).__name__)
def test_numpy_scalars_keep_dtype_and_scalar_type(value):
  restored = _roundtrip({"x": value})["x"]
  assert isinstance(restored, np.generic)
  assert restored.dtype == value.dtype
  assert np.asarray(restored).tobytes() == np.asarray(value).tobytes()


def test_numpy_and_jax_arrays_keep_their_kind_and_dtype():
  tree = {
      "np_int": np.arange(5, dtype=np.uint32),
      "np_bool": np.array([[True, False]]),
      "np_0d": np.array(3.5, np.float32),
      "np_bf16": np.arange(4).astype(ml_dtypes.bfloat16),
      "jax_f32": jnp.linspace(0.0, 1.0, 7),
      "jax_bf16": jnp.arange(3, dtype=jnp.bfloat16) / 3,
      "jax_0d": jnp.int32(9),
  }
  restored = _roundtrip(tree)
  _assert_same_tree(restored, tree)
  for name in ("np_int", "np_bool", "np_0d", "np_bf16"):
    assert type(restored[name]) is np.ndarray, name
  for name in ("jax_f32", "jax_bf16", "jax_0d"):
    assert isinstance(restored[name], jax.Array), name
  assert restored["jax_bf16"].dtype == jnp.bfloat16
  assert restored["np_bf16"].dtype == ml_dtypes.bfloat16


def test_encode_copies_numpy_leaves():
  values = np.zeros(3, np.float32)
  skeleton, arrays = serialization.encode({"v": values})
  values[:] = 7.0  # Mutating the live value after the save...
  restored = serialization.decode(skeleton, arrays)
  np.testing.assert_array_equal(restored["v"], np.zeros(3))  # ...is not seen.


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_prng_keys_round_trip(impl):
  keys = jax.random.split(jax.random.key(5, impl=impl), 3)
  restored = _roundtrip({"k": keys, "one": keys[0]})
  for name, want in (("k", keys), ("one", keys[0])):
    got = restored[name]
    assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(got) == jax.random.key_impl(want)
    assert got.shape == want.shape
    np.testing.assert_array_equal(jax.random.key_data(got),
                                  jax.random.key_data(want))
  # The restored key draws the same numbers.
  np.testing.assert_array_equal(jax.random.uniform(restored["one"], (4,)),
                                jax.random.uniform(keys[0], (4,)))


def test_raw_uint32_key_stays_raw():
  key = jax.random.PRNGKey(42)
  restored = _roundtrip(key)
  assert restored.dtype == jnp.uint32
  np.testing.assert_array_equal(restored, [0, 42])


def test_none_empty_containers_and_int_keys():
  tree = {"none": None, "list": [], "tuple": (), "dict": {}, 3: "three",
          "nested": [(None,), {"a": [np.zeros(1)]}]}
  restored = _roundtrip(tree)
  assert restored["none"] is None
  assert restored["list"] == [] and restored["tuple"] == ()
  assert restored["dict"] == {}
  assert restored[3] == "three"  # An int key stays an int.
  assert type(restored["nested"][0]) is tuple
  np.testing.assert_array_equal(restored["nested"][1]["a"][0], [0.0])
  assert None is _roundtrip(None)


def test_skeleton_is_json_and_arrays_are_flat():
  skeleton, arrays = serialization.encode(_adam_state())
  json.dumps(skeleton, allow_nan=False)  # Plain JSON, no Python objects.
  assert sorted(arrays, key=int) == [str(i) for i in range(len(arrays))]
  assert len(arrays) == len(jax.tree.leaves(_adam_state()))


def test_describe_names_types_keys_and_arrays():
  skeleton, _ = serialization.encode({"w": np.zeros(2), "pair": _Pair(1, 2.0)})
  text = serialization.describe(skeleton)
  assert "'w': array" in text
  assert "_Pair(int, float)" in text


# --- What is refused ---------------------------------------------------------


def test_object_needing_pickle_is_refused_naming_the_path():
  tree = {"state": {"inner": [1, _Opaque(3)]}}
  with pytest.raises(serialization.UnsupportedValueError) as info:
    serialization.encode(tree, path="checkpoint entry 'host_state'")
  message = str(info.value)
  assert "checkpoint entry 'host_state'" in message
  assert "['state']['inner'][1]" in message
  assert "_Opaque" in message
  assert "checkpoint_allow_pickle" in message
  assert isinstance(info.value, TypeError)


def test_object_round_trips_with_pickle_allowed():
  tree = {"opaque": _Opaque([1, 2]), "w": np.ones(2)}
  restored = _roundtrip(tree, allow_pickle=True)
  assert restored["opaque"] == _Opaque([1, 2])
  np.testing.assert_array_equal(restored["w"], [1.0, 1.0])


def test_pickled_object_is_not_loaded_by_default():
  skeleton, arrays = serialization.encode({"p": _RunsOnUnpickle()},
                                          allow_pickle=True)
  with pytest.raises(ValueError, match="checkpoint_allow_pickle"):
    serialization.decode(json.loads(json.dumps(skeleton)), arrays)
  assert not _SIDE_EFFECTS  # No code from the checkpoint ran.
  # The same bytes do run code once the user opts in: the refusal matters.
  serialization.decode(skeleton, arrays, allow_pickle=True)
  assert _SIDE_EFFECTS == [(("unpickled",), {})]


def test_dict_key_that_is_not_str_or_int_is_refused():
  with pytest.raises(serialization.UnsupportedValueError, match="dict key"):
    serialization.encode({("a", 1): np.zeros(1)})


def _write_module(directory, name, marker):
  source = (
      "import typing\n"
      f"open({marker!r}, 'w').close()\n"
      "class Point(typing.NamedTuple):\n"
      "  x: int\n"
      "  y: int\n")
  with open(os.path.join(directory, name + ".py"), "w") as f:
    f.write(source)


def test_classes_come_only_from_modules_already_imported(tmp_path,
                                                         monkeypatch):
  name = "jaxline_unimported_" + uuid.uuid4().hex
  marker = str(tmp_path / "imported.marker")
  _write_module(str(tmp_path), name, marker)
  monkeypatch.syspath_prepend(str(tmp_path))
  skeleton = {"t": "namedtuple", "cls": f"{name}:Point",
              "c": [{"t": "py", "v": 1}, {"t": "py", "v": 2}]}
  with pytest.raises(ValueError, match="not imported"):
    serialization.decode(skeleton, {})
  assert name not in sys.modules
  assert not os.path.exists(marker)  # The module's code never ran.
  # Once the user imports it, the same skeleton loads.
  module = __import__(name)
  try:
    point = serialization.decode(skeleton, {})
    assert type(point) is module.Point and point == (1, 2)
  finally:
    del sys.modules[name]


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass", "dict"])
def test_skeleton_cannot_call_arbitrary_functions(kind):
  """A class name in the skeleton must resolve to a class of that kind.

  Otherwise a crafted `meta` file turns `decode` into a call of any function
  in any imported module (`os:system`, `subprocess:run`), without pickle.
  """
  target = f"{__name__}:_side_effect"
  child = [{"t": "py", "v": "rm -rf /"}]
  skeleton = {
      "namedtuple": {"t": "namedtuple", "cls": target, "c": child},
      "dataclass": {"t": "dataclass", "cls": target, "f": ["cmd"],
                    "c": child},
      "dict": {"t": "dict", "cls": target, "k": [["str", "cmd"]],
               "c": child},
  }[kind]
  try:
    serialization.decode(skeleton, {})
  except (TypeError, ValueError):
    pass
  assert not _SIDE_EFFECTS, "decode called a function named by the checkpoint"


def test_pickle_node_is_refused_even_if_planted():
  payload = np.frombuffer(pickle.dumps(_RunsOnUnpickle()), np.uint8)
  skeleton = {"t": "dict", "cls": None, "k": [["str", "a"]],
              "c": [{"t": "pickle", "i": "0"}]}
  with pytest.raises(ValueError, match="pickled"):
    serialization.decode(skeleton, {"0": payload})
  assert not _SIDE_EFFECTS


def test_unknown_node_kind_is_an_error():
  with pytest.raises(ValueError, match="Unknown node kind"):
    serialization.decode({"t": "exec", "v": "print(1)"}, {})


def _local_namedtuple():

  class Local(typing.NamedTuple):
    v: int

  return Local(1)


def test_class_that_cannot_be_looked_up_is_refused_at_save():
  with pytest.raises(serialization.UnsupportedValueError, match="Local"):
    serialization.encode({"x": _local_namedtuple()}, path="entry 'x'")


@pytest.mark.parametrize("value", [np.array(["a", "bc"]),
                                   np.array([object()], dtype=object)],
                         ids=["str", "object"])
def test_non_numeric_numpy_array_is_refused_at_save(value):
  with pytest.raises(serialization.UnsupportedValueError, match="entry 'x'"):
    serialization.encode({"x": value}, path="entry 'x'")


class _Snapshotting:
  """Just what `check_snapshot_matches` reads of an experiment."""
  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_seen": "seen"}

  def __init__(self, params, seen):
    self._state = {"params": params, "seen": seen}

  def snapshot_state(self):
    return dict(self._state)


def test_snapshot_check_allows_lazy_state_and_growing_host_values():
  saved = {"params": {"w": np.zeros((2, 3))}, "seen": [1, 2, 3]}
  # Parameters not created yet, and a host list that has grown since.
  serialization.check_snapshot_matches(_Snapshotting(None, [1]), saved)
  serialization.check_snapshot_matches(
      _Snapshotting({"w": np.ones((2, 3))}, []), saved)


def test_snapshot_check_names_the_attribute_and_both_shapes():
  saved = {"params": {"w": np.zeros((2, 3))}, "seen": []}
  with pytest.raises(ValueError) as info:
    serialization.check_snapshot_matches(
        _Snapshotting({"w": np.zeros((2, 4))}, []), saved)
  message = str(info.value)
  assert "'params' (attribute _params)" in message
  assert "[(2, 3)]" in message and "[(2, 4)]" in message


def test_snapshot_check_lists_missing_and_extra_entries():
  with pytest.raises(ValueError) as info:
    serialization.check_snapshot_matches(
        _Snapshotting(None, []), {"params": None, "old_counter": 1})
  message = str(info.value)
  assert "'seen' (attribute _seen)" in message  # Missing from the checkpoint.
  assert "'old_counter'" in message  # In the checkpoint only.
