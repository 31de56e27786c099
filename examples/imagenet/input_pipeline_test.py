"""Tests of the ImageNet input pipeline: layout, preprocessing, host sharding.

Layout and preprocessing run on `tfds.testing.mock_data`. Mocked splits do not
split per host, so the sharding tests prepare a tiny imagenet2012 with tfds'
own builder (testdata/fake_imagenet.py), where every label names one example.
"""

import io

import numpy as np
from PIL import Image
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

# pylint: disable=g-import-not-at-top,wrong-import-position
from examples.imagenet import config as config_lib
from examples.imagenet import input_pipeline
from examples.imagenet.testdata import fake_imagenet
# pylint: enable=g-import-not-at-top,wrong-import-position

_NUM_TRAIN = 24
_NUM_VALIDATION = 18


def _dataset_config(**overrides):
  config = config_lib.get_config("tiny").experiment_kwargs.config.dataset
  config.update(overrides)
  return config


def _first(ds):
  return next(iter(input_pipeline.as_numpy(ds)))


def _pixels(images, config):
  """Undoes the normalisation: values on the [0, 255] scale."""
  return (np.asarray(images, np.float32) * np.array(config.stddev_rgb) +
          np.array(config.mean_rgb))


@pytest.fixture(name="mock_data")
def _mock_data():
  with tfds.testing.mock_data(num_examples=20):
    yield


@pytest.fixture(name="fake_data_dir", scope="module")
def _fake_data_dir(tmp_path_factory):
  # tensorflow-datasets 4.9.10 needs it to prepare a dataset, but declares it
  # only for Python < 3.9.
  pytest.importorskip("importlib_resources")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  fake_imagenet.prepare(data_dir, num_train=_NUM_TRAIN,
                        num_validation=_NUM_VALIDATION)
  return data_dir


class TestLayout:

  @pytest.mark.usefixtures("mock_data")
  def test_train_batches_are_split_per_device(self):
    config = _dataset_config()
    batch = _first(input_pipeline.train_dataset(
        config, global_batch_size=16, seed=0, process_index=0,
        process_count=2, num_local_devices=4))
    # 16 over 2 hosts x 4 devices: 8 per host, 2 per device.
    assert batch["images"].shape == (4, 2, 32, 32, 3)
    assert batch["images"].dtype == np.float32
    assert batch["labels"].shape == (4, 2)
    assert batch["labels"].dtype == np.int32
    assert set(batch) == {"images", "labels"}

  @pytest.mark.usefixtures("mock_data")
  def test_bfloat16_images(self):
    batch = _first(input_pipeline.train_dataset(
        _dataset_config(), global_batch_size=8, seed=0,
        dtype=input_pipeline.tf_dtype(True), process_index=0,
        process_count=1, num_local_devices=2))
    assert batch["images"].dtype.name == "bfloat16"

  def test_indivisible_batch_is_rejected(self):
    with pytest.raises(ValueError, match="not divisible by the number of "
                       "devices 8"):
      input_pipeline.train_dataset(
          _dataset_config(), global_batch_size=12, seed=0, process_index=0,
          process_count=2, num_local_devices=4)

  def test_process_index_out_of_range_is_rejected(self):
    with pytest.raises(ValueError, match="process_index 2"):
      input_pipeline.eval_dataset(
          _dataset_config(), global_batch_size=8, process_index=2,
          process_count=2, num_local_devices=1)

  @pytest.mark.parametrize("num_examples,batch,hosts,devices,expected", [
      (50_000, 1024, 1, 8, 49),
      (50_000, 1000, 1, 8, 50),
      (50_000, 1024, 4, 8, 49),  # 12,500 per host in batches of 256.
      (18, 8, 2, 2, 3),  # 9 per host in batches of 4.
      (17, 8, 2, 2, 3),  # 9 and 8: the larger share sets it.
  ])
  def test_num_eval_batches(self, num_examples, batch, hosts, devices,
                            expected):
    assert input_pipeline.num_eval_batches(num_examples, batch, hosts,
                                           devices) == expected


class TestPreprocessing:

  @pytest.mark.usefixtures("mock_data")
  def test_same_seed_same_stream_other_seed_other_stream(self):
    def first_batches(seed):
      ds = input_pipeline.train_dataset(
          _dataset_config(), global_batch_size=8, seed=seed, process_index=0,
          process_count=1, num_local_devices=2)
      return list(input_pipeline.as_numpy(ds.take(3)))

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["images"], y["images"])
      np.testing.assert_array_equal(x["labels"], y["labels"])
    assert not all(np.array_equal(x["images"], z["images"])
                   for x, z in zip(a, c))

  @pytest.mark.usefixtures("mock_data")
  def test_train_images_are_normalised_pixels(self):
    config = _dataset_config()
    batch = _first(input_pipeline.train_dataset(
        config, global_batch_size=8, seed=0, process_index=0,
        process_count=1, num_local_devices=2))
    pixels = _pixels(batch["images"], config)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    # Mock images are uniform noise: mean about 127.5 before normalising.
    assert 90 < pixels.mean() < 165

  def _jpeg(self, height, width, white_box):
    """Black, with white over rows/cols [y0, y1) x [x0, x1)."""
    pixels = np.zeros([height, width, 3], np.uint8)
    y0, y1, x0, x1 = white_box
    pixels[y0:y1, x0:x1] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=100)
    return tf.constant(buffer.getvalue())

  def test_eval_crop_is_the_centre_of_the_shorter_side(self):
    # 40x80 image; with image_size 8 and crop_padding 8 the crop is half the
    # shorter side, 20x20, at rows 10..30 and columns 30..50. It lies inside
    # the white box, with a margin for JPEG ringing.
    image_bytes = self._jpeg(40, 80, (7, 33, 27, 53))
    config = _dataset_config(image_size=8, crop_padding=8)
    image = input_pipeline.preprocess_eval(image_bytes, config).numpy()
    assert image.shape == (8, 8, 3)
    assert _pixels(image, config).min() > 240
    # Without padding the crop is the whole shorter side: it takes in black.
    config = _dataset_config(image_size=8, crop_padding=0)
    image = input_pipeline.preprocess_eval(image_bytes, config).numpy()
    assert _pixels(image, config).min() < 15

  def test_train_crop_shape_and_flip_follow_the_seed(self):
    # Left half white: a flip moves the white to the right.
    image_bytes = self._jpeg(64, 64, (0, 64, 0, 32))
    config = _dataset_config(image_size=16, crop_area_range=(1.0, 1.0),
                             crop_aspect_ratio_range=(1.0, 1.0))
    sides = set()
    for seed in range(8):
      image = input_pipeline.preprocess_train(
          image_bytes, tf.constant([seed, 0], tf.int64), config).numpy()
      assert image.shape == (16, 16, 3)
      pixels = _pixels(image, config)
      left, right = pixels[:, :4].mean(), pixels[:, -4:].mean()
      assert abs(left - right) > 200
      sides.add("left" if left > right else "right")
      again = input_pipeline.preprocess_train(
          image_bytes, tf.constant([seed, 0], tf.int64), config).numpy()
      np.testing.assert_array_equal(image, again)
    assert sides == {"left", "right"}

  @pytest.mark.usefixtures("mock_data")
  def test_eval_pads_the_last_batch_with_masked_zeros(self):
    config = _dataset_config()
    batches = list(input_pipeline.as_numpy(input_pipeline.eval_dataset(
        config, global_batch_size=8, process_index=0, process_count=1,
        num_local_devices=2)))
    # 20 examples in batches of 8: 8 + 8 + 4 real and 4 padding.
    assert len(batches) == 3
    assert [b["mask"].sum() for b in batches] == [8, 8, 4]
    last = batches[-1]
    assert last["images"].shape == (2, 4, 32, 32, 3)
    padding = last["mask"] == 0
    assert not np.any(last["images"][padding])
    assert not np.any(last["labels"][padding])


class TestHostSharding:
  """Two hosts of two devices each, on a dataset tfds really splits."""

  def _config(self, data_dir):
    return _dataset_config(data_dir=data_dir, shuffle_buffer_size=8)

  def test_fake_labels_identify_examples(self, fake_data_dir):
    # The tests below rely on it.
    for split, size in (("train", _NUM_TRAIN),
                        ("validation", _NUM_VALIDATION)):
      labels = [int(e["label"]) for e in tfds.load(
          "imagenet2012", split=split, data_dir=fake_data_dir)]
      assert len(labels) == len(set(labels)) == size

  def test_train_hosts_read_disjoint_halves(self, fake_data_dir):
    config = self._config(fake_data_dir)
    seen = []
    for host in range(2):
      ds = input_pipeline.train_dataset(
          config, global_batch_size=8, seed=host, process_index=host,
          process_count=2, num_local_devices=2)
      labels = set()
      # 10 batches of 4 from the 12 examples of this host: every one shows.
      for batch in input_pipeline.as_numpy(ds.take(10)):
        assert batch["images"].shape == (2, 2, 32, 32, 3)
        labels.update(batch["labels"].ravel().tolist())
      seen.append(labels)
    all_labels = {int(e["label"]) for e in tfds.load(
        "imagenet2012", split="train", data_dir=fake_data_dir)}
    assert len(seen[0]) == len(seen[1]) == _NUM_TRAIN // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_labels

  def test_eval_hosts_cover_the_split_once_in_equal_batch_counts(
      self, fake_data_dir):
    config = self._config(fake_data_dir)
    per_host = []
    for host in range(2):
      batches = list(input_pipeline.as_numpy(input_pipeline.eval_dataset(
          config, global_batch_size=8, process_index=host, process_count=2,
          num_local_devices=2)))
      per_host.append(batches)
    # 18 examples, 9 per host in batches of 4: 3 batches each, so a psum
    # over both hosts never waits for one that has run out.
    assert [len(b) for b in per_host] == [3, 3]
    labels = []
    for batches in per_host:
      host_labels = []
      for batch in batches:
        assert batch["images"].shape == (2, 2, 32, 32, 3)
        real = batch["mask"] == 1
        host_labels += batch["labels"][real].tolist()
      labels.append(host_labels)
    assert [len(x) for x in labels] == [9, 9]
    all_labels = sorted(int(e["label"]) for e in tfds.load(
        "imagenet2012", split="validation", data_dir=fake_data_dir))
    assert sorted(labels[0] + labels[1]) == all_labels
