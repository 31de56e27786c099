"""The ImageNet input pipeline: TensorFlow Datasets and tf.data, per host.

This is the only module of the example that imports TensorFlow; the
experiment imports it when it first needs data, so configs, the harness and
the model load without TensorFlow installed.

Each host reads its own part of a split (`tfds.split_for_jax_process`), so
the hosts together see every example once per epoch, and builds batches of
`global_batch_size / process_count` examples, reshaped to
[local_devices, per_device_batch, ...]: the layout a pmapped step takes.

* Training: an endless, shuffled stream. Each image gets an Inception-style
  random crop (decoded straight from the JPEG crop window, so full images are
  never decoded), a resize to `image_size` and a random horizontal flip. The
  randomness is stateless and derived from `seed`, so a given seed (and host)
  always yields the same stream.
* Evaluation: one pass, centre crops, in order. Every host yields the same
  number of batches; the last ones are padded with `mask == 0` examples, so
  that a cross-host `psum` in the step never waits for a host that has run
  out and every real example counts exactly once.

Images are normalised with the ImageNet channel statistics on the host.
"""

import math
from typing import Any, Iterable, Mapping, Optional, Tuple

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# TensorFlow only feeds the host pipeline: keep it off the accelerators, whose
# memory belongs to JAX.
tf.config.set_visible_devices([], "GPU")

Batch = Mapping[str, np.ndarray]


def _layout(global_batch_size: int, process_count: int,
            num_local_devices: int) -> Tuple[int, int]:
  """The per-host and per-device batch sizes; raises if they are not whole."""
  num_devices = process_count * num_local_devices
  if global_batch_size % num_devices:
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the "
        f"number of devices {num_devices} ({process_count} host(s) x "
        f"{num_local_devices}); choose a multiple of {num_devices}.")
  per_host = global_batch_size // process_count
  return per_host, per_host // num_local_devices


def _host_layout(process_index: Optional[int], process_count: Optional[int],
                 num_local_devices: Optional[int]) -> Tuple[int, int, int]:
  """Fills in this process's place in the job where not given (tests do)."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if num_local_devices is None:
    num_local_devices = jax.local_device_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  return process_index, process_count, num_local_devices


def _load(config: Any, split: str, *, shuffle_files: bool = False,
          seed: Optional[int] = None) -> tf.data.Dataset:
  """Examples of `split` with the JPEG bytes left encoded.

  Decoding is left to the preprocessing, which decodes only the crop window.
  `download=False`: ImageNet has to be prepared once, by hand (README), and
  several hosts must never try to prepare it at the same time.
  """
  read_config = tfds.ReadConfig(shuffle_seed=seed)
  return tfds.load(
      config.name, split=split, data_dir=config.data_dir, download=False,
      shuffle_files=shuffle_files, read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()})


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # One thread per map call: tf.data already runs many calls in parallel,
  # and intra-op threads on top of them only contend for the cores.
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  return options


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bicubic resize to a square; bicubic overshoots, so clip to [0, 255]."""
  image = tf.image.resize(image, [image_size, image_size], method="bicubic")
  return tf.clip_by_value(image, 0.0, 255.0)


def _centre_crop_window(image_shape: tf.Tensor, image_size: int,
                        crop_padding: int) -> tf.Tensor:
  """[y, x, h, w]: a square of image_size / (image_size + padding) of the
  shorter side, in the middle (224 of 256 for the standard setting)."""
  height, width = image_shape[0], image_shape[1]
  fraction = image_size / (image_size + crop_padding)
  side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32),
                 tf.int32)
  side = tf.maximum(side, 1)
  offset_y = (height - side + 1) // 2
  offset_x = (width - side + 1) // 2
  return tf.stack([offset_y, offset_x, side, side])


def _random_crop_window(image_shape: tf.Tensor, seed: tf.Tensor,
                        config: Any) -> tf.Tensor:
  """[y, x, h, w] of an Inception-style random crop.

  When no sampled box fits (the sampler then returns the whole image), fall
  back to the eval centre crop rather than squash the whole image.
  """
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=whole_image, seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=tuple(config.crop_aspect_ratio_range),
      area_range=tuple(config.crop_area_range),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  failed = tf.reduce_all(tf.equal(size[:2], image_shape[:2]))
  return tf.cond(
      failed,
      lambda: _centre_crop_window(image_shape, config.image_size,
                                  config.crop_padding),
      lambda: window)


def _normalize(image: tf.Tensor, config: Any, dtype: tf.DType) -> tf.Tensor:
  mean = tf.constant(config.mean_rgb, tf.float32, [1, 1, 3])
  stddev = tf.constant(config.stddev_rgb, tf.float32, [1, 1, 3])
  return tf.cast((image - mean) / stddev, dtype)


def preprocess_train(image_bytes: tf.Tensor, seed: tf.Tensor, config: Any,
                     dtype: tf.DType = tf.float32) -> tf.Tensor:
  """Random crop, resize, random flip, normalise: [S, S, 3] of `dtype`."""
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  window = _random_crop_window(tf.io.extract_jpeg_shape(image_bytes),
                               crop_seed, config)
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  image = _resize(image, config.image_size)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _normalize(image, config, dtype)


def preprocess_eval(image_bytes: tf.Tensor, config: Any,
                    dtype: tf.DType = tf.float32) -> tf.Tensor:
  """Centre crop, resize, normalise: [S, S, 3] of `dtype`."""
  window = _centre_crop_window(tf.io.extract_jpeg_shape(image_bytes),
                               config.image_size, config.crop_padding)
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  image = _resize(image, config.image_size)
  return _normalize(image, config, dtype)


def _per_device(batch: Mapping[str, tf.Tensor],
                num_local_devices: int) -> Mapping[str, tf.Tensor]:
  """[B, ...] -> [local_devices, B / local_devices, ...] for every entry."""
  def split(x):
    shape = tf.shape(x)
    new_shape = tf.concat(
        [[num_local_devices, shape[0] // num_local_devices], shape[1:]], 0)
    return tf.reshape(x, new_shape)
  return {k: split(v) for k, v in batch.items()}


def train_dataset(config: Any, *, global_batch_size: int, seed: int,
                  dtype: tf.DType = tf.float32,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None,
                  num_local_devices: Optional[int] = None) -> tf.data.Dataset:
  """This host's endless stream of training batches.

  Args:
    config: the `dataset` section of the experiment config.
    global_batch_size: examples per step over all hosts.
    seed: file order, shuffling and augmentation all follow it. Give each
      host (and each restart) its own.
    dtype: of the images; bfloat16 halves the host-to-device transfer.
    process_index, process_count, num_local_devices: this host's place in
      the job; `jax`'s values when None.

  Returns:
    A dataset of {"images": [L, B, S, S, 3] dtype, "labels": [L, B] int32}
    with L local devices and B examples per device.
  """
  process_index, process_count, num_local_devices = _host_layout(
      process_index, process_count, num_local_devices)
  per_host, _ = _layout(global_batch_size, process_count, num_local_devices)
  split = tfds.split_for_jax_process(
      config.train_split, process_index=process_index,
      process_count=process_count, drop_remainder=True)
  ds = _load(config, split, shuffle_files=True, seed=seed)
  ds = ds.repeat()
  ds = ds.shuffle(config.shuffle_buffer_size, seed=seed)
  # One stateless seed pair per example, independent of its content.
  seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
  ds = tf.data.Dataset.zip((ds, seeds))

  def preprocess(example, example_seed):
    return {"images": preprocess_train(example["image"], example_seed, config,
                                       dtype),
            "labels": tf.cast(example["label"], tf.int32)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(per_host, drop_remainder=True)
  ds = ds.map(lambda b: _per_device(b, num_local_devices))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


def num_eval_batches(num_examples: int, global_batch_size: int,
                     process_count: int, num_local_devices: int) -> int:
  """Batches every host yields for a split of `num_examples`.

  `tfds.split_for_jax_process` gives each host ceil or floor of
  num_examples / process_count examples; the largest share sets the count.
  """
  per_host, _ = _layout(global_batch_size, process_count, num_local_devices)
  return math.ceil(math.ceil(num_examples / process_count) / per_host)


def eval_dataset(config: Any, *, global_batch_size: int,
                 dtype: tf.DType = tf.float32,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_local_devices: Optional[int] = None) -> tf.data.Dataset:
  """This host's share of `config.eval_split`, once, padded to equal length.

  Returns:
    A dataset of {"images": [L, B, S, S, 3] dtype, "labels": [L, B] int32,
    "mask": [L, B] float32}; `mask` is 1 for real examples and 0 for padding.
    Every host yields `num_eval_batches(...)` batches.
  """
  process_index, process_count, num_local_devices = _host_layout(
      process_index, process_count, num_local_devices)
  per_host, _ = _layout(global_batch_size, process_count, num_local_devices)
  num_examples = int(_load(config, config.eval_split).cardinality())
  if num_examples < 0:
    raise ValueError(f"The size of split {config.eval_split!r} of "
                     f"{config.name} is unknown.")
  num_batches = num_eval_batches(num_examples, global_batch_size,
                                 process_count, num_local_devices)
  split = tfds.split_for_jax_process(
      config.eval_split, process_index=process_index,
      process_count=process_count, drop_remainder=False)
  ds = _load(config, split)
  host_examples = int(ds.cardinality())
  if host_examples > num_batches * per_host:
    raise ValueError(
        f"Host {process_index} has {host_examples} examples of "
        f"{config.eval_split!r}, more than the {num_batches} batches of "
        f"{per_host} planned for every host.")
  logging.info("Evaluating on %d of %d examples of %s on host %d: %d "
               "batches of %d.", host_examples, num_examples,
               config.eval_split, process_index, num_batches, per_host)

  def preprocess(example):
    return {"images": preprocess_eval(example["image"], config, dtype),
            "labels": tf.cast(example["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      "images": tf.zeros([config.image_size, config.image_size, 3], dtype),
      "labels": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0, tf.float32),
  }).repeat()
  ds = ds.concatenate(padding).take(num_batches * per_host)
  ds = ds.batch(per_host, drop_remainder=True)
  ds = ds.map(lambda b: _per_device(b, num_local_devices))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


def as_numpy(ds: tf.data.Dataset) -> Iterable[Batch]:
  """The batches as numpy arrays; iterate it again for another pass."""
  return tfds.as_numpy(ds)


def tf_dtype(bf16: bool) -> tf.DType:
  """The image dtype the experiment asks for."""
  return tf.bfloat16 if bf16 else tf.float32
