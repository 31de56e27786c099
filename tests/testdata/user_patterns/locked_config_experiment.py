"""An experiment whose `get_config` fails after locking its config.

distribution_shift_framework's `get_config` calls `config.lock()`; a key
assigned after that raises inside the config file. The user must see that
error, with this file in the traceback.
"""

import functools

from absl import app
from absl import flags
from jaxline import base_config
from jaxline import experiment
from jaxline import platform


def get_config():
  config = base_config.get_base_config()
  config.training_steps = 1
  config.lock()
  config.host_subdir = "host_{host_id}"  # Not a key: raises here.
  return config


class Experiment(experiment.AbstractExperiment):

  def __init__(self, mode, init_rng=None):
    super().__init__(mode=mode, init_rng=init_rng)

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
