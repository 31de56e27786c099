"""Checkpoint trees as a JSON skeleton plus arrays, rebuilt without running code.

Orbax saves the arrays. What it cannot rebuild is the Python around them
(optax's NamedTuple states, haiku's dicts, dataclasses): most experiments
create that state lazily, so at restore there is often no live value to copy
types from. The skeleton records every container and leaf kind in JSON.

A checkpoint is untrusted input. Decoding never imports a module, looks
names up only in module and class `__dict__`s (no module `__getattr__`), and
builds only allow-listed classes:
- the builtin containers (dict, list, tuple, OrderedDict);
- NamedTuples, built with `tuple.__new__` so no `__new__` of theirs runs;
- dataclasses and Mappings defined by jax, optax, haiku, flax and chex;
- classes registered with `register_checkpoint_class`.
Dataclasses are filled in field by field, without calling their `__init__`.
Anything else is refused at save time already, so a run learns at its first
save, not at a restore days later. Pickle stays off unless allowed.
"""

import base64
import collections
import collections.abc
import dataclasses
import math
import pickle
import sys
import types
from typing import Any, Callable, Dict, List, Optional

import jax
import ml_dtypes
import numpy as np

# Packages whose pytree node classes checkpoints may rebuild.
TRUSTED_PACKAGES = ("jax", "jaxlib", "optax", "haiku", "flax", "chex")
_BUILTIN_MAPPINGS = {"builtins:dict": dict,
                     "collections:OrderedDict": collections.OrderedDict}
_REGISTERED: Dict[str, type] = {}
ARRAY_KINDS = ("np", "npscalar", "jax")


class UnsupportedValueError(TypeError):
  """A value a checkpoint cannot hold without pickle."""


class RestoreRefusedError(ValueError):
  """Restoring would run code or build a class that is not allowed.

  Unlike a damaged file this is no reason to fall back to an older
  checkpoint: the fix is in the config or in `register_checkpoint_class`.
  """


class DamagedCheckpointError(ValueError):
  """The checkpoint's description is not what jaxline writes."""


def class_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _is_namedtuple_class(cls: Any) -> bool:
  return (isinstance(cls, type) and issubclass(cls, tuple) and
          isinstance(vars(cls).get("_fields"), tuple))


def _is_container_class(cls: Any) -> bool:
  return issubclass(type(cls), type) and (
      _is_namedtuple_class(cls) or dataclasses.is_dataclass(cls) or
      issubclass(cls, collections.abc.Mapping))


def register_checkpoint_class(cls: type, *, name: Optional[str] = None) -> type:
  """Lets disk checkpoints rebuild `cls`, a dataclass or Mapping of yours.

  Call it (or use it as a class decorator) in the module that defines the
  class, so it is registered whenever the class exists. `name` keeps old
  checkpoints loading after the class moved: pass its former
  "module:QualName". NamedTuples need no registration.
  """
  if not _is_container_class(cls):
    raise TypeError(f"register_checkpoint_class takes a dataclass, NamedTuple "
                    f"or Mapping class, not {cls!r}.")
  _REGISTERED[name or class_name(cls)] = cls
  return cls


def _find_class(name: str) -> type:
  """The allow-listed class `name` names; never imports or calls anything."""
  if not isinstance(name, str) or name.count(":") != 1:
    raise DamagedCheckpointError(f"bad class name {name!r}")
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name in _BUILTIN_MAPPINGS:
    return _BUILTIN_MAPPINGS[name]
  module_name, qualname = name.split(":")
  how_to = (f"If you trust it, call jaxline.serialization."
            f"register_checkpoint_class(<the class>, name={name!r}) in the "
            "module that defines it.")
  module = sys.modules.get(module_name)
  obj: Any = module
  for part in qualname.split("."):
    # Only modules and classes, read without attribute hooks: a lazily
    # loaded module (importlib.util.LazyLoader) would run on any getattr.
    namespace = (object.__getattribute__(obj, "__dict__") if issubclass(
        type(obj), (types.ModuleType, type)) else None)
    obj = namespace.get(part) if isinstance(
        namespace, (dict, type(vars(object)))) else None
  if module is None or not _is_container_class(obj):
    raise RestoreRefusedError(
        f"The checkpoint names the class {name!r}, which is not loaded or not "
        f"on the allow-list of classes a checkpoint may build. {how_to}")
  trusted = module_name.split(".")[0] in TRUSTED_PACKAGES
  if not (_is_namedtuple_class(obj) or trusted):
    raise RestoreRefusedError(
        f"The checkpoint names the class {name!r}, which is not on the "
        f"allow-list of classes a checkpoint may build. {how_to}")
  return obj


def _checked_class_name(cls: type, where: str) -> str:
  """The name a restore will find `cls` under; refuses it otherwise."""
  names = [n for n, c in _REGISTERED.items() if c is cls] + [class_name(cls)]
  for name in names:
    try:
      if _find_class(name) is cls:
        return name
    except (RestoreRefusedError, DamagedCheckpointError):
      pass
  raise UnsupportedValueError(
      f"{where or 'value'} is a {class_name(cls)}, which a restore would not "
      "be allowed to rebuild. Register it with jaxline.serialization."
      "register_checkpoint_class (define it at module level), store "
      "plain dicts, lists, tuples or NamedTuples, or set "
      "config.checkpoint_backend='memory' to keep checkpoints in memory, as "
      "jaxline 0.0.8 did.")


def _encode_key(key: Any) -> List[Any]:
  if isinstance(key, str):
    return ["str", key]
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return ["int", int(key)]
  raise UnsupportedValueError(f"dict key {key!r} of type {type(key).__name__}")


def _decode_key(encoded: Any) -> Any:
  kind, value = encoded
  if kind == "str" and isinstance(value, str):
    return value
  if kind == "int" and isinstance(value, int):
    return value
  raise DamagedCheckpointError(f"bad dict key {encoded!r}")


def mesh_spec(x: jax.Array) -> Optional[List[Any]]:
  """The PartitionSpec of an array on a named mesh, as JSON."""
  s = x.sharding
  if isinstance(s, jax.sharding.NamedSharding):
    return [list(p) if isinstance(p, tuple) else p for p in s.spec]
  return None


def is_per_device(x: jax.Array) -> bool:
  """A pmap-style value: leading axis split over this process's devices."""
  return (x.ndim >= 1 and x.is_fully_addressable and
          len(x.sharding.device_set) > 1 and not x.is_fully_replicated and
          not isinstance(x.sharding, jax.sharding.NamedSharding))


def dtype_from_name(name: Any) -> np.dtype:
  """Numeric dtypes only (ml_dtypes' too); anything else is damage."""
  if isinstance(name, str) and name.isidentifier():
    extra = vars(ml_dtypes).get(name)
    if isinstance(extra, type) and issubclass(extra, np.generic):
      return np.dtype(extra)
    if name in np.sctypeDict:
      dtype = np.dtype(np.sctypeDict[name])
      if dtype.kind in "biufc":
        return dtype
  raise DamagedCheckpointError(f"bad dtype {name!r}")


def shape_from_list(shape: Any) -> tuple[int, ...]:
  if (not isinstance(shape, list) or len(shape) > 64 or
      not all(isinstance(d, int) and 0 <= d < 2**62 for d in shape)):
    raise DamagedCheckpointError(f"bad shape {shape!r}")
  return tuple(shape)


def encode(tree: Any, *, where: str, add_array: Callable[[Any], int],
           inline: bool, allow_pickle: bool = False) -> Any:
  """Returns the JSON skeleton of `tree`.

  Arrays go to `add_array` (which returns their index), except with `inline`
  (per-process host state), where process-local values are kept in the
  skeleton itself as base64 and only arrays spanning processes are added.
  """

  def pickled(x: Any, at: str, what: str) -> Any:
    if allow_pickle:
      return {"t": "pickle", "b64": base64.b64encode(pickle.dumps(x)).decode()}
    raise UnsupportedValueError(
        f"{at or 'value'} is {what}, which a checkpoint can only hold with "
        "pickle. Store numeric arrays, numbers, strings and containers of "
        "them (dict, list, tuple, NamedTuple, registered dataclass), or set "
        "config.checkpoint_allow_pickle=True if you trust every checkpoint "
        "you will load.")

  def array(kind: str, value: Any, at: str, **extra) -> Any:
    dtype = value.dtype
    if dtype.kind in "OSUMm" or (dtype.kind == "V" and
                                 dtype.type.__module__ != "ml_dtypes"):
      return pickled(np.asarray(value), at, f"an array of dtype {dtype}")
    node = {"t": kind, **extra}
    if value.size == 0:  # Orbax refuses empty arrays: keep shape and dtype.
      node["empty"] = [list(value.shape), dtype.name]
    elif inline and not (isinstance(value, jax.Array) and
                         not value.is_fully_addressable):
      host = np.array(jax.device_get(value), order="C")
      node.update(shape=list(host.shape), dtype=dtype.name,
                  b64=base64.b64encode(host.tobytes()).decode())
    else:
      node["i"] = add_array(value)
    return node

  def enc(x: Any, at: str) -> Any:
    if x is None:
      return {"t": "none"}
    if isinstance(x, np.generic):  # Before float: np.float64 is a float.
      return array("npscalar", np.asarray(x), at)
    if isinstance(x, (bool, int, float, str)):
      return {"t": "py", "v": x}
    if isinstance(x, jax.Array):
      key = None
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        key = str(jax.random.key_impl(x))
        x = jax.random.key_data(x)
      return array("jax", x, at, key=key, per_device=is_per_device(x),
                   spec=mesh_spec(x))
    if isinstance(x, np.ndarray):
      return array("np", x if inline else np.array(x), at)
    if isinstance(x, tuple) and _is_namedtuple_class(type(x)):
      return {"t": "namedtuple", "cls": _checked_class_name(type(x), at),
              "c": [enc(v, f"{at}.{f}") for f, v in zip(x._fields, x)]}
    if type(x) in (list, tuple):
      return {"t": type(x).__name__,
              "c": [enc(v, f"{at}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, collections.abc.Mapping):
      items = list(x.items())
      return {"t": "dict",
              "cls": None if type(x) is dict else _checked_class_name(
                  type(x), at),
              "k": [_encode_key(k) for k, _ in items],
              "c": [enc(v, f"{at}[{k!r}]") for k, v in items]}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      fields = [f.name for f in dataclasses.fields(x)]
      return {"t": "dataclass", "cls": _checked_class_name(type(x), at),
              "f": fields,
              "c": [enc(getattr(x, f), f"{at}.{f}") for f in fields]}
    return pickled(x, at, f"a {class_name(type(x))}")

  return enc(tree, where)


def decode(skeleton: Any, leaf: Callable[[Dict[str, Any]], Any], *,
           allow_pickle: bool = False, unpickle: bool = True) -> Any:
  """Rebuilds the tree `encode` described; `leaf(node)` makes each array.

  With `unpickle=False` a pickled object (when allowed) stays None: a first
  pass that only checks structure must not run its code.
  """

  def dec(node: Any) -> Any:
    if not isinstance(node, dict):
      raise DamagedCheckpointError(f"bad skeleton node {node!r:.80}")
    kind = node.get("t")
    if kind == "none":
      return None
    if kind == "py":
      value = node["v"]
      if not isinstance(value, (bool, int, float, str)):
        raise DamagedCheckpointError(f"bad value {value!r:.80}")
      return value
    if kind in ARRAY_KINDS:
      return leaf(node)
    if kind in ("list", "tuple"):
      children = [dec(c) for c in node["c"]]
      return children if kind == "list" else tuple(children)
    if kind == "namedtuple":
      cls = _find_class(node["cls"])
      if not _is_namedtuple_class(cls):
        raise RestoreRefusedError(f"{node['cls']!r} is not a NamedTuple.")
      return tuple.__new__(cls, [dec(c) for c in node["c"]])
    if kind == "dict":
      value = {_decode_key(k): dec(c) for k, c in zip(node["k"], node["c"])}
      if node.get("cls") is None:
        return value
      cls = _find_class(node["cls"])
      if not issubclass(cls, collections.abc.Mapping):
        raise RestoreRefusedError(f"{node['cls']!r} is not a Mapping.")
      return cls(value)
    if kind == "dataclass":
      cls = _find_class(node["cls"])
      if not dataclasses.is_dataclass(cls):
        raise RestoreRefusedError(f"{node['cls']!r} is not a dataclass.")
      names = {f.name for f in dataclasses.fields(cls)}
      obj = object.__new__(cls)  # No __init__ or __post_init__ runs.
      for name, child in zip(node["f"], node["c"]):
        if name not in names:
          raise DamagedCheckpointError(f"{node['cls']} has no field {name!r}")
        object.__setattr__(obj, name, dec(child))
      return obj
    if kind == "pickle":
      if not allow_pickle:
        raise RestoreRefusedError(
            "This checkpoint holds a pickled object, and loading it would run "
            "code from the checkpoint. Set config.checkpoint_allow_pickle="
            "True only if you trust where the checkpoint came from.")
      if not unpickle:
        return None
      data = (base64.b64decode(node["b64"]) if "b64" in node else
              np.asarray(leaf(node)).tobytes())
      return pickle.loads(data)
    raise DamagedCheckpointError(f"unknown skeleton node kind {kind!r}")

  try:
    return dec(skeleton)
  except (KeyError, TypeError, IndexError, RecursionError) as e:
    raise DamagedCheckpointError(
        f"malformed skeleton ({type(e).__name__}: {e})") from None


def inline_array(node: Dict[str, Any]) -> np.ndarray:
  """The host array kept in a skeleton node; its size is checked first."""
  if "empty" in node:
    shape, dtype = node["empty"]
    shape = shape_from_list(shape)
    if math.prod(shape):
      raise DamagedCheckpointError(f"'empty' array of shape {shape}")
    return np.zeros(shape, dtype_from_name(dtype))
  shape = shape_from_list(node["shape"])
  dtype = dtype_from_name(node["dtype"])
  raw = base64.b64decode(node["b64"], validate=True)
  if len(raw) != math.prod(shape) * dtype.itemsize:
    raise DamagedCheckpointError(
        f"array of shape {shape} {dtype} holds {len(raw)} bytes")
  return np.frombuffer(raw, dtype).reshape(shape).copy()
