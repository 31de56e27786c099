"""examples/charlm with two hooks for tests/fsdp_test.py.

`--step_sleep_secs` slows every step down, so that a test can kill or
signal a run in the middle. With `--restored_dir`, each process writes what
a restore gave it, so that a test can compare it with the checkpoint:
`restored_p<i>.npz` (the parameters, gathered, by "module/name") and
`restored_p<i>.json` (their partition specs and the input position).
Otherwise it is `python -m examples.charlm.experiment`.
"""

import functools
import json
import os
import time

from absl import app
from absl import flags
import jax
from jaxline import platform
from jaxline import sharding
import numpy as np

from examples.charlm import experiment as charlm

_STEP_SLEEP_SECS = flags.DEFINE_float(
    "step_sleep_secs", 0.0, "Seconds to sleep before each training step.")
_RESTORED_DIR = flags.DEFINE_string(
    "restored_dir", "", "Where each process writes what it restored.")


def _name(path) -> str:
  return "/".join(str(k.key) for k in path)


class Experiment(charlm.Experiment):
  """The charlm experiment, slowed down and reporting its restores."""

  def step(self, **kwargs):
    time.sleep(_STEP_SLEEP_SECS.value)
    return super().step(**kwargs)

  def restore_from_snapshot(self, snapshot_state):
    super().restore_from_snapshot(snapshot_state)
    if not _RESTORED_DIR.value:
      return
    gathered = sharding.to_host(self._params)  # Collective: every process.
    prefix = os.path.join(_RESTORED_DIR.value,
                          f"restored_p{jax.process_index()}")
    np.savez(prefix + ".npz", **{
        _name(path): value
        for path, value in jax.tree_util.tree_leaves_with_path(gathered)})
    specs = {_name(path): [axis for axis in x.sharding.spec]
             for path, x in jax.tree_util.tree_leaves_with_path(self._params)}
    with open(prefix + ".json", "w") as f:
      json.dump({"specs": specs, "input_position": self._input_position,
                 "mesh_size": self._mesh.size}, f)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
