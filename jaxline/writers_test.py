"""Tests for `jaxline.writers.TensorBoardLogger` (contract §7).

Everything is read back from the event files with TensorBoard's own
`EventAccumulator`, and images are decoded with PIL.
"""

import io
import json
import logging as pylogging
import os
import threading

import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from jaxline import writers

_ALL = {
    event_accumulator.COMPRESSED_HISTOGRAMS: 0,
    event_accumulator.IMAGES: 0,
    event_accumulator.AUDIO: 0,
    event_accumulator.SCALARS: 0,
    event_accumulator.HISTOGRAMS: 0,
    event_accumulator.TENSORS: 0,
}


def _config(checkpoint_dir):
  config = config_dict.ConfigDict()
  config.checkpoint_dir = str(checkpoint_dir)
  return config


@pytest.fixture
def logger(tmp_path):
  writer = writers.TensorBoardLogger(_config(tmp_path), "train")
  yield writer
  writer.close()


def _read(directory):
  accumulator = event_accumulator.EventAccumulator(str(directory),
                                                   size_guidance=_ALL)
  accumulator.Reload()
  return accumulator


def _scalars(accumulator, tag):
  return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _images(accumulator, tag):
  """[(step, [decoded images as uint8 arrays])] for an image summary tag."""
  out = []
  if tag in accumulator.Tags()[event_accumulator.TENSORS]:
    for event in accumulator.Tensors(tag):
      strings = list(event.tensor_proto.string_val)
      width, height = int(strings[0]), int(strings[1])
      images = [np.asarray(Image.open(io.BytesIO(s))) for s in strings[2:]]
      for image in images:
        assert image.shape[:2] == (height, width)
      out.append((event.step, images))
  else:
    for event in accumulator.Images(tag):
      image = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
      out.append((event.step, [image]))
  return out


def _event_files(directory):
  return [f for f in os.listdir(directory) if "tfevents" in f]


# --- Construction ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval", "eval_test_average"])
def test_event_files_go_under_checkpoint_dir_mode(tmp_path, mode):
  writer = writers.TensorBoardLogger(_config(tmp_path), mode)
  writer.write_scalars(1, {"x": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == [mode]
  assert _event_files(tmp_path / mode)
  assert _scalars(_read(tmp_path / mode), "x") == [(1, 1.0)]


@pytest.mark.parametrize("value", [None, ""])
def test_missing_checkpoint_dir_raises_value_error_naming_key(value, tmp_path,
                                                             monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_dict.ConfigDict()
  if value is not None:
    config.checkpoint_dir = value
  with pytest.raises(ValueError, match="checkpoint_dir"):
    writers.TensorBoardLogger(config, "train")
  assert not list(tmp_path.iterdir())


def test_creates_missing_directories(tmp_path):
  root = tmp_path / "a" / "b"
  writer = writers.TensorBoardLogger(_config(root), "eval")
  writer.write_scalars(0, {"x": 2.0})
  writer.close()
  assert _scalars(_read(root / "eval"), "x") == [(0, 2.0)]


# --- write_scalars -------------------------------------------------------------


def test_scalars_of_every_kind(logger, tmp_path):
  values = {
      "py_float": 0.25,
      "py_int": 3,
      "py_bool": True,
      "np_float32": np.float32(1.5),
      "np_float64": np.float64(-2.5),
      "np_int32": np.int32(7),
      "np_0d": np.array(4.5),
      "np_size1": np.array([5.5], np.float32),
      "np_size1_2d": np.array([[6.5]]),
      "jax_scalar": jnp.float32(7.5),
      "jax_int": jnp.int32(9),
      "jax_size1": jnp.ones([1, 1, 1]) * 8.5,
  }
  logger.write_scalars(np.int64(10), values)
  logger.write_scalars(jnp.int32(20), {"py_float": 0.75})
  logger.flush()
  accumulator = _read(tmp_path / "train")
  assert set(accumulator.Tags()[event_accumulator.SCALARS]) == set(values)
  expected = {
      "py_float": [(10, 0.25), (20, 0.75)],
      "py_int": [(10, 3.0)],
      "py_bool": [(10, 1.0)],
      "np_float32": [(10, 1.5)],
      "np_float64": [(10, -2.5)],
      "np_int32": [(10, 7.0)],
      "np_0d": [(10, 4.5)],
      "np_size1": [(10, 5.5)],
      "np_size1_2d": [(10, 6.5)],
      "jax_scalar": [(10, 7.5)],
      "jax_int": [(10, 9.0)],
      "jax_size1": [(10, 8.5)],
  }
  for tag, points in expected.items():
    assert _scalars(accumulator, tag) == points, tag
  for event in accumulator.Scalars("py_float"):
    assert isinstance(event.step, int)


def test_scalar_tag_is_exactly_the_key(logger, tmp_path):
  logger.write_scalars(1, {"eval/top_1 acc": 0.5, "a.b": 1.0})
  logger.flush()
  tags = _read(tmp_path / "train").Tags()[event_accumulator.SCALARS]
  assert set(tags) == {"eval/top_1 acc", "a.b"}


@pytest.mark.parametrize("bad", [
    np.zeros([3]), np.zeros([2, 2]), jnp.zeros([4]), np.zeros([0])],
                         ids=["np[3]", "np[2,2]", "jax[4]", "np[0]"])
def test_non_scalar_raises_value_error_naming_key(logger, bad):
  with pytest.raises(ValueError, match="my_vector"):
    logger.write_scalars(1, {"fine": 1.0, "my_vector": bad})


def _keep_writer_busy(writer):
  """Queues slow work (PNG encoding of big images) on an async writer."""
  noise = np.random.default_rng(0).random([3, 512, 512, 3]).astype(np.float32)
  writer.write_images(0, {f"busy_{i}": noise for i in range(4)})


def test_scalar_values_are_taken_at_call_time(logger, tmp_path):
  """Writes may be async, but later mutation of the input must not leak."""
  _keep_writer_busy(logger)
  value = np.array([1.0])
  scalars = {"x": value, "y": np.float32(2.0)}
  logger.write_scalars(1, scalars)
  value[0] = 99.0
  scalars["y"] = 100.0
  logger.flush()
  accumulator = _read(tmp_path / "train")
  assert _scalars(accumulator, "x") == [(1, 1.0)]
  assert _scalars(accumulator, "y") == [(1, 2.0)]


def test_image_values_are_taken_at_call_time(logger, tmp_path):
  _keep_writer_busy(logger)
  images = np.zeros([1, 4, 4, 3], np.uint8)
  logger.write_images(1, {"img": images})
  images[...] = 200
  logger.flush()
  ((_, (image,)),) = _images(_read(tmp_path / "train"), "img")
  np.testing.assert_array_equal(image, np.zeros([4, 4, 3], np.uint8))


# --- write_images ------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_uint8_images_round_trip(logger, tmp_path, channels):
  rng = np.random.default_rng(channels)
  images = rng.integers(0, 256, size=[2, 5, 7, channels], dtype=np.uint8)
  logger.write_images(4, {"pics": images})
  logger.flush()
  ((step, decoded),) = _images(_read(tmp_path / "train"), "pics")
  assert step == 4
  assert len(decoded) == 2
  for got, want in zip(decoded, images):
    if channels == 1:
      want = want[..., 0]
    np.testing.assert_array_equal(got, want)


def test_float_images_are_scaled_to_uint8(logger, tmp_path):
  levels = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1) / 255.0
  rgb = np.concatenate([levels, levels[:, ::-1], np.ones_like(levels)], -1)
  logger.write_images(1, {"gray": levels, "rgb": jnp.asarray(rgb)})
  logger.flush()
  accumulator = _read(tmp_path / "train")
  ((_, (gray,)),) = _images(accumulator, "gray")
  ((_, (color,)),) = _images(accumulator, "rgb")
  expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
  np.testing.assert_array_equal(gray, expected)
  np.testing.assert_array_equal(color[..., 0], expected)
  np.testing.assert_array_equal(color[..., 1], expected[::-1])
  np.testing.assert_array_equal(color[..., 2], np.full([16, 16], 255))


def test_two_dimensional_image_is_one_grayscale_image(logger, tmp_path):
  image = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  logger.write_images(2, {"hw": image})
  logger.flush()
  ((step, decoded),) = _images(_read(tmp_path / "train"), "hw")
  assert step == 2
  assert len(decoded) == 1
  np.testing.assert_array_equal(decoded[0], image)


def test_at_most_three_images_are_kept(logger, tmp_path):
  images = np.stack([np.full([2, 3, 3], 10 * (i + 1), np.uint8)
                     for i in range(5)])
  logger.write_images(1, {"batch": images})
  logger.flush()
  ((_, decoded),) = _images(_read(tmp_path / "train"), "batch")
  assert len(decoded) == 3
  for i, image in enumerate(decoded):
    np.testing.assert_array_equal(image, images[i])


def test_several_image_keys_and_steps(logger, tmp_path):
  a = np.zeros([1, 2, 2, 3], np.uint8)
  b = np.full([1, 2, 2, 3], 255, np.uint8)
  logger.write_images(1, {"a": a, "b": b})
  logger.write_images(2, {"a": b})
  logger.flush()
  accumulator = _read(tmp_path / "train")
  got_a = _images(accumulator, "a")
  assert [s for s, _ in got_a] == [1, 2]
  np.testing.assert_array_equal(got_a[0][1][0], a[0])
  np.testing.assert_array_equal(got_a[1][1][0], b[0])
  assert [s for s, _ in _images(accumulator, "b")] == [1]


@pytest.mark.parametrize("shape", [[2, 4, 4, 2], [2, 4, 4, 5], [4], [2, 4, 4]])
def test_bad_image_shapes_raise_value_error(logger, shape):
  with pytest.raises(ValueError, match="bad_image"):
    logger.write_images(1, {"bad_image": np.zeros(shape, np.uint8)})


# --- Threads, flush and close ------------------------------------------------


def test_concurrent_writes_from_several_threads(logger, tmp_path):
  num_threads, per_thread = 8, 40
  barrier = threading.Barrier(num_threads)
  errors = []

  def work(t):
    try:
      barrier.wait()
      for i in range(per_thread):
        logger.write_scalars(i, {f"thread_{t}": float(t * 1000 + i),
                                 "shared": float(i)})
        if i % 10 == 0:
          logger.write_images(i, {f"img_{t}": np.full([1, 2, 2, 1], t,
                                                      np.uint8)})
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=work, args=(t,))
             for t in range(num_threads)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  logger.flush()
  accumulator = _read(tmp_path / "train")
  for t in range(num_threads):
    assert _scalars(accumulator, f"thread_{t}") == [
        (i, float(t * 1000 + i)) for i in range(per_thread)]
    images = _images(accumulator, f"img_{t}")
    assert [s for s, _ in images] == [0, 10, 20, 30]
    assert all((imgs[0] == t).all() for _, imgs in images)
  shared = _scalars(accumulator, "shared")
  assert len(shared) == num_threads * per_thread
  assert sorted(shared) == sorted(
      (i, float(i)) for i in range(per_thread) for _ in range(num_threads))


def test_flush_makes_writes_readable_before_close(tmp_path):
  writer = writers.TensorBoardLogger(_config(tmp_path), "train")
  try:
    for step in range(50):
      writer.write_scalars(step, {"loss": float(step) / 2})
    writer.flush()
    assert _scalars(_read(tmp_path / "train"), "loss") == [
        (s, s / 2) for s in range(50)]
    writer.write_scalars(50, {"loss": 25.0})
    writer.flush()
    assert len(_scalars(_read(tmp_path / "train"), "loss")) == 51
  finally:
    writer.close()


def test_close_writes_everything(tmp_path):
  writer = writers.TensorBoardLogger(_config(tmp_path), "train")
  for step in range(20):
    writer.write_scalars(step, {"loss": float(step)})
  writer.write_images(19, {"img": np.zeros([4, 4], np.uint8)})
  writer.close()
  accumulator = _read(tmp_path / "train")
  assert [s for s, _ in _scalars(accumulator, "loss")] == list(range(20))
  assert [s for s, _ in _images(accumulator, "img")] == [19]


def test_null_writer_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  writer = writers.NullWriter()
  writer.write_scalars(1, {"x": 1.0})
  writer.write_images(1, {"y": np.zeros([2, 2], np.uint8)})
  writer.flush()
  writer.close()
  assert not list(tmp_path.iterdir())


# --- metrics.jsonl -------------------------------------------------------------


def _metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_metrics_file_has_the_same_steps_and_values_as_the_events(tmp_path):
  writer = writers.TensorBoardLogger(_config(tmp_path), "eval_test")
  writer.write_scalars(np.int64(3), {"loss": np.float32(0.25), "n": 7})
  writer.write_scalars(5, {"loss": jnp.asarray([0.5]), "acc": True})
  writer.flush()  # Flushed together with the events: both readable now.
  rows = _metrics(tmp_path / "eval_test" / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(3, 0.25), (5, 0.5)]
  assert rows[0]["n"] == 7 and rows[1]["acc"] == 1.0
  assert list(rows[0]) == ["step", "wall_time", "loss", "n"]
  accumulator = _read(tmp_path / "eval_test")
  assert _scalars(accumulator, "loss") == [(3, 0.25), (5, 0.5)]
  # The event and the line of one write carry the same wall time.
  (event,) = [e for e in accumulator.Scalars("n")]
  assert event.wall_time == pytest.approx(rows[0]["wall_time"])
  writer.close()


def test_metrics_file_is_appended_to_by_a_resumed_run(tmp_path):
  for step in (1, 2):
    writer = writers.TensorBoardLogger(_config(tmp_path), "train")
    writer.write_scalars(step, {"loss": float(step)})
    writer.close()
  rows = _metrics(tmp_path / "train" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]


def test_non_finite_values_are_kept(tmp_path):
  writer = writers.TensorBoardLogger(_config(tmp_path), "train")
  writer.write_scalars(1, {"loss": np.nan, "x": -np.inf})
  writer.close()
  (row,) = _metrics(tmp_path / "train" / "metrics.jsonl")
  assert np.isnan(row["loss"]) and row["x"] == -np.inf


# --- MultiWriter ---------------------------------------------------------------


class _Recorder:

  def __init__(self):
    self.calls = []

  def write_scalars(self, global_step, scalars):
    self.calls.append(("scalars", global_step, dict(scalars)))

  def flush(self):
    self.calls.append(("flush",))


def test_multi_writer_sends_everything_to_every_writer(tmp_path):
  recorder = _Recorder()
  tensorboard = writers.TensorBoardLogger(_config(tmp_path), "train")
  multi = writers.MultiWriter(tensorboard, recorder)
  multi.write_scalars(2, {"loss": 1.5})
  multi.write_images(2, {"img": np.zeros([1, 2, 2, 1], np.uint8)})
  multi.flush()
  assert recorder.calls == [("scalars", 2, {"loss": 1.5}), ("flush",)]
  assert _scalars(_read(tmp_path / "train"), "loss") == [(2, 1.5)]
  multi.close()
  assert writers.MultiWriter([recorder]).writers == (recorder,)


def test_multi_writer_flushes_all_and_raises_the_first_error():
  class Broken(_Recorder):

    def flush(self):
      raise OSError("disk full")

  later = _Recorder()
  multi = writers.MultiWriter(Broken(), later)
  with pytest.raises(OSError, match="disk full"):
    multi.flush()
  assert later.calls == [("flush",)]


def test_multi_writer_rejects_a_writer_without_write_scalars():
  with pytest.raises(TypeError, match="has no write_scalars"):
    writers.MultiWriter(object())


# --- None and string values ----------------------------------------------------


@pytest.fixture
def fresh_none_warnings(monkeypatch):
  """Each test sees the first None of a key, as a new process would."""
  monkeypatch.setattr(writers, "_none_keys_warned", set())


def _none_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == pylogging.WARNING and "is None" in r.getMessage()]


def test_none_scalars_are_skipped_with_one_warning_per_key(
    tmp_path, caplog, fresh_none_warnings):
  """As kfac-jax's examples return statistics that are None on some steps."""
  del fresh_none_warnings
  writer = writers.TensorBoardLogger(_config(tmp_path), "train")
  with caplog.at_level(pylogging.WARNING):
    for step in range(3):
      writer.write_scalars(step, {"loss": float(step), "rho": None,
                                  "damping": None if step < 2 else 0.5})
    writer.close()
  warnings = _none_warnings(caplog)
  assert len(warnings) == 2
  assert any("'rho'" in w for w in warnings)
  assert any("'damping'" in w for w in warnings)
  accumulator = _read(tmp_path / "train")
  assert _scalars(accumulator, "loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]
  assert _scalars(accumulator, "damping") == [(2, 0.5)]
  assert "rho" not in accumulator.Tags()[event_accumulator.SCALARS]
  records = _metrics(tmp_path / "train" / writers.METRICS_FILE)
  assert ["rho" in r for r in records] == [False] * 3
  assert ["damping" in r for r in records] == [False, False, True]


@pytest.mark.parametrize("value", ["0.5", b"0.5"])
def test_string_scalar_is_an_error_naming_the_key(logger, value):
  with pytest.raises(TypeError, match="'lr_schedule'.*string"):
    logger.write_scalars(0, {"loss": 1.0, "lr_schedule": value})
  with pytest.raises(TypeError, match="'lr_schedule'"):
    writers.NullWriter().write_scalars(0, {"lr_schedule": value})


def test_non_number_object_is_an_error_naming_the_key(logger):
  logger.write_scalars(0, {"stats": object()})
  with pytest.raises(TypeError, match="'stats'.*not a number"):
    logger.flush()


def test_multi_writer_gives_every_writer_the_scalars_without_none(
    fresh_none_warnings):
  """A user's own writer (W&B, say) never sees the None values either."""
  del fresh_none_warnings
  seen = []

  class Recorder:

    def write_scalars(self, step, scalars):
      seen.append((step, dict(scalars)))

  writers.MultiWriter(Recorder(), Recorder()).write_scalars(
      4, {"loss": 1.0, "rho": None})
  assert seen == [(4, {"loss": 1.0})] * 2
