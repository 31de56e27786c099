"""A tiny experiment for tests/checkpoint_process_test.py.

Run it as a user would:

  python checkpoint_experiment.py --config=checkpoint_experiment.py \
      --config.checkpoint_dir=/tmp/run

Its parameters are `{"b": [hidden], "marker": [], "w": [4, hidden]}`, with
the dtype from `config.dtype`. The update is plain numpy, so a resumed run
can match an uninterrupted one bit for bit, and each step draws its data
from the step key, so the key state must come back too. `marker` is set to
the number of steps done, so a checkpoint's parameters tell which step they
come from; `evaluate` returns it as `step_value`.

`eager` creates the parameters in `__init__`; otherwise the first step
creates them, and `declare_abstract` makes `abstract_snapshot_state` declare
their shapes. The host entry `writer_pid` records which process saved a
checkpoint. `step_sleep_secs` slows steps down so a test can catch a run
mid-way. One `[checkpoint_experiment] step N` line per step, N counted from
0, is printed after the update.
"""

import functools
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
from jaxline import utils

_IN = 4


def get_config():
  """Saves every 2 steps; override with --config.*."""
  config = base_config.get_base_config()
  config.training_steps = 20
  config.interval_type = "steps"
  config.save_checkpoint_interval = 2
  config.log_tensors_interval = 5
  config.log_train_data_interval = 5
  config.log_async = False
  config.max_checkpoints_to_keep = 5
  config.checkpoint_dir = ""
  config.eval_poll_interval_secs = 0.05
  config.eval_every_checkpoint = False
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=dict(
      hidden=16,
      dtype="float32",
      learning_rate=0.1,
      eager=True,
      declare_abstract=False,
      step_sleep_secs=0.0,
      final_params_path="",
  )))
  return config


def _init_params(rng, hidden: int, dtype) -> dict[str, np.ndarray]:
  w = np.asarray(jax.random.normal(rng, (_IN, hidden)), np.float32)
  return {"w": (0.1 * w).astype(dtype),
          "b": np.zeros([hidden], dtype),
          "marker": np.zeros([], np.float32)}


class Experiment(experiment.AbstractExperiment):
  """Least squares of a linear map, updated in numpy."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_writer_pid": "writer_pid"}

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self._config = config
    self._init_rng = init_rng
    self._dtype = jnp.dtype(config.dtype)
    self._writer_pid = os.getpid()
    self._params = None
    if config.eager:
      self._params = utils.bcast_local_devices(self._fresh())

  def _fresh(self):
    return _init_params(self._init_rng, self._config.hidden, self._dtype)

  def abstract_snapshot_state(self):
    if not self._config.declare_abstract:
      return None
    return {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._fresh())}

  def step(self, *, global_step, rng, writer):
    del writer
    step = int(np.asarray(utils.get_first(global_step)))
    if self._params is None:
      self._params = utils.bcast_local_devices(self._fresh())
    params = jax.device_get(utils.get_first(self._params))
    x = np.asarray(jax.random.normal(utils.get_first(rng), (8, _IN)))
    target = np.sin(x.sum(-1, keepdims=True))
    w = params["w"].astype(np.float32)
    error = x @ w + params["b"].astype(np.float32) - target
    lr = np.float32(self._config.learning_rate)
    new = {"w": (w - lr * x.T @ error / 8).astype(self._dtype),
           "b": (params["b"] - lr * error.mean(0)).astype(self._dtype),
           "marker": np.float32(step + 1)}
    self._params = utils.bcast_local_devices(new)
    self._writer_pid = os.getpid()
    if step + 1 == flags.FLAGS.config.training_steps:
      self._write_final(new)
    print(f"[checkpoint_experiment] step {step}", flush=True)
    if self._config.step_sleep_secs:
      time.sleep(self._config.step_sleep_secs)
    return {"loss": np.float32(np.mean(error ** 2))}

  def _write_final(self, params):
    path = self._config.final_params_path
    if path:
      np.savez(path + ".tmp.npz", **params)
      os.replace(path + ".tmp.npz", path)

  def evaluate(self, *, global_step, rng, writer):
    del rng, writer
    params = jax.device_get(utils.get_first(self._params))
    return {"step_value": np.float32(params["marker"]),
            "eval_global_step": np.float32(
                np.asarray(utils.get_first(global_step)))}


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
