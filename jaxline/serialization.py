"""Pytrees to (JSON skeleton, flat arrays) and back, with no pickle.

Orbax restores arrays without a target as plain numpy in plain dicts. Most
jaxline experiments create parameters and optimizer state lazily, so there is
no live target to copy types from. The skeleton records each container's type
(dict, list, tuple, NamedTuple, dataclass, Mapping) and each leaf's kind, so a
restore rebuilds optax's NamedTuple states and haiku's nested dicts exactly.

Classes are only looked up in modules that are already imported: loading a
checkpoint never imports or runs code named by the checkpoint. Objects that
would need pickle are refused at save time unless pickle is allowed.
"""

import collections.abc
import dataclasses
import pickle
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from jaxline import devices
from jaxline import sharding


class UnsupportedValueError(TypeError):
  """A value a checkpoint cannot hold without pickle."""


class RestoreRefusedError(ValueError):
  """Loading would run code (pickle) or name a class we may not use.

  Unlike a damaged file, this is not a reason to fall back to an older
  checkpoint: the fix is in the config or the imports.
  """


def _is_allowed_class(obj: Any) -> bool:
  """Only container classes are rebuilt: never arbitrary callables."""
  if not isinstance(obj, type):
    return False
  return ((issubclass(obj, tuple) and hasattr(obj, "_fields")) or
          dataclasses.is_dataclass(obj) or
          issubclass(obj, collections.abc.Mapping))


def _class_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _lookup_class(name: str) -> type:
  module_name, qualname = name.split(":")
  module = sys.modules.get(module_name)
  if module is None:
    raise RestoreRefusedError(
        f"The checkpoint holds a {qualname} from module {module_name!r}, "
        "which is not imported. Import it before restoring; checkpoints "
        "never import modules themselves.")
  obj = module
  for part in qualname.split("."):
    obj = getattr(obj, part, None)
  if not _is_allowed_class(obj):
    raise RestoreRefusedError(
        f"The checkpoint names {name!r}, which is not a NamedTuple, "
        "dataclass or Mapping class; refusing to call it.")
  return obj


def _checked_class_name(cls: type, where: str) -> str:
  """The class's import name, if a restore will find this very class."""
  name = _class_name(cls)
  try:
    found = _lookup_class(name)
  except (RestoreRefusedError, ValueError):
    found = None
  if found is not cls:
    raise UnsupportedValueError(
        f"{where or 'value'} is a {cls.__qualname__}, which a restore could "
        f"not find again as {name!r} (defined inside a function?). Define "
        "it at module level.")
  return name


def _encode_key(key: Any) -> List[Any]:
  if isinstance(key, str):
    return ["str", key]
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return ["int", int(key)]
  raise UnsupportedValueError(f"dict key {key!r} of type {type(key).__name__}")


def _decode_key(encoded: List[Any]) -> Any:
  kind, value = encoded
  return value if kind == "str" else int(value)


def _is_per_device(x: jax.Array) -> bool:
  return (x.ndim >= 1 and len(x.sharding.device_set) > 1 and
          not x.is_fully_replicated)


def _mesh_spec(x: jax.Array) -> Optional[List[Any]]:
  """The PartitionSpec of a sharded-style array (over the data mesh)."""
  s = x.sharding
  if (isinstance(s, jax.sharding.NamedSharding) and
      s.mesh.axis_names == (sharding.DATA_AXIS,)):
    return [list(p) if isinstance(p, tuple) else p for p in s.spec]
  return None


def _host_value(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  raise UnsupportedValueError(
      f"an array of shape {x.shape} sharded across processes; disk "
      "checkpoints hold replicated or process-local arrays only")


def encode(tree: Any, *, allow_pickle: bool = False,
           path: str = "") -> Tuple[Any, Dict[str, np.ndarray]]:
  """Returns (skeleton, arrays): JSON-able structure and numpy leaves."""
  arrays: Dict[str, np.ndarray] = {}

  def add(value: np.ndarray) -> str:
    name = str(len(arrays))
    arrays[name] = value
    return name

  def pickled(x: Any, where: str, what: str) -> Any:
    if allow_pickle:
      return {"t": "pickle",
              "i": add(np.frombuffer(pickle.dumps(x), dtype=np.uint8))}
    raise UnsupportedValueError(
        f"{where or 'value'} is {what}, which a checkpoint can only hold with "
        "pickle. Store numeric arrays, numbers, strings and containers of "
        "them (dict, list, tuple, NamedTuple, dataclass), or set "
        "config.checkpoint_allow_pickle=True if you trust every checkpoint "
        "you will load.")

  def array_node(kind: str, value: np.ndarray, where: str) -> Any:
    # Object, string and structured arrays; ml_dtypes (bfloat16...) are fine.
    if value.dtype.kind in "OSU" or value.dtype.type is np.void:
      return pickled(value, where, f"an array of dtype {value.dtype}")
    if value.size == 0:  # Orbax refuses empty arrays: keep shape and dtype.
      return {"t": kind, "empty": [list(value.shape), value.dtype.name]}
    return {"t": kind, "i": add(value)}

  def enc(x: Any, where: str) -> Any:
    if x is None:
      return {"t": "none"}
    if isinstance(x, np.generic):  # Before float: np.float64 is a float.
      return array_node("npscalar", np.asarray(x), where)
    if isinstance(x, (bool, int, float, str)):
      return {"t": "py", "v": x}
    if isinstance(x, jax.Array):
      impl = None
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(x))
        x = jax.random.key_data(x)
      spec = _mesh_spec(x)
      per_device = spec is None and _is_per_device(x)
      try:
        value = _host_value(x)
      except UnsupportedValueError as e:
        raise UnsupportedValueError(f"{where or 'value'} is {e}.") from None
      node = array_node("jax", value, where)
      node.update(key=impl, per_device=per_device, spec=spec)
      return node
    if isinstance(x, np.ndarray):
      return array_node("np", np.array(x), where)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      return {"t": "namedtuple", "cls": _checked_class_name(type(x), where),
              "c": [enc(v, f"{where}.{f}") for f, v in zip(x._fields, x)]}
    if isinstance(x, (list, tuple)):
      return {"t": type(x).__name__,
              "c": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, collections.abc.Mapping):
      items = list(x.items())
      return {"t": "dict", "cls": None if type(x) is dict else
                  _checked_class_name(type(x), where),
              "k": [_encode_key(k) for k, _ in items],
              "c": [enc(v, f"{where}[{k!r}]") for k, v in items]}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      fields = [f.name for f in dataclasses.fields(x) if f.init]
      return {"t": "dataclass", "cls": _checked_class_name(type(x), where),
              "f": fields,
              "c": [enc(getattr(x, f), f"{where}.{f}") for f in fields]}
    return pickled(x, where,
                   f"a {type(x).__module__}.{type(x).__qualname__}")

  return enc(tree, path), arrays


def decode(skeleton: Any, arrays: Dict[str, np.ndarray], *,
           allow_pickle: bool = False) -> Any:
  """Rebuilds the pytree `encode` described, with `jax.Array`s on device."""

  def values(node: Any) -> np.ndarray:
    if "empty" in node:
      shape, dtype = node["empty"]
      return np.zeros(shape, dtype=jax.numpy.dtype(dtype))
    return np.asarray(arrays[node["i"]])

  def dec(node: Any) -> Any:
    kind = node["t"]
    if kind == "none":
      return None
    if kind == "py":
      return node["v"]
    if kind == "np":
      return values(node)
    if kind == "npscalar":
      return values(node)[()]
    if kind == "jax":
      value = values(node)
      if node.get("spec") is not None:
        spec = jax.sharding.PartitionSpec(
            *(tuple(p) if isinstance(p, list) else p for p in node["spec"]))
        array = sharding.place(value, jax.sharding.NamedSharding(
            sharding.data_parallel_mesh(), spec))
      elif (node.get("per_device") and value.ndim and
            value.shape[0] == jax.local_device_count()):
        array = jax.device_put(value, devices.per_device_sharding())
      else:
        array = jax.device_put(value)
      if node.get("key"):
        array = jax.random.wrap_key_data(array, impl=node["key"])
      return array
    if kind == "list":
      return [dec(c) for c in node["c"]]
    if kind == "tuple":
      return tuple(dec(c) for c in node["c"])
    if kind == "namedtuple":
      return _lookup_class(node["cls"])(*(dec(c) for c in node["c"]))
    if kind == "dict":
      value = {_decode_key(k): dec(c) for k, c in zip(node["k"], node["c"])}
      return _lookup_class(node["cls"])(value) if node["cls"] else value
    if kind == "dataclass":
      cls = _lookup_class(node["cls"])
      return cls(**{f: dec(c) for f, c in zip(node["f"], node["c"])})
    if kind == "pickle":
      if not allow_pickle:
        raise RestoreRefusedError(
            "This checkpoint holds a pickled object, and loading it would run "
            "code from the checkpoint. Set config.checkpoint_allow_pickle="
            "True only if you trust where the checkpoint came from.")
      return pickle.loads(arrays[node["i"]].tobytes())
    raise ValueError(f"Unknown node kind {kind!r} in checkpoint skeleton.")

  return dec(skeleton)


def describe(skeleton: Any) -> str:
  """A short structure string for error messages: types, keys and shapes."""
  kind = skeleton["t"]
  if kind in ("py", "none"):
    return type(skeleton.get("v")).__name__
  if kind in ("jax", "np", "npscalar", "pickle"):
    return "array"
  if kind == "dict":
    inner = ", ".join(f"{_decode_key(k)!r}: {describe(c)}"
                      for k, c in zip(skeleton["k"], skeleton["c"]))
    return "{" + inner + "}"
  name = skeleton.get("cls", kind) or kind
  name = name.split(":")[-1]
  return f"{name}(" + ", ".join(describe(c) for c in skeleton["c"]) + ")"


def entry_attributes(experiment: Any) -> Dict[str, str]:
  """Checkpoint name -> attribute name, for messages."""
  names = {}
  for attr_map in (experiment.NON_BROADCAST_CHECKPOINT_ATTRS,
                   experiment.CHECKPOINT_ATTRS):
    names.update({name: attr for attr, name in attr_map.items()})
  return names


def _structure(value: Any) -> str:
  shapes = [getattr(x, "shape", ()) for x in jax.tree.leaves(value)]
  return f"{jax.tree.structure(value)} with leaf shapes {shapes}"


def check_snapshot_matches(experiment: Any, saved: Dict[str, Any]) -> None:
  """Raises ValueError if `saved` does not fit `experiment`'s attributes.

  Structures are compared for CHECKPOINT_ATTRS only: non-broadcast values
  (host lists that grow, counters) legitimately change shape over training.
  """
  live = experiment.snapshot_state()
  compared = set(experiment.CHECKPOINT_ATTRS.values())
  attrs = entry_attributes(experiment)
  describe = lambda name: f"{name!r} (attribute {attrs.get(name, '?')})"
  missing = sorted(set(live) - set(saved), key=str)
  extra = sorted(set(saved) - set(live), key=str)
  if missing or extra:
    raise ValueError(
        "The checkpoint does not match the experiment: "
        f"missing from the checkpoint: {[describe(n) for n in missing]}; "
        f"in the checkpoint but not the experiment: {extra}. Checkpoint "
        f"entries: {sorted(map(str, saved))}; experiment entries: "
        f"{sorted(map(str, live))}.")
  for name, live_value in live.items():
    saved_value = saved[name]
    if name not in compared or live_value is None or saved_value is None:
      continue  # Host state, or lazily created state not there yet.
    if (jax.tree.structure(live_value) != jax.tree.structure(saved_value) or
        [getattr(x, "shape", ()) for x in jax.tree.leaves(live_value)] !=
        [getattr(x, "shape", ()) for x in jax.tree.leaves(saved_value)]):
      raise ValueError(
          f"Checkpoint entry {describe(name)} has another structure than the "
          f"experiment's.\n  checkpoint: {_structure(saved_value)}\n  "
          f"experiment: {_structure(live_value)}")
