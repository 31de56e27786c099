"""`platform.main` with extra periodic actions and a MultiWriter.

  python hooks_main.py --config=observe_experiment.py \
      --config.checkpoint_dir=/tmp/run

Early stopping is a periodic action that raises `utils.StopTraining` once
the loss is below a threshold; the second writer appends every scalar write
to `<checkpoint_dir>/extra_writer.jsonl`, standing in for W&B or MLflow.
"""

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
from jaxline import platform
from jaxline import utils
from jaxline import writers

import observe_experiment

FLAGS = flags.FLAGS


class JsonLinesWriter:
  """A stand-in for a W&B/MLflow writer: one JSON line per call."""

  def __init__(self, path):
    self._path = path

  def write_scalars(self, global_step, scalars):
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(global_step), **{
          k: float(v) for k, v in scalars.items()}}) + "\n")


def _stop_when_loss_below(step, scalars, *, threshold):
  if float(scalars["loss"]) < threshold:
    logging.info("Early stop at %d: loss %.4f < %s", step,
                 float(scalars["loss"]), threshold)
    raise utils.StopTraining(f"loss below {threshold}")


def writer_factory(config, mode):
  extra = JsonLinesWriter(os.path.join(config.checkpoint_dir,
                                       "extra_writer.jsonl"))
  return writers.MultiWriter(platform.create_writer(config, mode), extra)


def main(argv):
  early_stop = utils.PeriodicAction(
      functools.partial(_stop_when_loss_below, threshold=1.0),
      interval_type="steps", interval=1, run_async=False)
  platform.main(observe_experiment.Experiment, argv,
                writer_factory=writer_factory, periodic_actions=[early_stop])


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
