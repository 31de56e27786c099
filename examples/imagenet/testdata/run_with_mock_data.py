r"""Runs the ImageNet experiment on random data from `tfds.testing.mock_data`.

The same entry point as `python -m examples.imagenet.experiment`, with
TensorFlow Datasets patched for the whole run, so that the real input
pipeline, harness, checkpoints and TensorBoard files are exercised without
ImageNet on disk:

  python -m examples.imagenet.testdata.run_with_mock_data \
      --config=examples/imagenet/config.py:tiny \
      --config.checkpoint_dir=runs/imagenet_mock

Every split holds `--mock_num_examples` random JPEGs with random labels.
Test-only: the experiment itself knows nothing about mocking.
"""

import functools
import os
import sys

from absl import app
from absl import flags
from absl import logging
from jaxline import platform
import tensorflow_datasets as tfds

from examples.imagenet import experiment

_NUM_EXAMPLES = flags.DEFINE_integer(
    "mock_num_examples", 32, "Examples in every mocked split.")


def main(argv, experiment_class=experiment.Experiment) -> None:
  with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES.value):
    platform.main(experiment_class, argv)
  # The mocked splits are `tf.data.Dataset.from_generator`: Python code that
  # tf.data's threads run. At interpreter exit Python ends any thread that
  # asks for the GIL, so destroying the experiment's endless training
  # iterator then waits forever for a parallel map call stuck on such a
  # thread (seen in about 1 run in 10 under load). Real TFRecord input runs no
  # Python there. Everything is written and flushed by now: leave without the
  # teardown.
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(main, experiment_class=experiment.Experiment))
