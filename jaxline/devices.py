"""Moving values between the host and the per-device layout.

A *per-device* value has a leading axis of `jax.local_device_count()` whose
slice i lives on `jax.local_devices()[i]`: the layout a `jax.pmap` output has.
Arrays are built directly in that layout with a `NamedSharding`, so a user's
pmapped function takes them without a copy, and nothing here uses the
per-device placement functions JAX removed.
"""

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOCAL_AXIS = "i"


@functools.lru_cache(maxsize=None)
def _local_mesh(devices: tuple[Any, ...]) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(devices), (LOCAL_AXIS,))


def local_mesh() -> jax.sharding.Mesh:
  """A 1-d mesh over this process's devices, in `jax.local_devices()` order."""
  return _local_mesh(tuple(jax.local_devices()))


def per_device_sharding() -> jax.sharding.NamedSharding:
  """The sharding of a per-device value: axis 0 split over local devices."""
  return jax.sharding.NamedSharding(local_mesh(),
                                    jax.sharding.PartitionSpec(LOCAL_AXIS))


def _is_key_array(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _bcast_leaf(x: Any, devices: Sequence[Any],
                sharding: jax.sharding.Sharding) -> jax.Array:
  if _is_key_array(x):
    data = _bcast_leaf(jax.random.key_data(x), devices, sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  n = len(devices)
  if isinstance(x, jax.Array):
    # Stay on device: one reshape, then a device-to-device copy per device.
    row = jnp.expand_dims(x, 0)
    shards = [jax.device_put(row, d) for d in devices]
    return jax.make_array_from_single_device_arrays((n,) + x.shape, sharding,
                                                    shards)
  host = np.asarray(x)
  # On CPU, device_put may alias or read the numpy buffer later (even
  # with may_alias=False), so it gets a private copy: in-place changes to
  # `x` afterwards (a reused batch buffer) must not reach the devices.
  return jax.device_put(np.array(np.broadcast_to(host, (n,) + host.shape)),
                        sharding)


def bcast_local_devices(value: Any) -> Any:
  """Gives every local device its own copy of `value` (per-device layout)."""
  devices = jax.local_devices()
  sharding = per_device_sharding()
  return jax.tree.map(lambda x: _bcast_leaf(x, devices, sharding), value)


def first_source(x: Any) -> Any:
  """The array whose `[0]` is `get_first`'s value for leaf `x`.

  Indexing a sharded array may gather it; a shard that starts at index 0
  and spans every other axis already holds x[0], on one device. Otherwise
  `x` itself.
  """
  if (isinstance(x, jax.Array) and x.ndim and
      len(x.sharding.device_set) > 1):
    for shard in x.addressable_shards:
      if ((shard.index[0].start or 0) == 0 and
          shard.data.shape[1:] == x.shape[1:]):
        return shard.data
  return x


def _first_leaf(x: Any) -> Any:
  return first_source(x)[0]


def get_first(xs: Any) -> Any:
  """Device 0's slice of every per-device leaf."""
  return jax.tree.map(_first_leaf, xs)


def maybe_device_get(x: Any) -> Any:
  """Fetches `x` to the host if it is a JAX array."""
  if isinstance(x, jnp.ndarray):
    return jax.device_get(x)
  return x


def _is_dict_like(tree: Any) -> bool:
  """Dicts, ConfigDicts, and Mappings that JAX would take for a leaf."""
  if isinstance(tree, dict):
    return True
  if hasattr(tree, "to_dict") and hasattr(tree, "items"):
    return True
  return isinstance(tree, Mapping) and jax.tree_util.all_leaves([tree])


def _map_with_path(fn: Any, tree: Any, path: tuple[Any, ...] = ()) -> Any:
  """Maps `fn(path, leaf)` over `tree`, rebuilding every container.

  Dict-like containers become plain dicts walked here, not by `jax.tree`:
  that sorts keys, and fails on keys of mixed types such as
  `{"a.b": 1, 3: x}`, which snapshots may hold.
  """
  if _is_dict_like(tree):
    return {k: _map_with_path(fn, v, path + (k,)) for k, v in tree.items()}
  if type(tree) in (list, tuple):
    return type(tree)(
        _map_with_path(fn, v, path + (i,)) for i, v in enumerate(tree))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: fn(path + (jax.tree_util.keystr(p),), x), tree)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a frozen `jax.Array` leaf lived, to put it back there on thaw."""
  sharding: Optional[jax.sharding.Sharding]
  key_impl: Optional[Any] = None


def freeze(tree: Any) -> tuple[Any, dict[Any, Placement]]:
  """A deep host copy of `tree`, and where its `jax.Array` leaves lived.

  Containers are rebuilt, arrays become numpy copies, Python scalars and None
  are kept. Later donation or mutation of the live arrays cannot reach it.
  """
  placements = {}

  def leaf(path, x):
    if isinstance(x, jax.Array):
      impl = None
      if _is_key_array(x):
        impl = jax.random.key_impl(x)
        x = jax.random.key_data(x)
      placements[path] = Placement(x.sharding, impl)
      if not x.is_fully_addressable and x.is_fully_replicated:
        return np.array(x.addressable_data(0))  # Multi-process, replicated.
      return np.array(jax.device_get(x))
    if isinstance(x, np.ndarray):
      return x.copy()
    return x

  return _map_with_path(leaf, tree), placements


def thaw(tree: Any, placements: Mapping[Any, Placement]) -> Any:
  """Inverse of `freeze`: arrays go back on their devices as `jax.Array`."""

  def leaf(path, x):
    placement = placements.get(path)
    if placement is None:
      return x.copy() if isinstance(x, np.ndarray) else x
    try:
      if not placement.sharding.is_fully_addressable:
        host = np.array(x)
        array = jax.make_array_from_callback(host.shape, placement.sharding,
                                             lambda index: host[index])
      else:
        # A private copy: CPU device_put may alias the frozen numpy array.
        array = jax.device_put(np.array(x), placement.sharding)
    except (ValueError, RuntimeError):  # Those devices are gone.
      array = jax.device_put(np.array(x))
    if placement.key_impl is not None:
      array = jax.random.wrap_key_data(array, impl=placement.key_impl)
    return array

  return _map_with_path(leaf, tree)
