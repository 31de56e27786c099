"""One process of checkpoint_stall.py's fsdp case (started by it).

  python checkpoint_stall_fsdp.py --size_mb=100 --dir=DIR \
      --coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I

Joins the job through `jaxline.distributed.initialize`, then runs the
sharded-style experiment below through `train.train` with async and then
sync saves (`checkpoint_stall.run`), and prints this process's results as
one JSON line starting with `checkpoint_stall.RESULT_PREFIX`. The parent
sets JAX_PLATFORMS=cpu and the device count (XLA_FLAGS).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import checkpoint_stall  # Puts the repository root on sys.path too.
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from jaxline import distributed
from jaxline import experiment
from jaxline import sharding
# pylint: enable=g-import-not-at-top,wrong-import-position

_COLUMNS = 1024
P = jax.sharding.PartitionSpec


class _ShardedParams(experiment.AbstractExperiment):
  """FSDP-style: one [rows, 1024] float32 array, rows split over every device.

  Each process holds and saves only its own rows (half the model with two
  processes); the donated update rewrites them in place every step.
  """

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_steps": "steps"}
  SIZE_MB = 100
  own_mb = None  # Bytes of this process's shards, set by __init__.

  def __init__(self, mode, init_rng=None):
    super().__init__(mode, init_rng)
    rows = self.SIZE_MB * 2**20 // 4 // _COLUMNS
    spec = jax.sharding.NamedSharding(sharding.data_parallel_mesh(),
                                      P(sharding.DATA_AXIS, None))
    # Random values, made in place on each device: no process builds the
    # whole array.
    self._params = {"w": jax.jit(
        lambda: jax.random.uniform(jax.random.key(0), (rows, _COLUMNS)),
        out_shardings=spec)()}
    type(self).own_mb = sum(
        s.data.nbytes for s in self._params["w"].addressable_shards) / 2**20
    self._steps = 0
    # The global mean is a reduction over every process: like FSDP's
    # gathers it keeps the processes in step.
    self._update = jax.jit(
        lambda p: {"w": checkpoint_stall.rotate(p["w"],
                                                1e-3 * jnp.mean(p["w"]))},
        out_shardings={"w": spec}, donate_argnums=0)

  def step(self, *, global_step, rng, writer):
    self._params = self._update(self._params)
    jax.block_until_ready(self._params)
    self._steps += 1
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size_mb", type=int, default=100)
  parser.add_argument("--saves", type=int, default=4)
  parser.add_argument("--interval", type=int, default=0)
  parser.add_argument("--seconds_between_saves", type=float, default=0.0)
  parser.add_argument("--dir", required=True)
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--process_id", type=int, required=True)
  args = parser.parse_args()
  checkpoint_stall.fix_mmap_threshold()
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  distributed.initialize(args.coordinator, args.num_processes,
                         args.process_id)
  _ShardedParams.SIZE_MB = args.size_mb
  interval = checkpoint_stall.choose_interval(
      _ShardedParams, args.size_mb, args.interval, args.seconds_between_saves)
  # Saves are collective: every process takes the longest interval.
  interval = int(np.max(multihost_utils.process_allgather(
      np.int32(interval))))

  results = [checkpoint_stall.run(_ShardedParams, mode, saves=args.saves,
                                  interval=interval, root=args.dir,
                                  style="sharded")
             for mode in checkpoint_stall.MODES]
  row = checkpoint_stall.summarize(
      f"fsdp {jax.process_count()}x{jax.local_device_count()}",
      jax.process_index(), args.size_mb, _ShardedParams.own_mb, results)
  print(checkpoint_stall.RESULT_PREFIX + json.dumps(row), flush=True)
  distributed.mark_finished()


if __name__ == "__main__":
  main()
