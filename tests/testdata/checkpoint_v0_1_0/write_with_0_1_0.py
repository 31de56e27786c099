"""Writes the checkpoint next to this file with jaxline 0.1.0 (format 1).

How it was made (the checkpoint is committed; this records how):

  git worktree add /tmp/jaxline_010 c6ba75a   # The 0.1.0 release.
  PYTHONPATH=/tmp/jaxline_010 JAX_PLATFORMS=cpu \
      python write_with_0_1_0.py /tmp/out
  cp -r /tmp/out/checkpoints tests/testdata/checkpoint_v0_1_0/

`values()` builds every value by hand (no optimizer math), so the test that
restores the checkpoint compares bits with any later JAX or optax.
"""

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

STEP = 3


def params():
  """Haiku-style parameters: nested dicts of small arrays."""
  return {
      "mlp/~/linear_0": {
          "w": (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) / 7,
          "b": np.array([0.5, -1.25, 3.0, 1e-8], np.float32)},
      "mlp/~/linear_1": {
          "w": (np.arange(8).reshape(4, 2) / 3).astype(ml_dtypes.bfloat16),
          "b": np.zeros((2,), np.float32)},
  }


def values():
  """The experiment's state as saved: params, optax state, host state."""
  p = jax.tree.map(jnp.asarray, params())
  adam = optax.adam(1e-2).init(p)[0]
  mu = jax.tree.map(lambda x: (x * 0.1).astype(x.dtype), p)
  nu = jax.tree.map(lambda x: (x * x).astype(x.dtype), p)
  opt_state = (optax.EmptyState(),
               (adam._replace(count=jnp.array(STEP, jnp.int32), mu=mu,
                              nu=nu), optax.EmptyState()))
  host = {"seen": np.arange(5, dtype=np.int64) * 3, "best": np.float32(0.25),
          "names": ["a", "b"], "pair": (7, 2.5), "nothing": None,
          "key": jax.random.key(11), "by_id": {3: "three", 5: "five"}}
  return p, opt_state, host


def main(checkpoint_dir):
  from jaxline import base_config  # pylint: disable=g-import-not-at-top
  from jaxline import checkpointing  # pylint: disable=g-import-not-at-top
  from jaxline import experiment  # pylint: disable=g-import-not-at-top
  from jaxline import utils  # pylint: disable=g-import-not-at-top

  class Exp(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_host": "host_state",
                                      "_position": "data_position"}

    def __init__(self, mode, init_rng=None):
      super().__init__(mode=mode, init_rng=init_rng)
      p, opt_state, self._host = values()
      self._params = utils.bcast_local_devices(p)
      self._opt_state = utils.bcast_local_devices(opt_state)
      self._position = 42

    def step(self, *, global_step, rng, writer):
      return {}

    def evaluate(self, *, global_step, rng, writer):
      return {}

  config = base_config.get_base_config()
  config.checkpoint_dir = checkpoint_dir
  checkpointer = checkpointing.DiskCheckpointer(config, "train")
  exp = Exp("train")
  state = checkpointer.get_experiment_state("latest")
  state.global_step = STEP
  state.experiment_module = exp
  state.train_step_rng = exp.initialize_train_step_rng(jax.random.key(5))
  checkpointer.save("latest")
  checkpointer.close()


if __name__ == "__main__":
  main(sys.argv[1])
