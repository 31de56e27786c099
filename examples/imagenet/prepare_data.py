r"""Prepares ImageNet for TensorFlow Datasets, once, from the downloaded tars.

ImageNet cannot be downloaded automatically: register at
https://image-net.org, download ILSVRC2012_img_train.tar (about 138 GB) and
ILSVRC2012_img_val.tar (about 6.3 GB) into one directory, then run (once, on
one machine; it takes hours and writes about 150 GB):

  python -m examples.imagenet.prepare_data \
      --manual_dir=/path/to/the/tars --data_dir=/path/to/tfds

and point the experiment at the result with
`--config.experiment_kwargs.config.dataset.data_dir=/path/to/tfds`.

This does what `tfds build imagenet2012 --manual_dir=...` does; that command
needs apache_beam in tensorflow-datasets 4.9.10, this does not. Either needs
the `importlib_resources` package, which tensorflow-datasets uses without
declaring it on Python >= 3.9.
"""

from typing import Optional

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None,
    "Directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "Where to write the prepared dataset (default: ~/tensorflow_datasets).")


def prepare(manual_dir: str, data_dir: Optional[str] = None) -> None:
  """Runs tfds' imagenet2012 builder on the archives in `manual_dir`.

  Nothing is downloaded (no fetch of pre-built files either); a dataset that
  is already prepared is left as it is.
  """
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  for name, split in sorted(builder.info.splits.items()):
    logging.info("imagenet2012 %s: %d examples in %s.", name,
                 split.num_examples, builder.data_dir)


def main(argv) -> None:
  del argv
  prepare(_MANUAL_DIR.value, _DATA_DIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("manual_dir")
  app.run(main)
