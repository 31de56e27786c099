"""Tests for `jaxline.serialization`: pytrees to a JSON skeleton and back.

Every round trip goes through `json.dumps`/`json.loads`, as the skeleton
does on disk, so a type that only survives in memory fails. Arrays go to a
dict through `add_array`, or inline into the skeleton (host state), and come
back through a `leaf` function that does what a checkpoint read does.
"""

import base64
import collections
import dataclasses
import importlib.util
import json
import pickle
import sys
import tracemalloc
import types
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


@dataclasses.dataclass
class _Unregistered:
  value: typing.Any


_INIT_CALLS = []


@dataclasses.dataclass
class _Checked:
  """Its `__init__` and `__post_init__` leave a trace when they run."""
  value: typing.Any

  def __post_init__(self):
    _INIT_CALLS.append(("post_init", self.value))


class _Table(collections.abc.Mapping):
  """A user Mapping; rebuilt from a dict, so it needs registration."""

  def __init__(self, items):
    self._items = dict(items)

  def __getitem__(self, key):
    return self._items[key]

  def __iter__(self):
    return iter(self._items)

  def __len__(self):
    return len(self._items)


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
def _isolated():
  """Registrations and side effects of one test stay in that test."""
  # pylint: disable=protected-access
  registered = dict(serialization._REGISTERED)
  _SIDE_EFFECTS.clear()
  _INIT_CALLS.clear()
  yield
  serialization._REGISTERED.clear()
  serialization._REGISTERED.update(registered)
  # pylint: enable=protected-access
  _SIDE_EFFECTS.clear()
  _INIT_CALLS.clear()


@pytest.fixture
def registered():
  """The test module's dataclasses, registered as an experiment would."""
  for cls in (_Slots, _Frozen, _Checked, _Table):
    serialization.register_checkpoint_class(cls)


def _leaf(stored):
  """What a checkpoint read does with each array node of the skeleton."""

  def leaf(node):
    value = (serialization.inline_array(node) if "i" not in node
             else stored[node["i"]])
    if node["t"] == "np":
      return np.asarray(value)
    if node["t"] == "npscalar":
      return np.asarray(value)[()]
    value = jnp.asarray(value)
    if node.get("key"):
      value = jax.random.wrap_key_data(value, impl=node["key"])
    return value

  return leaf


def _encode(tree, *, inline=False, allow_pickle=False, where="tree"):
  stored = {}

  def add_array(x):
    key = str(len(stored))
    stored[key] = x
    return key

  skeleton = serialization.encode(tree, where=where, add_array=add_array,
                                  inline=inline, allow_pickle=allow_pickle)
  return json.loads(json.dumps(skeleton)), stored  # What is on disk.


def _roundtrip(tree, *, inline=False, allow_pickle=False,
               allow_pickle_on_load=None):
  skeleton, stored = _encode(tree, inline=inline, allow_pickle=allow_pickle)
  if allow_pickle_on_load is None:
    allow_pickle_on_load = allow_pickle
  return serialization.decode(skeleton, _leaf(stored),
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


both_layouts = pytest.mark.parametrize("inline", [False, True],
                                       ids=["arrays", "inline"])


# --- Types that round-trip ---------------------------------------------------


def _adam_state():
  params = {"linear": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  state = optimizer.init(params)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  _, state = optimizer.update(grads, state, params)
  return state


@both_layouts
def test_optax_adam_state_round_trips_with_namedtuple_types(inline):
  state = _adam_state()
  restored = _roundtrip(state, inline=inline)
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


@both_layouts
def test_namedtuple_and_registered_dataclasses_round_trip(registered, inline):
  del registered
  tree = {
      "pair": _Pair(np.arange(3, dtype=np.int16), [None, 2.5]),
      "slots": _Slots(weights=jnp.ones((2, 2), jnp.float16), count=7),
      "frozen": _Frozen(pair=_Pair("a", (1, 2)), scale=0.5),
  }
  restored = _roundtrip(tree, inline=inline)
  assert type(restored["pair"]) is _Pair
  assert type(restored["slots"]) is _Slots
  assert type(restored["frozen"]) is _Frozen
  assert restored["slots"].count == 7 and restored["slots"].note == "x"
  assert restored["frozen"].pair == _Pair("a", (1, 2))
  assert type(restored["frozen"].pair.second) is tuple
  assert type(restored["pair"].second) is list
  np.testing.assert_array_equal(restored["slots"].weights,
                                np.ones((2, 2), np.float16))
  assert isinstance(restored["slots"].weights, jax.Array)
  assert restored["slots"].weights.dtype == jnp.float16
  assert restored["pair"].first.dtype == np.int16


def test_mapping_subclasses_keep_their_type_and_order(registered):
  del registered
  tree = collections.OrderedDict([("b", 1), ("a", np.float32(2))])
  restored = _roundtrip(tree)
  assert type(restored) is collections.OrderedDict
  assert list(restored) == ["b", "a"]
  assert type(restored["a"]) is np.float32
  table = _roundtrip(_Table([("z", 1), ("y", [2])]))
  assert type(table) is _Table and list(table.items()) == [("z", 1),
                                                           ("y", [2])]


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
    np.float32(1.5), np.float64(-2.25), np.int8(-3), np.int64(2**40),
    np.uint64(2**64 - 1), np.bool_(True), np.float16(0.1),
    np.complex64(1 + 2j), ml_dtypes.bfloat16(1.5)
], ids=lambda v: type(v).__name__)
@both_layouts
def test_numpy_scalars_keep_dtype_and_scalar_type(value, inline):
  restored = _roundtrip({"x": value}, inline=inline)["x"]
  assert type(restored) is type(value)
  assert restored.dtype == value.dtype
  assert np.asarray(restored).tobytes() == np.asarray(value).tobytes()


@both_layouts
def test_numpy_and_jax_arrays_keep_their_kind_and_dtype(inline):
  tree = {
      "np_int": np.arange(5, dtype=np.uint32),
      "np_bool": np.array([[True, False]]),
      "np_0d": np.array(3.5, np.float32),
      "np_bf16": np.arange(4).astype(ml_dtypes.bfloat16),
      "np_empty": np.zeros((0, 3), np.int8),
      "jax_f32": jnp.linspace(0.0, 1.0, 7),
      "jax_bf16": jnp.arange(3, dtype=jnp.bfloat16) / 3,
      "jax_0d": jnp.int32(9),
  }
  skeleton, stored = _encode(tree, inline=inline)
  # Inline, nothing goes to the arrays item; otherwise every non-empty array.
  assert len(stored) == (0 if inline else 7)
  restored = serialization.decode(skeleton, _leaf(stored))
  _assert_same_tree(
      {k: v for k, v in restored.items() if k != "np_empty"},
      {k: v for k, v in tree.items() if k != "np_empty"})
  for name in ("np_int", "np_bool", "np_0d", "np_bf16", "np_empty"):
    assert type(restored[name]) is np.ndarray, name
  for name in ("jax_f32", "jax_bf16", "jax_0d"):
    assert isinstance(restored[name], jax.Array), name
  assert restored["jax_bf16"].dtype == jnp.bfloat16
  assert restored["np_bf16"].dtype == ml_dtypes.bfloat16
  assert restored["np_empty"].shape == (0, 3)
  assert restored["np_empty"].dtype == np.int8


def test_inline_encoding_copies_numpy_leaves():
  values = np.zeros(3, np.float32)
  skeleton, _ = _encode({"v": values}, inline=True)
  values[:] = 7.0  # Mutating the live value after the save...
  restored = serialization.decode(skeleton, _leaf({}))
  np.testing.assert_array_equal(restored["v"], np.zeros(3))  # ...is not seen.


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
@both_layouts
def test_typed_prng_keys_round_trip(impl, inline):
  keys = jax.random.split(jax.random.key(5, impl=impl), 3)
  restored = _roundtrip({"k": keys, "one": keys[0]}, inline=inline)
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
          np.int64(4): "four", "nested": [(None,), {"a": [np.zeros(1)]}]}
  restored = _roundtrip(tree)
  assert restored["none"] is None
  assert restored["list"] == [] and restored["tuple"] == ()
  assert restored["dict"] == {}
  assert restored[3] == "three"  # An int key stays an int.
  assert type(list(restored)[5]) is int and restored[4] == "four"
  assert type(restored["nested"][0]) is tuple
  np.testing.assert_array_equal(restored["nested"][1]["a"][0], [0.0])
  assert _roundtrip(None) is None


# --- What is refused at save -------------------------------------------------


def test_object_needing_pickle_is_refused_naming_the_path():
  tree = {"state": {"inner": [1, _Opaque(3)]}}
  with pytest.raises(serialization.UnsupportedValueError) as info:
    _encode(tree, where="checkpoint entry 'host_state'")
  message = str(info.value)
  assert "checkpoint entry 'host_state'['state']['inner'][1]" in message
  assert "_Opaque" in message
  assert "checkpoint_allow_pickle" in message
  assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("value", [np.array(["a", "bc"]),
                                   np.array([object()], dtype=object),
                                   np.array([1], "datetime64[s]")],
                         ids=["str", "object", "datetime"])
def test_non_numeric_numpy_array_is_refused_at_save(value):
  with pytest.raises(serialization.UnsupportedValueError, match="entry 'x'"):
    _encode({"y": value}, where="entry 'x'")


@pytest.mark.parametrize("key", [("a", 1), 1.5, True, None],
                         ids=["tuple", "float", "bool", "none"])
def test_dict_key_that_is_not_str_or_int_is_refused(key):
  with pytest.raises(serialization.UnsupportedValueError, match="dict key"):
    _encode({key: np.zeros(1)})


def _local_namedtuple():

  class Local(typing.NamedTuple):
    v: int

  return Local(1)


def test_class_defined_inside_a_function_is_refused_at_save():
  with pytest.raises(serialization.UnsupportedValueError, match="Local"):
    _encode({"x": _local_namedtuple()}, where="entry 'x'")


def test_unregistered_dataclass_is_refused_at_save():
  with pytest.raises(serialization.UnsupportedValueError) as info:
    _encode({"x": [_Unregistered(np.ones(2))]}, where="entry 'x'")
  message = str(info.value)
  assert "entry 'x'['x'][0]" in message
  assert "_Unregistered" in message
  assert "register_checkpoint_class" in message


def test_unregistered_mapping_is_refused_at_save():
  with pytest.raises(serialization.UnsupportedValueError,
                     match="_Table.*register_checkpoint_class"):
    _encode({"t": _Table({"a": 1})})


# --- Pickle ------------------------------------------------------------------


def test_object_round_trips_with_pickle_allowed():
  tree = {"opaque": _Opaque([1, 2]), "w": np.ones(2)}
  restored = _roundtrip(tree, allow_pickle=True)
  assert restored["opaque"] == _Opaque([1, 2])
  np.testing.assert_array_equal(restored["w"], [1.0, 1.0])


def test_pickled_object_is_loaded_only_with_the_flag():
  skeleton, stored = _encode({"p": _RunsOnUnpickle()}, allow_pickle=True)
  with pytest.raises(serialization.RestoreRefusedError,
                     match="checkpoint_allow_pickle"):
    serialization.decode(skeleton, _leaf(stored))
  assert not _SIDE_EFFECTS  # No code from the checkpoint ran.
  # The same bytes do run code once the user opts in: the refusal matters.
  serialization.decode(skeleton, _leaf(stored), allow_pickle=True)
  assert _SIDE_EFFECTS == [(("unpickled",), {})]


def test_structure_pass_never_unpickles():
  skeleton, stored = _encode({"p": _RunsOnUnpickle(), "q": 1},
                             allow_pickle=True)
  restored = serialization.decode(skeleton, _leaf(stored), allow_pickle=True,
                                  unpickle=False)
  assert restored == {"p": None, "q": 1}
  assert not _SIDE_EFFECTS


def test_planted_pickle_node_is_refused():
  payload = base64.b64encode(pickle.dumps(_RunsOnUnpickle())).decode()
  skeleton = {"t": "dict", "cls": None, "k": [["str", "a"]],
              "c": [{"t": "pickle", "b64": payload}]}
  with pytest.raises(serialization.RestoreRefusedError, match="pickled"):
    serialization.decode(skeleton, _leaf({}))
  assert not _SIDE_EFFECTS


# --- The allow-list at restore -----------------------------------------------


def test_registered_dataclass_is_rebuilt_without_running_its_init(registered):
  del registered
  skeleton, stored = _encode({"c": _Checked(np.arange(3))}, inline=True)
  assert len(_INIT_CALLS) == 1  # The live value's own construction.
  _INIT_CALLS.clear()
  restored = serialization.decode(skeleton, _leaf(stored))
  assert type(restored["c"]) is _Checked
  np.testing.assert_array_equal(restored["c"].value, [0, 1, 2])
  assert not _INIT_CALLS, "decode ran __init__/__post_init__"


def test_name_lets_a_moved_class_load(registered):
  del registered
  old_name = "an_old_module.that_is_gone:OldSlots"
  skeleton = {"t": "dataclass", "cls": old_name, "f": ["weights", "count"],
              "c": [{"t": "py", "v": 1.5}, {"t": "py", "v": 3}]}
  with pytest.raises(serialization.RestoreRefusedError) as info:
    serialization.decode(skeleton, _leaf({}))
  assert old_name in str(info.value)
  assert "register_checkpoint_class" in str(info.value)
  serialization.register_checkpoint_class(_Slots, name=old_name)
  restored = serialization.decode(skeleton, _leaf({}))
  assert type(restored) is _Slots
  assert (restored.weights, restored.count) == (1.5, 3)


def test_register_checkpoint_class_takes_containers_only():
  with pytest.raises(TypeError, match="register_checkpoint_class"):
    serialization.register_checkpoint_class(_Opaque)
  assert serialization.register_checkpoint_class(_Slots) is _Slots


def test_dataclass_and_mapping_of_a_trusted_package_load_unregistered():
  key = optax.tree_utils.NamedTupleKey("ScaleByAdamState", "mu")
  assert dataclasses.is_dataclass(key)
  flat = hk.data_structures.to_immutable_dict({"a": {"b": np.ones(2)}})
  for cls in (type(key), type(flat)):
    assert serialization.class_name(cls).split(".")[0] in ("optax", "haiku")
    registry = serialization._REGISTERED  # pylint: disable=protected-access
    assert cls not in registry.values()
  restored = _roundtrip({"key": key, "flat": flat})
  assert type(restored["key"]) is type(key) and restored["key"] == key
  assert type(restored["flat"]) is type(flat)
  np.testing.assert_array_equal(restored["flat"]["a"]["b"], [1.0, 1.0])


def test_classes_come_only_from_modules_already_imported(tmp_path,
                                                         monkeypatch):
  name = "jaxline_unimported_" + uuid.uuid4().hex
  marker = tmp_path / "imported.marker"
  (tmp_path / f"{name}.py").write_text(
      "import typing\n"
      f"open({str(marker)!r}, 'w').close()\n"
      "class Point(typing.NamedTuple):\n"
      "  x: int\n"
      "  y: int\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  skeleton = {"t": "namedtuple", "cls": f"{name}:Point",
              "c": [{"t": "py", "v": 1}, {"t": "py", "v": 2}]}
  with pytest.raises(serialization.RestoreRefusedError, match="not loaded"):
    serialization.decode(skeleton, _leaf({}))
  assert name not in sys.modules
  assert not marker.exists()  # The module's code never ran.
  # Once the user imports it, the same skeleton loads (NamedTuples need no
  # registration).
  module = __import__(name)
  try:
    point = serialization.decode(skeleton, _leaf({}))
    assert type(point) is module.Point and point == (1, 2)
  finally:
    del sys.modules[name]


def _lazily_loaded(directory, name, marker):
  """A module set up by importlib.util.LazyLoader: it runs on first use."""
  (directory / f"{name}.py").write_text(
      "import typing\n"
      f"open({str(marker)!r}, 'w').close()\n"
      "class Point(typing.NamedTuple):\n"
      "  x: int\n")
  spec = importlib.util.spec_from_file_location(
      name, str(directory / f"{name}.py"))
  spec.loader = importlib.util.LazyLoader(spec.loader)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("how", ["module", "attribute", "named"])
def test_lookup_never_runs_a_lazily_loaded_module(tmp_path, monkeypatch, how):
  name = "jaxline_lazy_" + uuid.uuid4().hex
  marker = tmp_path / "loaded.marker"
  lazy = _lazily_loaded(tmp_path, name, marker)
  holder = types.ModuleType(name + "_holder")
  holder.lazy = lazy
  monkeypatch.setitem(sys.modules, name, lazy)
  monkeypatch.setitem(sys.modules, holder.__name__, holder)
  class_name = {"module": f"{name}:Point",
                "attribute": f"{holder.__name__}:lazy.Point",
                "named": f"{holder.__name__}:lazy"}[how]
  skeleton = {"t": "namedtuple", "cls": class_name, "c": [{"t": "py", "v": 1}]}
  with pytest.raises(serialization.RestoreRefusedError):
    serialization.decode(skeleton, _leaf({}))
  assert not marker.exists(), "the lookup ran a module's code"
  assert lazy.Point(1) == (1,) and marker.exists()  # Used, it does run.


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass", "dict"])
@pytest.mark.parametrize("target", [f"{__name__}:_side_effect",
                                    f"{__name__}:_Opaque", "os:system",
                                    "builtins:eval"])
def test_skeleton_cannot_call_functions_or_build_other_classes(kind, target):
  """A class name in the skeleton must name an allow-listed class.

  Otherwise a crafted `meta` file turns `decode` into a call of any function
  in any imported module (`os:system`), without pickle.
  """
  child = [{"t": "py", "v": "touch /nonexistent/jaxline"}]
  skeleton = {
      "namedtuple": {"t": "namedtuple", "cls": target, "c": child},
      "dataclass": {"t": "dataclass", "cls": target, "f": ["cmd"],
                    "c": child},
      "dict": {"t": "dict", "cls": target, "k": [["str", "cmd"]],
               "c": child},
  }[kind]
  with pytest.raises(serialization.RestoreRefusedError) as info:
    serialization.decode(skeleton, _leaf({}))
  assert target in str(info.value)
  assert "allow-list" in str(info.value)  # Refused by name, before any use.
  assert not _SIDE_EFFECTS, "decode called a function named by the checkpoint"


def test_registered_class_of_another_kind_is_refused(registered):
  del registered
  name = serialization.class_name(_Slots)
  skeleton = {"t": "namedtuple", "cls": name, "c": [{"t": "py", "v": 1}]}
  with pytest.raises(serialization.RestoreRefusedError, match="NamedTuple"):
    serialization.decode(skeleton, _leaf({}))


@pytest.mark.parametrize("skeleton", [
    {"t": "exec", "v": "print(1)"},
    {"t": "py", "v": [1, 2]},
    {"t": "list"},
    {"t": "dict", "cls": None, "k": [["float", 1.5]], "c": [{"t": "none"}]},
    {"t": "dataclass", "cls": "no_colon", "f": [], "c": []},
    [1, 2],
], ids=["kind", "py-value", "no-children", "key", "class-name", "not-dict"])
def test_malformed_skeleton_is_damage(skeleton):
  with pytest.raises(serialization.DamagedCheckpointError):
    serialization.decode(skeleton, _leaf({}))


def test_unknown_dataclass_field_is_damage(registered):
  del registered
  skeleton = {"t": "dataclass", "cls": serialization.class_name(_Slots),
              "f": ["__class__"], "c": [{"t": "py", "v": 1}]}
  with pytest.raises(serialization.DamagedCheckpointError, match="__class__"):
    serialization.decode(skeleton, _leaf({}))


# --- inline_array ------------------------------------------------------------


def _inline(shape, dtype, raw):
  return {"t": "np", "shape": shape, "dtype": dtype,
          "b64": base64.b64encode(raw).decode()}


def test_inline_array_reads_what_encode_wrote():
  value = np.arange(6, dtype=np.float32).reshape(2, 3)
  node = _inline([2, 3], "float32", value.tobytes())
  restored = serialization.inline_array(node)
  np.testing.assert_array_equal(restored, value)
  restored[0, 0] = 5.0  # Writable: a copy, not a view of the JSON text.


@pytest.mark.parametrize("node", [
    _inline([2**40, 2**20], "float32", b"\0" * 8),
    _inline([3], "float32", b"\0" * 8),
    _inline([2], "float32", b"\0" * 12),
    {"t": "np", "empty": [[2**40, 2**20], "float32"]},
    {"t": "np", "empty": [[4096, 4096, 64], "float32"]},
    {"t": "np", "empty": [[0, -1], "float32"]},
    _inline([1], "object", b"\0" * 8),
    _inline([1], "str_", b"\0" * 8),
    _inline([1], "bytes_", b"\0" * 8),
    _inline([1], "<U2", b"\0" * 8),
    _inline([1], "datetime64", b"\0" * 8),
    _inline([1], "void", b"\0" * 8),
    _inline([[1]], "float32", b"\0" * 4),
    _inline([1] * 65, "uint8", b"\0"),
    {"t": "np", "shape": [1], "dtype": "uint8", "b64": "not base64!"},
], ids=["absurd-shape", "too-few-bytes", "too-many-bytes", "empty-absurd",
        "empty-large", "empty-negative", "object", "str", "bytes", "unicode",
        "datetime", "void", "nested-shape", "rank-65", "bad-base64"])
def test_inline_array_refuses_bad_nodes_without_allocating(node):
  tracemalloc.start()
  try:
    with pytest.raises((serialization.DamagedCheckpointError, ValueError)):
      serialization.inline_array(node)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 2**20, f"allocated {peak} bytes for a refused node"


def test_inline_array_refusals_are_damage_not_other_errors():
  """A `leaf` raising DamagedCheckpointError lets a resume fall back."""
  for node in (_inline([2**40, 2**20], "float32", b"\0" * 8),
               {"t": "np", "empty": [[5], "float32"]},
               _inline([1], "object", b"\0" * 8)):
    with pytest.raises(serialization.DamagedCheckpointError):
      serialization.inline_array(node)
