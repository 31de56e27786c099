r"""Runs the ImageNet experiment on random data from `tfds.testing.mock_data`.

The same entry point as `python -m examples.imagenet.experiment`, with
TensorFlow Datasets patched for the whole run, so that the real input
pipeline, harness, checkpoints and TensorBoard files are exercised without
ImageNet on disk:

  python -m examples.imagenet.testdata.run_with_mock_data \
      --config=examples/imagenet/config.py:tiny \
      --config.checkpoint_dir=/tmp/imagenet_mock

Every split holds `--mock_num_examples` random JPEGs with random labels.
Test-only: the experiment itself knows nothing about mocking.
"""

import functools

from absl import app
from absl import flags
from jaxline import platform
import tensorflow_datasets as tfds

from examples.imagenet import experiment

_NUM_EXAMPLES = flags.DEFINE_integer(
    "mock_num_examples", 32, "Examples in every mocked split.")


def main(argv, experiment_class=experiment.Experiment) -> None:
  with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES.value):
    platform.main(experiment_class, argv)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(main, experiment_class=experiment.Experiment))
