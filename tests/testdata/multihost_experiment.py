"""Data-parallel linear regression over several processes, for multihost_test.

Every process runs this file with the same flags and its own
`--jaxline_process_id`. The global batch of a step is fixed by the step index
alone; each process takes its own contiguous slice of it, so the loss (a mean
over the global batch, which needs every host's rows) is the same whatever
the number of processes and devices, up to float rounding.

Both calling conventions are here: `--config=multihost_experiment.py` uses
the default pmap style (a pmean over every device of every process);
`--config=multihost_experiment.py:sharded` uses the sharded style (`jax.jit`
over `sharding.data_parallel_mesh()`, batches built with
`sharding.host_batch_to_global`).

Each process appends one JSON line per `step` and per `evaluate` call to
`<record_dir>/<mode>_p<process index>.jsonl`: the loss, the step, the keys it
was given and the devices it saw. A run with `step_sleep_secs` set, started
for the dead-peer tests, prints "step <n> done" as it goes; `fail_at_step`
and `fail_process` make one process's `step` raise.
"""

import functools
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np

from jaxline import base_config
from jaxline import experiment
from jaxline import platform
from jaxline import sharding
from jaxline import utils

TRUE_W = np.array([1.0, -2.0, 0.5], np.float32)
# Seeds the evaluation batch, which differs from every training batch.
_EVAL_SEED = 999_999


def get_config(arg=None):
  """The config; `arg` "sharded" selects the sharded style."""
  config = base_config.get_base_config()
  config.training_steps = 6
  config.interval_type = "steps"
  config.log_tensors_interval = 2
  config.save_checkpoint_interval = 2
  config.log_train_data_interval = 2
  config.log_async = False
  config.checkpoint_dir = ""
  config.eval_poll_interval_secs = 0.05
  style = "sharded" if arg == "sharded" else "pmap"
  config.experiment_style = style
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=dict(
      style=style,
      global_batch=16,
      learning_rate=0.1,
      record_dir="",
      step_sleep_secs=0.0,
      # Process `fail_process` raises in `step` at step `fail_at_step`.
      fail_at_step=-1,
      fail_process=0,
  )))
  return config


def global_batch(step, size):
  """The whole batch of step `step`: the same on every process."""
  rs = np.random.RandomState(1000 + step)
  x = rs.normal(size=(size, 3)).astype(np.float32)
  y = x @ TRUE_W + 0.1 * rs.normal(size=(size,)).astype(np.float32)
  return x, y.astype(np.float32)


def host_slice(x):
  """This process's contiguous share of the global batch."""
  per_host = x.shape[0] // jax.process_count()
  start = jax.process_index() * per_host
  return x[start:start + per_host]


def _loss(params, x, y):
  return jnp.mean((x @ params - y) ** 2)


def _key_data(rng):
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return rng


class Experiment(experiment.AbstractExperiment):
  """SGD on a mean squared error over the global batch."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_host_steps": "host_steps"}

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self.mode = mode
    self.config = config
    self._sharded = config.style == "sharded"
    self._host_steps = 0
    zeros = np.zeros([3], np.float32)
    if self._sharded:
      mesh = sharding.data_parallel_mesh()
      self._params = sharding.replicate(zeros, mesh)
      replicated = sharding.replicated(mesh)
      self._update = jax.jit(self._sharded_update, out_shardings=(
          replicated, replicated))
      self._eval_loss = jax.jit(_loss, out_shardings=replicated)
    else:
      self._params = utils.bcast_local_devices(zeros)
      self._update = jax.pmap(self._pmap_update, axis_name="i")
      self._eval_loss = jax.pmap(
          lambda p, x, y: jax.lax.pmean(_loss(p, x, y), "i"), axis_name="i")

  def _sharded_update(self, params, x, y):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    return params - self.config.learning_rate * grads, loss

  def _pmap_update(self, params, x, y):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    grads = jax.lax.pmean(grads, "i")
    loss = jax.lax.pmean(loss, "i")
    return params - self.config.learning_rate * grads, loss

  def _per_device(self, x):
    """[rows, ...] -> [local devices, rows / local devices, ...]."""
    n = jax.local_device_count()
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  def _host_batch(self, step):
    x, y = global_batch(step, self.config.global_batch)
    return host_slice(x), host_slice(y)

  def _record(self, entry):
    if not self.config.record_dir:
      return
    path = os.path.join(self.config.record_dir,
                        f"{self.mode}_p{jax.process_index()}.jsonl")
    with open(path, "a") as f:
      f.write(json.dumps(entry) + "\n")

  def step(self, *, global_step, rng, writer):
    if self._sharded:
      index = int(sharding.to_host(global_step))
      x, y = (sharding.host_batch_to_global(v) for v in self._host_batch(index))
      self._params, loss = self._update(self._params, x, y)
      keys = [np.asarray(sharding.to_host(_key_data(rng))).tolist()]
      loss = float(sharding.to_host(loss))
      params = sharding.to_host(self._params)
    else:
      index = int(utils.get_first(global_step))
      x, y = (self._per_device(v) for v in self._host_batch(index))
      self._params, loss = self._update(self._params, x, y)
      keys = np.asarray(_key_data(rng)).tolist()
      loss = float(utils.get_first(loss))
      params = utils.get_first(self._params)
    if (index == self.config.fail_at_step and
        jax.process_index() == self.config.fail_process):
      raise RuntimeError(f"Deliberate failure at step {index}.")
    self._host_steps += 1
    self._record(dict(step=index, loss=loss, keys=keys,
                      params=np.asarray(params).tolist(),
                      process=jax.process_index(),
                      processes=jax.process_count(),
                      devices=jax.device_count()))
    if self.config.step_sleep_secs:
      print(f"step {index} done", flush=True)
      time.sleep(self.config.step_sleep_secs)
    return {"loss": loss}

  def evaluate(self, *, global_step, rng, writer):
    del rng
    x, y = global_batch(_EVAL_SEED, self.config.global_batch)
    x, y = host_slice(x), host_slice(y)
    if self._sharded:
      step = int(sharding.to_host(global_step))
      loss = self._eval_loss(self._params, sharding.host_batch_to_global(x),
                             sharding.host_batch_to_global(y))
      loss = float(sharding.to_host(loss))
      params = sharding.to_host(self._params)
    else:
      step = int(utils.get_first(global_step))
      loss = float(utils.get_first(self._eval_loss(
          self._params, self._per_device(x), self._per_device(y))))
      params = np.asarray(utils.get_first(self._params))
    self._record(dict(step=step, eval_loss=loss,
                      params=np.asarray(params).tolist(),
                      host_steps=self._host_steps,
                      process=jax.process_index(),
                      processes=jax.process_count()))
    return {"eval_loss": loss}


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
