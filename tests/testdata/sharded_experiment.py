"""One model in both calling conventions, for tests/sharded_style_test.py.

`--config=sharded_experiment.py` runs the sharded style: `jax.jit` over
`sharding.data_parallel_mesh()`, parameters replicated, the batch split over
the mesh, and a per-example running loss kept sharded (checkpointed whole,
with its PartitionSpec). `--config=sharded_experiment.py:pmap` runs the same
model, data and seed in the default pmap style.

The loss is scaled by a draw from the step key, so equal loss curves in the
two styles also mean equal keys (with `random_mode_train =
"same_host_same_device"`, every device's pmap key is the sharded style's key).

Each `step` and `evaluate` call appends one JSON line to
`experiment_kwargs.config.record_path`: the loss, the key, what the harness
passed, and the values and placement of the checkpointed arrays.
"""

import functools
import json

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
GLOBAL_BATCH = 8
# Seeds the evaluation batch, which differs from every training batch.
_EVAL_SEED = 999_999


def get_config(arg=None):
  """The config; `arg` "pmap" selects the default pmap style."""
  config = base_config.get_base_config()
  config.training_steps = 6
  config.interval_type = "steps"
  config.log_tensors_interval = 2
  config.save_checkpoint_interval = 2
  config.log_train_data_interval = 2
  config.log_async = False
  config.checkpoint_dir = ""
  config.eval_poll_interval_secs = 0.05
  config.random_mode_train = "same_host_same_device"
  style = "pmap" if arg == "pmap" else "sharded"
  config.experiment_style = style
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=dict(
      style=style,
      learning_rate=0.1,
      record_path="",
  )))
  return config


def batch(seed):
  """The global batch for `seed` (a step index): the same in both styles."""
  rs = np.random.RandomState(seed)
  x = rs.normal(size=(GLOBAL_BATCH, 3)).astype(np.float32)
  y = x @ TRUE_W + 0.1 * rs.normal(size=(GLOBAL_BATCH,)).astype(np.float32)
  return x, y.astype(np.float32)


def _errors(params, x, y):
  return (x @ params - y) ** 2


def _scaled_loss(params, x, y, rng):
  scale = 1.0 + 0.5 * jax.random.uniform(rng)
  return scale * jnp.mean(_errors(params, x, y))


def _key_data(key):
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def _placement(x):
  """Where a (sharded-style) array lives, as JSON."""
  s = x.sharding
  named = isinstance(s, jax.sharding.NamedSharding)
  return dict(
      named=named,
      on_data_mesh=named and s.mesh == sharding.data_parallel_mesh(),
      spec=[p for p in s.spec] if named else None,
      num_devices=len(s.device_set),
      replicated=x.is_fully_replicated,
      shape=list(x.shape),
      dtype=str(x.dtype),
      typed_key=bool(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))


class Experiment(experiment.AbstractExperiment):
  """Linear regression by SGD; the batch is split over all devices."""

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self.mode = mode
    self.config = config
    self._sharded = config.style == "sharded"
    params = 0.1 * jax.random.normal(init_rng, [3], jnp.float32)
    if self._sharded:
      mesh = sharding.data_parallel_mesh()
      replicated = sharding.replicated(mesh)
      self._params = sharding.replicate(params, mesh)
      self._row_loss = sharding.shard(np.zeros([GLOBAL_BATCH], np.float32),
                                      mesh)
      self._aux_key = sharding.replicate(jax.random.key(7), mesh)
      self._update = jax.jit(self._sharded_update, out_shardings=(
          replicated, sharding.batch_sharded(mesh), replicated, replicated))
      self._eval = jax.jit(lambda p, x, y: jnp.mean(_errors(p, x, y)),
                           out_shardings=replicated)
    else:
      self._params = utils.bcast_local_devices(params)
      self._update = jax.pmap(self._pmap_update, axis_name="i")
      self._eval = jax.pmap(
          lambda p, x, y: jax.lax.pmean(jnp.mean(_errors(p, x, y)), "i"),
          axis_name="i")

  # Read through `self` by the harness, so it may depend on the style.
  @property
  def CHECKPOINT_ATTRS(self):  # pylint: disable=invalid-name
    if self._sharded:
      return {"_params": "params", "_row_loss": "row_loss",
              "_aux_key": "aux_key"}
    return {"_params": "params"}

  def _sharded_update(self, params, row_loss, aux_key, x, y, rng):
    loss, grads = jax.value_and_grad(_scaled_loss)(params, x, y, rng)
    row_loss = 0.5 * row_loss + 0.5 * _errors(params, x, y)
    aux_key = jax.random.split(aux_key)[0]
    return params - self.config.learning_rate * grads, row_loss, aux_key, loss

  def _pmap_update(self, params, x, y, rng):
    loss, grads = jax.value_and_grad(_scaled_loss)(params, x, y, rng)
    grads = jax.lax.pmean(grads, "i")
    loss = jax.lax.pmean(loss, "i")
    return params - self.config.learning_rate * grads, loss

  def _per_device(self, x):
    n = jax.local_device_count()
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  def _record(self, entry):
    if self.config.record_path:
      with open(self.config.record_path, "a") as f:
        f.write(json.dumps(entry) + "\n")

  def _state(self):
    """The checkpointed values and their placement (sharded style)."""
    if not self._sharded:
      return dict(params=np.asarray(utils.get_first(self._params)).tolist())
    return dict(
        params=sharding.to_host(self._params).tolist(),
        row_loss=sharding.to_host(self._row_loss).tolist(),
        aux_key=sharding.to_host(_key_data(self._aux_key)).tolist(),
        placement={name: _placement(getattr(self, attr))
                   for attr, name in self.CHECKPOINT_ATTRS.items()})

  def step(self, *, global_step, rng, writer):
    if self._sharded:
      index = int(sharding.to_host(global_step))
      x, y = sharding.shard(batch(index))
      self._params, self._row_loss, self._aux_key, loss = self._update(
          self._params, self._row_loss, self._aux_key, x, y, rng)
      key = sharding.to_host(_key_data(rng)).tolist()
      loss = float(sharding.to_host(loss))
    else:
      index = int(utils.get_first(global_step))
      x, y = (self._per_device(v) for v in batch(index))
      self._params, loss = self._update(self._params, x, y, rng)
      key = np.asarray(utils.get_first(_key_data(rng))).tolist()
      loss = float(utils.get_first(loss))
    self._record(dict(
        kind="step", mode=self.mode, step=index, loss=loss, key=key,
        global_step=_placement(global_step), rng=_placement(rng),
        devices=jax.device_count(), **self._state()))
    return {"loss": loss}

  def evaluate(self, *, global_step, rng, writer):
    x, y = batch(_EVAL_SEED)
    if self._sharded:
      step = int(sharding.to_host(global_step))
      x, y = sharding.shard((x, y))
      loss = float(sharding.to_host(self._eval(self._params, x, y)))
      key = sharding.to_host(_key_data(rng)).tolist()
    else:
      step = int(utils.get_first(global_step))
      loss = float(utils.get_first(self._eval(
          self._params, self._per_device(x), self._per_device(y))))
      key = np.asarray(utils.get_first(_key_data(rng))).tolist()
    self._record(dict(
        kind="eval", mode=self.mode, step=step, eval_loss=loss, key=key,
        global_step=_placement(global_step), rng=_placement(rng),
        devices=jax.device_count(), **self._state()))
    return {"eval_loss": loss}


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
