"""A small experiment that tests/resume_test.py kills, stops and resumes.

Run it as a user would:

  python resume_experiment.py --config=resume_experiment.py \
      --config.checkpoint_dir=/tmp/run

Built so that a resumed run can only match an uninterrupted one if every
piece of state comes back exactly:
- parameters (a haiku MLP) and the optax state are created lazily in the
  first step and live in `CHECKPOINT_ATTRS`;
- each batch is drawn from `_data_position`, a host counter in
  `NON_BROADCAST_CHECKPOINT_ATTRS`, so a lost counter changes the data;
- the step's `rng` masks the inputs, so the training RNG state matters;
- `step` checks that the counter equals the `global_step` it is given.

On its last step it writes the parameters and optimizer state to
`final_params_path` (an .npz). It prints one `[resume_experiment] step N`
line per step, after the update, for the tests to follow.
"""

import functools
import os
import time

from absl import app
from absl import flags
from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import optax

from jaxline import base_config
from jaxline import experiment
from jaxline import platform
from jaxline import utils

_IN = 4
_PER_DEVICE_BATCH = 8


def get_config():
  """Steps, saves every 2 steps, eval polls fast; override with --config.*."""
  config = base_config.get_base_config()
  config.training_steps = 40
  config.interval_type = "steps"
  config.save_checkpoint_interval = 2
  config.log_tensors_interval = 4
  config.log_train_data_interval = 4
  config.log_async = False
  config.max_checkpoints_to_keep = 4
  config.checkpoint_dir = ""
  config.eval_poll_interval_secs = 0.2
  config.eval_specific_checkpoint_dir = ""
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=dict(
      learning_rate=0.05,
      step_sleep_secs=0.0,
      final_params_path="",
      best_step=10,
  )))
  return config


def _forward(x):
  return hk.nets.MLP([8, 1])(x)[..., 0]


def _batch(position: int, num_devices: int):
  """Inputs and targets for one step: a function of the position only."""
  rng = np.random.default_rng(position)
  x = rng.normal(size=(num_devices, _PER_DEVICE_BATCH, _IN))
  y = np.sin(x.sum(-1)) + 0.1 * rng.normal(size=x.shape[:-1])
  return x.astype(np.float32), y.astype(np.float32)


def _flat(tree, prefix):
  """`{prefix/path: array}` for an .npz; paths keep the tree's order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in leaves}


class Experiment(experiment.AbstractExperiment):
  """Regression with an MLP, data-parallel: gradients are a pmean."""

  CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_data_position": "data_position"}

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self._mode = mode
    self._config = config
    self._init_rng = init_rng
    self._net = hk.without_apply_rng(hk.transform(_forward))
    self._optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                                  optax.adam(config.learning_rate))
    self._params = None
    self._opt_state = None
    self._data_position = 0
    self._update = jax.pmap(self._update_fn, axis_name="i")
    self._eval = jax.pmap(self._eval_fn, axis_name="i")

  def _loss(self, params, x, y):
    return jnp.mean((self._net.apply(params, x) - y) ** 2)

  def _update_fn(self, params, opt_state, x, y, rng):
    keep = jax.random.bernoulli(rng, 0.9, x.shape)
    loss, grads = jax.value_and_grad(self._loss)(params, x * keep / 0.9, y)
    grads = jax.lax.pmean(grads, "i")
    updates, opt_state = self._optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(
        loss, "i")

  def _eval_fn(self, params, x, y):
    loss = jax.lax.pmean(self._loss(params, x, y), "i")
    norm = sum(jnp.sum(jnp.square(p.astype(jnp.float32)))
               for p in jax.tree.leaves(params))
    return loss, norm

  def _initialise(self):
    params = self._net.init(self._init_rng, jnp.zeros((1, _IN)))
    self._params = utils.bcast_local_devices(params)
    self._opt_state = utils.bcast_local_devices(self._optimizer.init(params))

  def step(self, *, global_step, rng, writer):
    del writer
    step = int(np.asarray(utils.get_first(global_step)))
    if step != self._data_position:
      raise RuntimeError(f"global_step {step} but data position "
                         f"{self._data_position}: state did not resume.")
    if self._params is None:
      self._initialise()
    x, y = _batch(self._data_position, jax.local_device_count())
    self._params, self._opt_state, loss = self._update(
        self._params, self._opt_state, x, y, rng)
    self._data_position += 1
    if self._data_position == self._config_training_steps():
      self._write_final()
    print(f"[resume_experiment] step {step}", flush=True)
    if self._config.step_sleep_secs:
      time.sleep(self._config.step_sleep_secs)
    return {"loss": utils.get_first(loss)}

  def _config_training_steps(self) -> int:
    return flags.FLAGS.config.training_steps

  def _write_final(self):
    path = self._config.final_params_path
    if not path:
      return
    values = _flat(utils.get_first(self._params), "params")
    values.update(_flat(utils.get_first(self._opt_state), "opt_state"))
    values["data_position"] = np.asarray(self._data_position)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **values)
    os.replace(tmp, path)

  def evaluate(self, *, global_step, rng, writer):
    del rng, writer
    step = int(np.asarray(utils.get_first(global_step)))
    x, y = _batch(10_000, jax.local_device_count())
    loss, norm = self._eval(self._params, x, y)
    score = -abs(step - self._config.best_step)
    logging.info("[resume_experiment] evaluated step %d mode %s", step,
                 self._mode)
    return {"eval_loss": utils.get_first(loss),
            "param_norm": utils.get_first(norm),
            "score": np.float32(score),
            "data_position": np.int32(self._data_position)}


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
