"""Helpers for the sharded (global-array) style: `jax.jit` over a mesh.

In this style (`config.experiment_style = "sharded"`) the harness passes
`step` a replicated scalar `global_step` and one replicated key, with no
device axis, and checkpoints arrays with their shardings. Experiments build
their shardings from `data_parallel_mesh()`, the same mesh the harness uses.
Everything here works with several processes (`jax.distributed`).
"""

import functools
from typing import Any, Iterable, Iterator, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from jaxline import concurrency

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
  `double_buffer_global(ds)` does this for a dataset, one batch ahead.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding,
                                                       np.asarray(x)), batch)


def double_buffer_global(
    ds: Iterable[Any],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    sharding: Optional[jax.sharding.Sharding] = None) -> Iterator[Any]:
  """`host_batch_to_global` over a dataset, placing batch i+1 during step i.

  The sharded style's `utils.double_buffer`. `ds` yields this process's
  share of each global batch (numpy pytrees, `global_batch /
  process_count()` rows); out come global `jax.Array` batches, by default
  split over the leading axis of `mesh` (`data_parallel_mesh()`) exactly as
  `host_batch_to_global(batch, mesh)` places them, or laid out as `sharding`
  says (any sharding `jax.make_array_from_process_local_data` takes).

  Before batch i is yielded, batch i+1 is pulled from `ds`, copied (datasets
  often refill one buffer, and a CPU transfer may alias it) and placed on
  the devices in a background thread, so the transfer overlaps the caller's
  jitted step on batch i. `ds` runs in the caller's thread: put slow host
  work upstream in `utils.py_prefetch`, and both overlap with compute:

      batches = sharding.double_buffer_global(
          utils.py_prefetch(lambda: my_host_batches(jax.process_index())))

  An error raised by `ds`, or a None item (a `ValueError`), comes after the
  batches before it; a batch that cannot be placed raises instead of that
  batch. The placement needs no communication between processes, so every
  process may run ahead on its own.
  """
  if mesh is not None and sharding is not None:
    raise ValueError("Pass mesh or sharding to double_buffer_global, not "
                     "both: the mesh only picks batch_sharded(mesh).")
  target = sharding if sharding is not None else batch_sharded(mesh)

  def place_batch(batch: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(target,
                                                         np.asarray(x)),
        batch)

  return concurrency.place_ahead(ds, place_batch,
                                 thread_name="double_buffer_global",
                                 what="double_buffer_global")


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
