"""A small linear-regression experiment that tests/e2e_test.py runs for real.

Run it as a user would:

  python experiment.py --config=experiment.py --config.training_steps=8

`--config=experiment.py:short,name` passes "short,name" to `get_config`:
"short" trains 6 steps, "typo" adds a misspelt key, and the whole string is
logged as the run's label.
"""

import functools

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np

from jaxline import base_config
from jaxline import experiment
from jaxline import platform
from jaxline import utils

_TRUE_W = np.array([1.0, -2.0, 0.5], np.float32)


def get_config(arg=None):
  """The experiment config; `arg` is the text after `:` in --config."""
  config = base_config.get_base_config()
  config.training_steps = 12
  config.interval_type = "steps"
  config.log_tensors_interval = 4
  config.save_checkpoint_interval = 4
  config.log_train_data_interval = 4
  config.log_async = False
  config.checkpoint_dir = ""
  config.eval_poll_interval_secs = 0.05
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=dict(
      learning_rate=0.1,
      batch_size=16,
      label=arg or "",
      fail_at_step=-1,
      fail_in_eval=False,
  )))
  options = arg.split(",") if arg else []
  if "short" in options:
    config.training_steps = 6
  if "typo" in options:
    config.traning_steps = 4  # A misspelt key that validation must catch.
  return config


class Experiment(experiment.AbstractExperiment):
  """Fits `_TRUE_W` by data-parallel SGD; the gradient is a pmean."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_host_steps": "host_steps"}

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self.mode = mode
    self.config = config
    logging.info("Experiment built: mode=%s label=%s devices=%d", mode,
                 config.label, jax.local_device_count())
    self._params = utils.bcast_local_devices(jnp.zeros([3], jnp.float32))
    self._host_steps = 0
    self._update = jax.pmap(self._update_fn, axis_name="i")
    self._loss_per_device = jax.pmap(self._eval_fn)

  def _batch(self, rng):
    x = jax.random.normal(rng, [self.config.batch_size, 3])
    return x, x @ jnp.asarray(_TRUE_W)

  def _loss(self, params, x, y):
    return jnp.mean((x @ params - y) ** 2)

  def _update_fn(self, params, rng):
    x, y = self._batch(rng)
    loss, grads = jax.value_and_grad(self._loss)(params, x, y)
    grads = jax.lax.pmean(grads, "i")
    loss = jax.lax.pmean(loss, "i")
    return params - self.config.learning_rate * grads, {"loss": loss}, x

  def _eval_fn(self, params, rng):
    x, y = self._batch(rng)
    return self._loss(params, x, y)

  def step(self, *, global_step, rng, writer):
    index = int(utils.get_first(global_step))
    if index == self.config.fail_at_step:
      raise RuntimeError(f"Deliberate failure at step {index}.")
    self._params, scalars, x = self._update(self._params, rng)
    self._host_steps += 1
    if writer is not None and index == 0:
      # Images from step (D10): the first batch, as a [1, B, 3, 1] image.
      inputs = np.asarray(utils.get_first(x))
      writer.write_images(index, {"inputs": (inputs[None, :, :, None] + 2) / 4})
    return utils.get_first(scalars)

  def evaluate(self, *, global_step, rng, writer):
    step = int(utils.get_first(global_step))
    if self.config.fail_in_eval:
      raise RuntimeError(f"Deliberate eval failure at step {step}.")
    loss = float(np.mean(np.asarray(self._loss_per_device(self._params, rng))))
    logging.info("Evaluated step %d (mode=%s, host_steps=%d): eval_loss=%.6f",
                 step, self.mode, self._host_steps, loss)
    return {"eval_loss": loss, "eval_step": step}


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
