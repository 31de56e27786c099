"""A tiny ImageNet prepared by TensorFlow Datasets' own imagenet2012 builder.

`tfds.testing.mock_data` does not split: every `split_for_jax_process` part
of a mocked split holds the whole split. To test per-host sharding on real
tfds sub-splits, this writes archives laid out like the ImageNet downloads
(ILSVRC2012_img_train.tar of per-class tars, ILSVRC2012_img_val.tar) and
prepares them with `prepare_data.prepare`, as a user would the real ones,
offline, into a temporary data_dir.

Every training image is the only one of its class, and the first validation
labels of tfds' list are distinct, so a label identifies its example.
"""

import io
import os
import tarfile
from typing import Optional

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from examples.imagenet import prepare_data


def _jpeg(rng: np.random.Generator) -> bytes:
  """A random RGB JPEG of a random, non-square size."""
  height, width = rng.integers(24, 72, size=2)
  pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")
  return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def _write_manual_dir(manual_dir: str, class_names: list[str],
                      num_validation: int, rng: np.random.Generator) -> None:
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"),
                    "w") as train:
    for name in class_names:
      class_tar = io.BytesIO()
      with tarfile.open(fileobj=class_tar, mode="w") as inner:
        _add(inner, f"{name}_1.JPEG", _jpeg(rng))
      _add(train, f"{name}.tar", class_tar.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"),
                    "w") as val:
    for i in range(num_validation):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng))


def prepare(data_dir: str, *, num_train: int = 24, num_validation: int = 18,
            seed: int = 0, manual_dir: Optional[str] = None) -> None:
  """Prepares imagenet2012 with `num_train` and `num_validation` images.

  Nothing is downloaded: the builder reads the archives written here.
  """
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  class_names = builder.info.features["label"].names[:num_train]
  manual_dir = manual_dir or os.path.join(data_dir, "manual")
  _write_manual_dir(manual_dir, class_names, num_validation,
                    np.random.default_rng(seed))
  prepare_data.prepare(manual_dir, data_dir)
