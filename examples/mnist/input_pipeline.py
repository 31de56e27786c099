"""Digit images as numpy arrays, batched by position for pmap.

Two sources give the same layout:

* `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images). It
  ships inside scikit-learn, so the example trains offline in seconds.
* `mnist`: the 28x28 MNIST from TensorFlow Datasets. TensorFlow is imported
  only when this source is asked for, so nothing else needs it.

Training batches are a pure function of `(seed, position)`: the position-th
global batch of an endless stream of epochs, each a fresh permutation seeded
by `(seed, epoch)`. The experiment checkpoints only the position, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would
have seen, with no iterator state to save.

Everything here is numpy on the host; the experiment hands the arrays to its
pmapped functions, which shard the leading device axis.
"""

import dataclasses
import functools
from typing import Dict, Iterator, Optional

import numpy as np

DATASETS = ("digits", "mnist")
SPLITS = ("train", "test")
NUM_CLASSES = 10

# The digits train/test split is fixed, independent of the run's seed, so
# test accuracies of different runs are comparable.
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0

Batch = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split in memory: images in [0, 1], shape [N, H, W, 1]; int labels."""
  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.shape[-1] != 1:
      raise ValueError(f"images must be [N, H, W, 1], got {self.images.shape}")
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(f"{self.labels.shape[0]} labels for "
                       f"{self.images.shape[0]} images.")

  def __len__(self) -> int:
    return self.labels.shape[0]


def load(dataset: str, split: str, data_dir: Optional[str] = None) -> Dataset:
  """Loads one split of `dataset` ("digits" or "mnist") into memory."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")
  if dataset == "digits":
    return _load_digits(split)
  if dataset == "mnist":
    return _load_mnist(split, data_dir)
  raise ValueError(f"Unknown dataset {dataset!r}; use one of "
                   f"{list(DATASETS)}.")


@functools.lru_cache(maxsize=None)
def _digits_splits() -> Dict[str, Dataset]:
  """Both splits at once, so train and test come from one stratified cut."""
  # Imported here: only the digits source needs scikit-learn.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=_DIGITS_TEST_FRACTION,
      stratify=labels, random_state=_DIGITS_SPLIT_SEED)
  # Sorted, so the split's order does not depend on scikit-learn's shuffling.
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return {"train": Dataset(images[train_idx], labels[train_idx]),
          "test": Dataset(images[test_idx], labels[test_idx])}


def _load_digits(split: str) -> Dataset:
  return _digits_splits()[split]


def _load_mnist(split: str, data_dir: Optional[str]) -> Dataset:
  """Reads a whole MNIST split through TensorFlow Datasets.

  MNIST is small enough (47 MB as uint8) to hold in memory, which keeps the
  position-indexed batching of the digits path instead of a tf.data iterator
  whose state would have to be checkpointed.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "dataset='mnist' needs TensorFlow Datasets: pip install "
        "tensorflow-cpu tensorflow-datasets (or use the default "
        "dataset='digits', which needs only scikit-learn).") from e
  ds = tfds.load("mnist", split=split, as_supervised=True, data_dir=data_dir)
  # Chunks, not batch_size=-1: that needs the split's size from metadata,
  # which is not always there (for example under tfds.testing.mock_data).
  chunks = list(tfds.as_numpy(ds.batch(10_000)))
  images = np.concatenate([c[0] for c in chunks]).astype(np.float32) / 255.0
  labels = np.concatenate([c[1] for c in chunks])
  if images.ndim == 3:
    images = images[..., None]
  return Dataset(images, labels.astype(np.int32))


def per_device_batch_size(global_batch_size: int, num_devices: int) -> int:
  """Splits a global batch evenly over devices, or says how to fix it."""
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f"batch_size={global_batch_size} cannot be split evenly over "
        f"{num_devices} devices. Set --config.experiment_kwargs.config."
        f"batch_size to a positive multiple of {num_devices}.")
  return global_batch_size // num_devices


class TrainBatches:
  """Training batches addressed by position, laid out for pmap.

  `batch(p)` is the p-th batch of the stream, [num_devices, per_device, ...].
  It depends only on the data, the seed and `p`, never on earlier calls.
  """

  def __init__(self, data: Dataset, *, global_batch_size: int,
               num_devices: int, seed: int):
    self._data = data
    self._global_batch_size = global_batch_size
    self._per_device = per_device_batch_size(global_batch_size, num_devices)
    self._num_devices = num_devices
    self._seed = seed
    # The last permutation or two: a batch spans at most two epochs.
    self._permutation = functools.lru_cache(maxsize=2)(self._new_permutation)

  @property
  def image_shape(self) -> tuple[int, ...]:
    """[H, W, C] of one example."""
    return self._data.images.shape[1:]

  def _new_permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    return rng.permutation(len(self._data))

  def indices(self, position: int) -> np.ndarray:
    """Indices into the dataset of the global batch at `position`."""
    if position < 0:
      raise ValueError(f"position must be >= 0, got {position}")
    n = len(self._data)
    stream = np.arange(position * self._global_batch_size,
                       (position + 1) * self._global_batch_size)
    epochs, offsets = np.divmod(stream, n)
    out = np.empty_like(stream)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self._permutation(int(epoch))[offsets[where]]
    return out

  def batch(self, position: int) -> Batch:
    idx = self.indices(position)
    shape = (self._num_devices, self._per_device)
    return {"image": self._data.images[idx].reshape(
                shape + self._data.images.shape[1:]),
            "label": self._data.labels[idx].reshape(shape)}


def eval_batches(data: Dataset, *, global_batch_size: int,
                 num_devices: int) -> Iterator[Batch]:
  """Every example exactly once, padded to full batches.

  Each batch carries a `mask` (1 for real examples, 0 for padding) so that
  sums over devices count each example once, whatever the device count.
  """
  per_device = per_device_batch_size(global_batch_size, num_devices)
  n = len(data)
  # No bigger batches than needed: a small split becomes one small batch.
  per_device = min(per_device, -(-n // num_devices))
  global_batch = per_device * num_devices
  shape = (num_devices, per_device)
  for start in range(0, n, global_batch):
    idx = np.arange(start, start + global_batch)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    yield {"image": data.images[idx].reshape(shape + data.images.shape[1:]),
           "label": data.labels[idx].reshape(shape),
           "mask": mask.astype(np.float32).reshape(shape)}
