"""Tests for the digit input pipeline: layout, determinism, coverage.

The batches must be a pure function of (seed, position), since the
experiment checkpoints only the position; most tests here pin that down.
"""

import sys

import numpy as np
import pytest

from examples.mnist import input_pipeline


def _toy(n: int = 10) -> input_pipeline.Dataset:
  """A dataset whose labels name their own index, to trace examples."""
  images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones(
      (1, 2, 2, 1), np.float32)
  return input_pipeline.Dataset(images, np.arange(n, dtype=np.int32))


class TestDigits:

  def test_splits_have_the_documented_sizes_and_ranges(self):
    train = input_pipeline.load("digits", "train")
    test = input_pipeline.load("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    for split in (train, test):
      assert split.images.shape[1:] == (8, 8, 1)
      assert split.images.dtype == np.float32
      assert split.labels.dtype == np.int32
      assert 0.0 <= split.images.min() and split.images.max() <= 1.0
      # Stratified: every class is in both splits, in similar numbers.
      counts = np.bincount(split.labels, minlength=10)
      assert counts.min() >= 0.08 * len(split)

  def test_train_and_test_do_not_share_images(self):
    train = input_pipeline.load("digits", "train")
    test = input_pipeline.load("digits", "test")
    train_rows = {row.tobytes() for row in train.images}
    shared = sum(row.tobytes() in train_rows for row in test.images)
    # load_digits has a few exact duplicate images; the split itself is
    # disjoint by index, so only those can coincide.
    assert shared < 5

  def test_split_is_fixed(self):
    # The cut must not depend on the run's seed, or test accuracies of two
    # runs would be measured on different examples.
    first = input_pipeline.load("digits", "test")
    input_pipeline._digits_splits.cache_clear()
    second = input_pipeline.load("digits", "test")
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.images, second.images)

  def test_unknown_names_are_rejected(self):
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
      input_pipeline.load("cifar", "train")
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
      input_pipeline.load("digits", "validation")


class TestPerDeviceBatchSize:

  @pytest.mark.parametrize("global_size,devices,expected",
                           [(128, 1, 128), (128, 8, 16), (120, 3, 40)])
  def test_even_splits(self, global_size, devices, expected):
    assert input_pipeline.per_device_batch_size(global_size,
                                                devices) == expected

  @pytest.mark.parametrize("global_size,devices", [(7, 2), (128, 3), (0, 1)])
  def test_uneven_splits_say_which_flag_to_set(self, global_size, devices):
    with pytest.raises(ValueError,
                       match=(rf"batch_size={global_size} cannot be split "
                              rf"evenly over {devices} devices.*"
                              r"experiment_kwargs\.config\.batch_size")):
      input_pipeline.per_device_batch_size(global_size, devices)


class TestTrainBatches:

  def test_layout_is_devices_then_examples(self):
    data = input_pipeline.load("digits", "train")
    batches = input_pipeline.TrainBatches(data, global_batch_size=128,
                                          num_devices=8, seed=0)
    batch = batches.batch(3)
    assert batch["image"].shape == (8, 16, 8, 8, 1)
    assert batch["label"].shape == (8, 16)
    assert batch["image"].dtype == np.float32
    idx = batches.indices(3)
    # Device d gets the d-th consecutive slice of the global batch.
    for d in range(8):
      np.testing.assert_array_equal(batch["label"][d],
                                    data.labels[idx[16 * d:16 * (d + 1)]])
      np.testing.assert_array_equal(batch["image"][d],
                                    data.images[idx[16 * d:16 * (d + 1)]])

  def test_batch_depends_only_on_seed_and_position(self):
    data = input_pipeline.load("digits", "train")
    make = lambda seed: input_pipeline.TrainBatches(
        data, global_batch_size=64, num_devices=2, seed=seed)
    walked = make(5)
    for position in range(40):  # Through several epochs.
      walked.batch(position)
    # A fresh pipeline (a resumed run) jumps straight to the position.
    for position in (0, 22, 23, 39, 1000):
      expected = make(5).batch(position)
      for key in ("image", "label"):
        np.testing.assert_array_equal(walked.batch(position)[key],
                                      expected[key])
    assert not np.array_equal(make(5).indices(0), make(6).indices(0))

  def test_batches_are_independent_of_the_device_count(self):
    # The global batch is the same; only its split over devices changes, so
    # 1 and 8 devices train on the same examples.
    data = input_pipeline.load("digits", "train")
    one, eight = (input_pipeline.TrainBatches(
        data, global_batch_size=128, num_devices=n, seed=1) for n in (1, 8))
    np.testing.assert_array_equal(one.batch(17)["label"].reshape(-1),
                                  eight.batch(17)["label"].reshape(-1))

  def test_each_epoch_visits_every_example_once(self):
    data = _toy(10)
    batches = input_pipeline.TrainBatches(data, global_batch_size=4,
                                          num_devices=2, seed=3)
    # 10 examples, batches of 4: epochs end mid-batch.
    stream = np.concatenate([batches.indices(p) for p in range(10)])
    epochs = stream.reshape(4, 10)
    for epoch in epochs:
      assert sorted(epoch.tolist()) == list(range(10))
    # Each epoch has its own order.
    assert len({tuple(epoch) for epoch in epochs}) == 4
    # Labels identify the examples in this toy set.
    np.testing.assert_array_equal(
        batches.batch(2)["label"].reshape(-1), batches.indices(2))

  def test_negative_position_is_an_error(self):
    batches = input_pipeline.TrainBatches(_toy(), global_batch_size=2,
                                          num_devices=1, seed=0)
    with pytest.raises(ValueError, match="position must be >= 0"):
      batches.indices(-1)

  def test_uneven_batch_is_rejected_at_construction(self):
    with pytest.raises(ValueError, match="cannot be split evenly"):
      input_pipeline.TrainBatches(_toy(), global_batch_size=6,
                                  num_devices=4, seed=0)


class TestEvalBatches:

  @pytest.mark.parametrize("devices,global_size", [(1, 4), (3, 6), (8, 8),
                                                   (2, 1024)])
  def test_every_example_once_in_order(self, devices, global_size):
    data = _toy(10)
    batches = list(input_pipeline.eval_batches(
        data, global_batch_size=global_size, num_devices=devices))
    labels, masks = [], []
    for batch in batches:
      assert batch["image"].shape[:2] == batch["label"].shape
      assert batch["mask"].shape == batch["label"].shape
      assert batch["label"].shape[0] == devices
      labels.append(batch["label"].reshape(-1))
      masks.append(batch["mask"].reshape(-1))
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    np.testing.assert_array_equal(labels[masks == 1], data.labels)
    assert masks.sum() == len(data)

  def test_small_split_gives_one_small_batch(self):
    batches = list(input_pipeline.eval_batches(
        _toy(10), global_batch_size=1024, num_devices=2))
    assert len(batches) == 1
    assert batches[0]["label"].shape == (2, 5)


class TestMnist:

  def test_mock_tfds_split_has_the_digits_layout(self):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
      data = input_pipeline.load("mnist", "test")
    assert len(data) == 12
    assert data.images.shape == (12, 28, 28, 1)
    assert data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert data.labels.dtype == np.int32
    assert set(data.labels.tolist()) <= set(range(10))
    batches = input_pipeline.TrainBatches(data, global_batch_size=8,
                                          num_devices=2, seed=0)
    assert batches.batch(0)["image"].shape == (2, 4, 28, 28, 1)

  def test_missing_tfds_names_the_packages(self, monkeypatch):
    # None in sys.modules makes the import fail, as when not installed.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-cpu "
                       "tensorflow-datasets"):
      input_pipeline.load("mnist", "train")
