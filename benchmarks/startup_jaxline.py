"""`startup_plain.py`'s model and step, run through jaxline as a user would.

An experiment file with its config, started as
`python benchmarks/startup_jaxline.py --config=benchmarks/startup_jaxline.py`:
`platform.main` in train mode, 1 device, no `checkpoint_dir` (so the
in-memory checkpointer and no writer), a few steps. It uses the sharded
style, whose step is the same `jax.jit` update the plain script runs, so
the difference between the two children's times is jaxline's: its imports,
flag and config handling, the harness's set-up before the first step and
its per-step keys. It prints the same `IMPORTED` line once its imports
are done, and the first `step` the same `FIRST_STEP` line once its update
is.
"""

import functools
from typing import Any, Dict, Optional

from absl import app
from absl import flags
import jax
from jaxline import base_config
from jaxline import experiment
from jaxline import platform
from ml_collections import config_dict

import startup_plain


class Experiment(experiment.AbstractExperiment):
  """One SGD update of the tiny MLP per step, on one fixed batch."""

  CHECKPOINT_ATTRS = {"_params": "params"}

  def __init__(self, mode: str, init_rng: Optional[jax.Array] = None):
    super().__init__(mode=mode, init_rng=init_rng)
    self._params = startup_plain.init_params(init_rng)
    self._images, self._labels = jax.device_put(startup_plain.batch())
    self._reported = False

  def step(self, *, global_step: jax.Array, rng: jax.Array,
           writer: Any) -> Dict[str, jax.Array]:
    del global_step, rng, writer
    self._params, loss = startup_plain.update(self._params, self._images,
                                              self._labels)
    if not self._reported:
      self._reported = True
      jax.block_until_ready((self._params, loss))
      startup_plain.report("FIRST_STEP")
    return {"loss": loss}

  def evaluate(self, *, global_step: jax.Array, rng: jax.Array,
               writer: Any) -> Dict[str, Any]:
    del global_step, rng, writer
    return {}


def get_config() -> config_dict.ConfigDict:
  config = base_config.get_base_config()
  config.experiment_style = "sharded"
  config.training_steps = 3
  config.checkpoint_dir = ""
  return config


if __name__ == "__main__":
  startup_plain.report("IMPORTED")
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
