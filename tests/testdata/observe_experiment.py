"""An experiment with switches for the observability tests.

tests/observability_test.py runs it as a user would:

  python observe_experiment.py --config=observe_experiment.py \
      --config.checkpoint_dir=/tmp/run

`experiment_kwargs.config` switches: `nan_at_step` (the loss, and so the
parameters, turn NaN from that step on), `hang_at_step` with `hang_kind`
("python": a sleep; "xla": a host callback inside the compiled step that
never returns, so the main thread waits in native code), `fail_at_step`,
`extra_scalar` (a value step() returns beside the loss) and `debug_print`
(jax.debug.print of the loss inside the pmapped update).
"""

import functools
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
from jaxline import utils

_TRUE_W = np.array([1.0, -2.0, 0.5], np.float32)


def get_config(arg=None):
  config = base_config.get_base_config()
  config.training_steps = 12
  config.interval_type = "steps"
  config.log_tensors_interval = 1
  config.save_checkpoint_interval = 2
  config.log_train_data_interval = 1
  config.checkpoint_dir = ""
  config.eval_poll_interval_secs = 0.05
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=dict(
      nan_at_step=-1,
      hang_at_step=-1,
      hang_kind="python",
      fail_at_step=-1,
      extra_scalar="",
      debug_print=False,
  )))
  if arg == "bad_type":
    # Built without the base config's types, as a hand-written config may be.
    config = config_dict.ConfigDict(config.to_dict())
    del config["training_steps"]
    config.training_steps = "abc"
  return config


def _hang_forever(x):
  time.sleep(3600)
  return x


class Experiment(experiment.AbstractExperiment):
  """Fits `_TRUE_W` by SGD, with the failures the tests ask for."""

  CHECKPOINT_ATTRS = {"_params": "params"}

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self.config = config
    self._params = utils.bcast_local_devices(jnp.zeros([3], jnp.float32))
    self._update = jax.pmap(self._update_fn, axis_name="i")
    self._hang = jax.pmap(
        lambda x: jax.pure_callback(_hang_forever,
                                    jax.ShapeDtypeStruct((), jnp.float32), x))

  def _update_fn(self, params, rng, poison):
    x = jax.random.normal(rng, [16, 3])
    y = x @ jnp.asarray(_TRUE_W)
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((x @ p - y) ** 2))(params)
    loss = jax.lax.pmean(loss, "i") * poison
    if self.config.debug_print:
      jax.debug.print("debug_print loss={loss}", loss=loss)
      print("python_print loss=", loss)
    return params - 0.1 * jax.lax.pmean(grads, "i") * poison, {"loss": loss}

  def step(self, *, global_step, rng, writer):
    index = int(utils.get_first(global_step))
    if index == self.config.fail_at_step:
      raise RuntimeError(f"Deliberate failure at step {index}.")
    if index == self.config.hang_at_step:
      if self.config.hang_kind == "xla":
        jax.block_until_ready(self._hang(jnp.zeros(
            [jax.local_device_count()], jnp.float32)))
      else:
        time.sleep(3600)
    nan = 0 <= self.config.nan_at_step <= index
    poison = utils.bcast_local_devices(np.float32(np.nan if nan else 1.0))
    self._params, scalars = self._update(self._params, rng, poison)
    if writer is not None and index == 0:
      writer.write_images(index, {"inputs": np.full([1, 4, 4, 1], 0.5)})
    scalars = utils.get_first(scalars)
    if self.config.extra_scalar:
      scalars["extra"] = self.config.extra_scalar
    return scalars

  def evaluate(self, *, global_step, rng, writer):
    del rng, writer
    params = np.asarray(utils.get_first(self._params))
    return {"eval_loss": float(np.sum((params - _TRUE_W) ** 2)),
            "eval_step": int(utils.get_first(global_step))}


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
