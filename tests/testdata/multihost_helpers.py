"""`jaxline.sharding` helpers and `utils.rendezvous` across real processes.

  python multihost_helpers.py --out=DIR --jaxline_coordinator_address=H:P \
      --jaxline_num_processes=N --jaxline_process_id=I

Joins the job through `jaxline.distributed.initialize` (as platform.main
does), exercises the helpers on global arrays that span every process, and
writes what it saw to `DIR/helpers_p<I>.json` for tests/multihost_test.py.

Rendezvous: the last process sleeps, then writes `DIR/late_arrived` and joins
the rendezvous; every other process checks for that file right after its own
rendezvous returns, which it can only see if the rendezvous waited.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jaxline import distributed
from jaxline import sharding
from jaxline import utils

_OUT = flags.DEFINE_string("out", None, "Directory for the results.")
_COORDINATOR = flags.DEFINE_string("jaxline_coordinator_address", None, "")
_NUM_PROCESSES = flags.DEFINE_integer("jaxline_num_processes", None, "")
_PROCESS_ID = flags.DEFINE_integer("jaxline_process_id", None, "")

ROWS_PER_PROCESS = 4
LATE_SLEEP_SECS = 2.0


def global_rows(num_processes):
  """The global batch: row r is [r, 10 r]."""
  rows = np.arange(ROWS_PER_PROCESS * num_processes, dtype=np.float32)
  return np.stack([rows, 10 * rows], axis=1)


def main(argv):
  del argv
  joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  me, count = jax.process_index(), jax.process_count()
  mesh = sharding.data_parallel_mesh()
  everything = global_rows(count)
  mine = everything[me * ROWS_PER_PROCESS:(me + 1) * ROWS_PER_PROCESS]

  batch = sharding.host_batch_to_global(mine, mesh)
  total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(batch)
  replicated = sharding.replicate({"w": np.array([1.0, 2.0], np.float32),
                                   "n": 7}, mesh)
  sharded = sharding.shard(everything, mesh)
  key = sharding.place(jax.random.key(5), sharding.replicated(mesh))
  local_rows = sorted(
      int(s.index[0].start or 0) for s in batch.addressable_shards)
  # Each process's rows of two batches, placed one batch ahead.
  buffered = [sharding.to_host(b).tolist() for b in
              sharding.double_buffer_global(iter([mine, 2 * mine]),
                                            mesh=mesh)]

  late = os.path.join(_OUT.value, "late_arrived")
  if me == count - 1:
    time.sleep(LATE_SLEEP_SECS)
    with open(late, "w") as f:
      f.write("here")
  utils.rendezvous()
  saw_late_process = os.path.exists(late)

  result = dict(
      joined=joined,
      process=me,
      processes=count,
      devices=jax.device_count(),
      local_devices=jax.local_device_count(),
      mesh_devices=[d.id for d in mesh.devices.ravel()],
      all_devices=[d.id for d in jax.devices()],
      batch_shape=list(batch.shape),
      batch_fully_addressable=batch.is_fully_addressable,
      batch_on_host=sharding.to_host(batch).tolist(),
      double_buffered_on_host=buffered,
      local_row_starts=local_rows,
      total=float(sharding.to_host(total)),
      replicated_w=sharding.to_host(replicated["w"]).tolist(),
      replicated_n=int(sharding.to_host(replicated["n"])),
      replicated_everywhere=bool(replicated["w"].is_fully_replicated and len(
          replicated["w"].sharding.device_set) == jax.device_count()),
      sharded_on_host=sharding.to_host(sharded).tolist(),
      key_impl=str(jax.random.key_impl(key)),
      key_data=sharding.to_host(jax.random.key_data(key)).tolist(),
      saw_late_process=saw_late_process,
  )
  with open(os.path.join(_OUT.value, f"helpers_p{me}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
