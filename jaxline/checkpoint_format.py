"""One checkpoint step on disk: what each Orbax item holds, and reading it back.

A step directory holds three items of an Orbax Composite:
- `arrays`: the arrays of every `CHECKPOINT_ATTRS` entry, as `jax.Array`s.
  In a multi-process job every process writes its own shards; nothing is
  gathered. A pmap-style value (device 0's slice, local to each process) is
  first made one array replicated over one device per process, since Orbax
  saves global arrays only.
- `meta`: JSON from the chief: the format, the skeleton of those entries
  (`serialization`), the process count and the run's `experiment_kwargs`.
- `host`: one JSON file per process, `process_<i>.json`: its
  `NON_BROADCAST_CHECKPOINT_ATTRS` values and the loop's fields (global_step,
  the key state, the best metric), with small arrays inline. Arrays that span
  processes are in `arrays` even there.

A read rebuilds the skeleton twice: first with placeholders, to check the
checkpoint against the experiment and to choose each array's target
sharding, then with the arrays Orbax read straight onto those shardings.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Dict, Mapping, Optional

from absl import logging
from etils import epath
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import orbax.checkpoint as ocp

from jaxline import devices
from jaxline import experiment as experiment_lib
from jaxline import restore_checks
from jaxline import run_config
from jaxline import serialization
from jaxline import sharding as sharding_lib

FORMAT_VERSION = 2
ENTRIES = "experiment_module"
# The step saved before this one in its series, for eval followers.
PREVIOUS_STEP = "_previous_step"
_PLACEHOLDER = "_no_arrays"
_SavedArray = restore_checks.SavedArray
# experiment_kwargs differences already logged by this process.
_WARNED = set()


def host_filename(process_index: int) -> str:
  return f"process_{process_index}.json"


def _process_mesh() -> jax.sharding.Mesh:
  """One device per process: the home of a value every process holds."""
  firsts = [jax.local_devices(process_index=p)[0]
            for p in range(jax.process_count())]
  return jax.sharding.Mesh(np.array(firsts), ("processes",))


def _per_process_replicated() -> NamedSharding:
  return NamedSharding(_process_mesh(), PartitionSpec())


def _global(x: Any) -> Any:
  """`x` as Orbax saves it in a job of several processes."""
  if (not isinstance(x, jax.Array) or jax.process_count() == 1 or
      not x.is_fully_addressable):
    return x
  sharding = _per_process_replicated()
  mine = sharding.mesh.devices.flat[jax.process_index()]
  return jax.make_array_from_single_device_arrays(
      x.shape, sharding, [jax.device_put(x, mine)])


def encode_state(state: Mapping[str, Any], *, series: str,
                 allow_pickle: bool, experiment_kwargs: Dict[str, Any],
                 previous_step: Optional[int] = None,
                 detach: bool = False) -> Dict[str, Any]:
  """The Composite arguments of one save, built the same on every process.

  With `detach`, every array handed to Orbax is a new on-device copy made
  without waiting for the device, so the save can be written after the
  caller has moved on: the next step may donate the live buffers.
  """
  experiment = state.get(ENTRIES)
  fresh = set()  # ids of arrays made for this save.
  if experiment is None:
    snapshot = {}
  elif detach:
    snapshot = _detached_snapshot(experiment, fresh)
  else:
    snapshot = experiment.snapshot_state()
  shared = (set(experiment.CHECKPOINT_ATTRS.values())
            if experiment is not None else set())
  attrs = (restore_checks.entry_attributes(experiment)
           if experiment is not None else {})
  arrays: Dict[str, Any] = {}

  def add(x: Any) -> str:
    key = str(len(arrays))
    arrays[key] = _global(x) if isinstance(x, jax.Array) else np.array(x)
    return key

  def enc(value, where, inline):
    return serialization.encode(value, where=where, add_array=add,
                                inline=inline, allow_pickle=allow_pickle)

  where = lambda name: (f"checkpoint entry {name!r} (attribute "
                        f"{attrs.get(name, name)})")
  entries = {name: enc(v, where(name), False)
             for name, v in snapshot.items() if name in shared}
  host = {"format": FORMAT_VERSION, "process_index": jax.process_index(),
          "entries": {name: enc(v, where(name), True)
                      for name, v in snapshot.items() if name not in shared},
          "fields": {key: enc(v, f"state field {key!r}", True)
                     for key, v in state.items() if key != ENTRIES}}
  meta = {"format": FORMAT_VERSION, "series": series,
          "step": int(state["global_step"]),
          "process_count": jax.process_count(),
          "style": "sharded" if experiment_lib.is_sharded(experiment)
                   else "pmap",
          "entries": entries, "experiment_kwargs": experiment_kwargs,
          "previous_step": previous_step}
  if detach:
    arrays = _detached(arrays, fresh)
  if not arrays:  # Orbax refuses an empty item.
    arrays[_PLACEHOLDER] = np.zeros([1], np.uint8)
  return {"arrays": ocp.args.StandardSave(arrays),
          "meta": ocp.args.JsonSave(meta), "host": ocp.args.JsonSave(host)}


@functools.lru_cache(maxsize=None)
def _select_firsts():
  # A select on a runtime flag, not a plain slice: XLA:CPU runs a program
  # that only copies in the calling thread, which would stall the loop for
  # the whole copy; a select is dispatched like any other computation. One
  # program for all of a save's arrays: one compile, at the first save.
  return jax.jit(lambda xs, keep: [
      jax.numpy.where(keep, x[0], jax.numpy.zeros_like(x[0])) for x in xs])


def _first_source(x: Any) -> Optional[jax.Array]:
  """The array whose `[0]` is `devices.get_first(x)`, on one device if it can.

  None where `devices.get_first` is used as it is.
  """
  if (not isinstance(x, jax.Array) or not x.ndim or
      jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
    return None
  source = devices.first_source(x)
  return source if len(source.sharding.device_set) == 1 else None


def _detached_firsts(tree: Any, fresh: set[int]) -> Any:
  """`devices.get_first(tree)`, its arrays fresh copies made without waiting.

  Adds the new arrays' ids to `fresh`: they need no further copy.
  """
  leaves, treedef = jax.tree.flatten(tree)
  out = list(leaves)
  groups: Dict[frozenset, list] = {}
  for i, leaf in enumerate(leaves):
    source = _first_source(leaf)
    if source is None:
      out[i] = devices.get_first(leaf)
    else:
      groups.setdefault(frozenset(source.sharding.device_set), []).append(
          (i, source))
  for members in groups.values():
    firsts = _select_firsts()([x for _, x in members], np.bool_(True))
    for (i, _), first in zip(members, firsts):
      out[i] = first
      fresh.add(id(first))
  return jax.tree.unflatten(treedef, out)


def _detached_snapshot(experiment: Any, fresh: set[int]) -> Dict[str, Any]:
  """`experiment.snapshot_state()`, its arrays fresh copies where it is ours.

  A subclass's own `snapshot_state` is called as it is; `_detached` then
  copies what it returns.
  """
  if (type(experiment).snapshot_state is not
      experiment_lib.AbstractExperiment.snapshot_state or
      experiment_lib.is_sharded(experiment)):
    return experiment.snapshot_state()
  if not (experiment.CHECKPOINT_ATTRS or
          experiment.NON_BROADCAST_CHECKPOINT_ATTRS):
    return experiment.snapshot_state()  # Its warning.
  per_device = {name: getattr(experiment, attr)
                for attr, name in experiment.CHECKPOINT_ATTRS.items()}
  firsts = _detached_firsts(per_device, fresh)
  snapshot = {name: firsts[name] for name in per_device}  # In their order.
  for attr, name in experiment.NON_BROADCAST_CHECKPOINT_ATTRS.items():
    snapshot[name] = getattr(experiment, attr)
  return snapshot


@functools.lru_cache(maxsize=None)
def _select_copies():
  # As `_select_firsts`, whole arrays: element-wise, so each keeps its
  # sharding and no device talks to another.
  return jax.jit(lambda xs, keep: [
      jax.numpy.where(keep, x, jax.numpy.zeros_like(x)) for x in xs])


def _detached(arrays: Dict[str, Any], fresh: set[int]) -> Dict[str, Any]:
  """`arrays` with every live `jax.Array` replaced by an on-device copy."""
  groups: Dict[Any, list] = {}  # One program per sharding.
  for key, value in arrays.items():
    if isinstance(value, jax.Array) and id(value) not in fresh:
      groups.setdefault(value.sharding, []).append(key)
  copies = {}
  for keys in groups.values():
    values = _select_copies()([arrays[k] for k in keys], np.bool_(True))
    copies.update(zip(keys, values))
  return {**arrays, **copies}


def _spec_sharding(spec: Any) -> Optional[NamedSharding]:
  """The saved PartitionSpec on this run's data mesh, if it fits there."""
  if not isinstance(spec, list):
    return None
  mesh = sharding_lib.data_parallel_mesh()
  parts = [tuple(p) if isinstance(p, list) else p for p in spec]
  names = {n for p in parts for n in (p if isinstance(p, tuple) else [p])}
  if not names <= set(mesh.axis_names) | {None}:
    return None
  return NamedSharding(mesh, PartitionSpec(*parts))


def _place_host(node: Dict[str, Any], value: np.ndarray, sharded: bool):
  """A host value of a "jax" node back on devices."""
  if (node.get("per_device") and not sharded and value.ndim and
      value.shape[0] == jax.local_device_count()):
    return jax.device_put(value, devices.per_device_sharding())
  target = _spec_sharding(node.get("spec")) if sharded else None
  if target is not None:
    return sharding_lib.place(value, target)
  return jax.device_put(value)


def _target(node: Dict[str, Any], live: Any, sharded: bool):
  """Where Orbax reads an array to: the live array's sharding if any."""
  if node["t"] == "jax" and sharded:
    live_sharding = getattr(live, "sharding", None)
    if isinstance(live_sharding, jax.sharding.Sharding):
      return live_sharding
    return _spec_sharding(node.get("spec")) or sharding_lib.replicated()
  return _per_process_replicated()


def _host_bytes(shape, dtype, sharding) -> int:
  shard = sharding.shard_shape(tuple(shape))
  return (math.prod(shard) * np.dtype(dtype).itemsize *
          len(sharding.addressable_devices))


def _memory_bytes() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return 2**62


def read_step(manager: ocp.CheckpointManager, step: int, step_dir: str,
              live: Mapping[str, Any], *, allow_pickle: bool,
              experiment_kwargs: Dict[str, Any]) -> Dict[str, Any]:
  """{field or ENTRIES: value} of one step, checked against the experiment."""
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))["meta"]
  if not isinstance(meta, dict) or meta.get("format") not in (1, 2):
    raise serialization.DamagedCheckpointError(
        f"unknown checkpoint format in {step_dir}")
  experiment = live.get(ENTRIES)
  sharded = experiment_lib.is_sharded(experiment)
  if meta["format"] == 1:
    shared, host = {}, {"entries": {}, "fields": {}}
    for key, entries in meta["skeleton"].items():
      if key == ENTRIES:
        shared = entries
      else:
        host["fields"][key] = entries[key]
  else:
    shared, host = meta["entries"], _read_host(step_dir, meta)
    changed = tuple(run_config.changed_keys(
        meta.get("experiment_kwargs", {}), experiment_kwargs))
    if changed and changed not in _WARNED:
      # Once per difference: an eval job restores checkpoint after
      # checkpoint, and the start-up record already listed the whole config.
      _WARNED.add(changed)
      logging.warning(
          "The checkpoint %s was written under other experiment_kwargs; "
          "restoring it anyway. Changed: %s", step_dir, "; ".join(changed))
  stored = manager.item_metadata(step)["arrays"]
  stored = getattr(stored, "tree", stored) or {}

  def saved_leaf(node):
    if "i" not in node:
      value = serialization.inline_array(node)
      return _SavedArray(node, value.shape, value.dtype, value=value)
    found = stored.get(str(node["i"]))
    if found is None:
      raise serialization.DamagedCheckpointError(f"no array {node['i']!r}")
    dtype = serialization.dtype_from_name(np.dtype(found.dtype).name)
    return _SavedArray(node, serialization.shape_from_list(
        list(found.shape)), dtype)

  dec = lambda sk, leaf: serialization.decode(
      sk, leaf, allow_pickle=allow_pickle, unpickle=leaf is not saved_leaf)
  saved = {name: dec(sk, saved_leaf) for name, sk in shared.items()}
  saved.update({name: dec(sk, saved_leaf)
                for name, sk in host["entries"].items()})
  if experiment is not None:
    restore_checks.check_entries(experiment, saved, source=step_dir)
    expected = restore_checks.expected_entries(experiment)
  else:
    expected = {}
  targets, numpy_keys = {}, set()
  fields = [dec(sk, saved_leaf) for sk in host["fields"].values()]
  for name, value in list(saved.items()) + [(None, f) for f in fields]:
    live_leaves = []
    try:  # Paired with the live leaves, whose shardings win.
      leaves = jax.tree_util.tree_leaves(
          value, is_leaf=lambda x: isinstance(x, _SavedArray))
      if name is not None:
        live_leaves = jax.tree_util.tree_leaves(expected.get(name))
    except (ValueError, TypeError):  # JAX cannot sort int and str dict keys.
      leaves = _saved_arrays(value)
    if len(live_leaves) != len(leaves):
      live_leaves = [None] * len(leaves)
    for leaf, live_leaf in zip(leaves, live_leaves):
      if isinstance(leaf, _SavedArray) and "i" in leaf.node:
        targets[str(leaf.node["i"])] = _target(leaf.node, live_leaf, sharded)
        if leaf.node["t"] in ("np", "npscalar"):
          numpy_keys.add(str(leaf.node["i"]))
  abstract, total = {}, 0
  for key, found in stored.items():
    shape = serialization.shape_from_list(list(found.shape))
    if key in numpy_keys:  # No sharding: Orbax gives numpy, saved dtype.
      total += math.prod(shape) * np.dtype(found.dtype).itemsize
      abstract[key] = jax.ShapeDtypeStruct(shape, found.dtype)
      continue
    target = targets.get(key) or _per_process_replicated()
    total += _host_bytes(shape, found.dtype, target)
    abstract[key] = jax.ShapeDtypeStruct(shape, found.dtype, sharding=target)
  if total > _memory_bytes():
    raise serialization.RestoreRefusedError(
        f"The checkpoint {step_dir} declares {total / 2**30:.1f} GiB of "
        "arrays for this process, more than this machine's memory: it is "
        "damaged or forged. Delete it, or restore from another checkpoint.")
  arrays = manager.restore(step, args=ocp.args.Composite(
      arrays=ocp.args.StandardRestore(abstract)))["arrays"]

  def final_leaf(node):
    value = (serialization.inline_array(node) if "i" not in node
             else arrays[str(node["i"])])
    if node["t"] != "jax" or (isinstance(value, jax.Array) and sharded):
      array = value
    elif isinstance(value, jax.Array):  # pmap style: this process's copy.
      array = value.addressable_data(0)
    else:
      array = _place_host(node, value, sharded)
    if node["t"] == "np":
      return np.asarray(array)
    if node["t"] == "npscalar":
      return np.asarray(array)[()]
    if node.get("key"):
      array = jax.random.wrap_key_data(array, impl=node["key"])
    return array

  nest = {key: dec(sk, final_leaf) for key, sk in host["fields"].items()}
  entries = {name: dec(sk, final_leaf) for name, sk in shared.items()}
  entries.update({name: dec(sk, final_leaf)
                  for name, sk in host["entries"].items()})
  nest[ENTRIES] = entries
  nest[PREVIOUS_STEP] = meta.get("previous_step")
  return nest


def _saved_arrays(value: Any) -> list:
  """The SavedArray leaves of a decoded value, without sorting dict keys."""
  found, todo = [], [value]
  while todo:
    x = todo.pop()
    if isinstance(x, _SavedArray):
      found.append(x)
    elif isinstance(x, Mapping):
      todo.extend(x.values())
    elif isinstance(x, (list, tuple)):
      todo.extend(x)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
      todo.extend(vars(x).values())
  return found


def _read_host(step_dir: str, meta: Dict[str, Any]) -> Dict[str, Any]:
  """This process's host item, or the chief's after a topology change."""
  me = jax.process_index()
  if meta.get("process_count") != jax.process_count():
    if me == 0:
      logging.info("%s was written by %s processes and this job has %d: "
                   "every process restores the host state of process 0.",
                   step_dir, meta.get("process_count"), jax.process_count())
    me = 0
  handler = ocp.JsonCheckpointHandler(filename=host_filename(me))
  host = handler.restore(epath.Path(step_dir) / "host")
  if (not isinstance(host, dict) or not isinstance(host.get("entries"), dict)
      or not isinstance(host.get("fields"), dict)):
    raise serialization.DamagedCheckpointError(f"bad host item in {step_dir}")
  return host
