"""Helpers for the sharded (global-array) style: `jax.jit` over a mesh.

In this style (`config.experiment_style = "sharded"`) the harness passes
`step` a replicated scalar `global_step` and one replicated key, with no
device axis, and checkpoints arrays with their shardings. Experiments build
their shardings from `data_parallel_mesh()`, the same mesh the harness uses.
Everything here works with several processes (`jax.distributed`).
"""

import functools
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

DATA_AXIS = "data"
PartitionSpec = jax.sharding.PartitionSpec


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple[Any, ...], axis_name: str) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(devices), (axis_name,))


def data_parallel_mesh(axis_name: str = DATA_AXIS) -> jax.sharding.Mesh:
  """A 1-d mesh over every device of every process, in `jax.devices()` order.

  Axes are Auto (not Explicit), so jit propagates shardings as pmap users
  expect.
  """
  return _mesh(tuple(jax.devices()), axis_name)


def replicated(mesh: Optional[jax.sharding.Mesh] = None
               ) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh or data_parallel_mesh(),
                                    PartitionSpec())


def batch_sharded(mesh: Optional[jax.sharding.Mesh] = None
                  ) -> jax.sharding.NamedSharding:
  """Leading axis split over the mesh's first axis: a data-parallel batch."""
  mesh = mesh or data_parallel_mesh()
  return jax.sharding.NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """Places a value that every process holds whole (multi-process safe)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    data = place(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  if isinstance(x, jax.Array) and x.is_fully_addressable:
    x = np.asarray(jax.device_get(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def replicate(tree: Any, mesh: Optional[jax.sharding.Mesh] = None) -> Any:
  """Copies every leaf to every device of the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: place(x, sharding), tree)


def shard(tree: Any, mesh: Optional[jax.sharding.Mesh] = None) -> Any:
  """Splits the leading axis of every (global, host-held) leaf over the mesh."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: place(x, sharding), tree)


def host_batch_to_global(batch: Any,
                         mesh: Optional[jax.sharding.Mesh] = None) -> Any:
  """Turns each process's slice of the batch into one global array.

  Each process passes its own `global_batch / process_count` rows; the result
  has the global batch as its leading axis, sharded over the mesh.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding,
                                                       np.asarray(x)), batch)


def to_host(tree: Any) -> Any:
  """Host numpy values of (possibly multi-process) arrays, for logging.

  Replicated arrays are read from a local copy with no communication; arrays
  sharded across processes are gathered (a collective: call on every process).
  """

  def leaf(x):
    if not isinstance(x, jax.Array):
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)  # Logged as their raw data.
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(leaf, tree)
