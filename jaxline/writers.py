"""TensorBoard event files and a metrics file, written without TensorFlow.

`TensorBoardLogger` writes events through `event_file` (tensorboardX's
record writer and protos, which never import TensorFlow) and appends one
JSON line per scalar write to `metrics.jsonl` beside the events, for
`python -m jaxline.plot` and for anything that reads JSON.

`step` writes from the training thread and periodic actions from background
threads, so every write is queued on one worker thread: callers never wait for
a device-to-host copy or for the disk, and writes keep their order.

Every run imports this module; tensorboardX and PIL load only when a
`TensorBoardLogger` is built (issue 12: start-up cost).
"""

import concurrent.futures
import itertools
import json
import os
import threading
import time
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

_MAX_IMAGES = 3
METRICS_FILE = "metrics.jsonl"
_FILE_COUNTER = itertools.count()
_none_keys_warned = set()
_none_lock = threading.Lock()


def writable_scalars(scalars: Mapping[str, Any]) -> Mapping[str, Any]:
  """The scalars a writer can write: `None` values left out, strings refused.

  0.0.8-era experiments (kfac-jax's among them) return statistics that are
  `None` on some steps; they are skipped, with one warning per key, rather
  than failing the run at the end of training. A string is a mistake that
  no writer can plot, so it is an error that names the key.
  """
  if not any(v is None or isinstance(v, (str, bytes))
             for v in scalars.values()):
    return scalars
  kept = {}
  for key, value in scalars.items():
    if isinstance(value, (str, bytes)):
      raise TypeError(
          f"Scalar {key!r} is the string {value!r:.80}; writers take numbers. "
          "Return a number, or log text with absl logging.")
    if value is None:
      with _none_lock:
        first = key not in _none_keys_warned
        _none_keys_warned.add(key)
      if first:
        logging.warning("Scalar %r is None; it is skipped by every writer "
                        "(warned once per key).", key)
      continue
    kept[key] = value
  return kept


def _scalar_shape_ok(value: Any) -> bool:
  shape = getattr(value, "shape", ())
  return int(np.prod(shape)) == 1


def _to_uint8(key: str, value: Any) -> np.ndarray:
  images = np.asarray(value)
  if images.ndim == 2:
    images = images[None, :, :, None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"Image {key!r} has shape {images.shape}; write [B, H, W, C] with C "
        "in {1, 3, 4}, or [H, W].")
  images = images[:_MAX_IMAGES]
  if images.dtype != np.uint8:
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    images = np.round(images * 255.0).astype(np.uint8)
  else:
    # Encoded later, in the writer thread: never keep a view of the caller's
    # array, which it may overwrite in the meantime.
    images = images.copy()
  return images


def _own_scalar(value: Any) -> Any:
  """Copies mutable numpy values, since they are read in the writer thread."""
  if isinstance(value, np.ndarray):
    return value.copy()
  return value


class TensorBoardLogger:
  """Writes scalars and images under `<config.checkpoint_dir>/<mode>`.

  Scalars also go to `<checkpoint_dir>/<mode>/metrics.jsonl`, one
  `{"step": ..., "wall_time": ..., "<key>": <number>, ...}` object per call,
  with the same steps and values as the event file and flushed with it.
  """

  def __init__(self, config, mode: str):
    checkpoint_dir = config.get("checkpoint_dir", "") if hasattr(
        config, "get") else getattr(config, "checkpoint_dir", "")
    if not checkpoint_dir:
      raise ValueError(
          "TensorBoardLogger needs config.checkpoint_dir, the directory to "
          "write event files under; set it, or use platform.create_writer, "
          "which writes nothing when it is empty.")
    self._logdir = os.path.join(os.path.expanduser(checkpoint_dir), mode)
    os.makedirs(self._logdir, exist_ok=True)
    # Imported here, not at the top: tensorboardX and PIL cost start-up
    # time that runs without a TensorBoard writer need not pay (issue 12).
    from jaxline import event_file  # pylint: disable=g-import-not-at-top
    # TensorBoard's own naming, events.out.tfevents.<time>.<host>.<pid>.<n>:
    # two writers in one directory (a resumed run in the same second, hosts
    # with log_all_hosts) never open the same file.
    self._events = event_file.EventFile(
        self._logdir, filename_suffix=f".{os.getpid()}.{next(_FILE_COUNTER)}")
    self._metrics = open(os.path.join(self._logdir, METRICS_FILE), "a",
                         encoding="utf-8")
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="tensorboard")
    self._lock = threading.Lock()
    self._pending = []
    self._closed = False

  @property
  def logdir(self) -> str:
    return self._logdir

  @property
  def metrics_path(self) -> str:
    return self._metrics.name

  def _submit(self, fn, *args) -> None:
    with self._lock:
      if self._closed:
        raise RuntimeError(f"Writer for {self._logdir} is closed.")
      self._pending = [f for f in self._pending if not f.done()]
      self._pending.append(self._executor.submit(fn, *args))

  def write_scalars(self, global_step: int, scalars: Mapping[str, Any]):
    """Writes one scalar series per key; the key is the tag."""
    scalars = writable_scalars(scalars)
    for key, value in scalars.items():
      if not _scalar_shape_ok(value):
        raise ValueError(
            f"Scalar {key!r} has shape {np.shape(value)}; write_scalars takes "
            "scalars or size-1 arrays. Reduce it (e.g. with .mean()) first.")
    step = int(global_step)
    items = {k: _own_scalar(v) for k, v in scalars.items()}

    def write():
      wall_time = time.time()
      numbers = {}
      for k, v in items.items():
        try:
          numbers[str(k)] = float(np.asarray(v).reshape(()))
        except (TypeError, ValueError) as e:
          raise TypeError(f"Scalar {k!r} is {type(v).__name__} ({v!r:.80}), "
                          "not a number; write_scalars takes numbers.") from e
      self._events.write_scalars(step, wall_time, numbers)
      record = {"step": step, "wall_time": wall_time}
      record.update(numbers)
      self._metrics.write(json.dumps(record) + "\n")

    self._submit(write)

  def write_images(self, global_step: int, images: Mapping[str, Any]):
    """Writes up to 3 images per key; floats in [0, 1] are scaled to uint8."""
    step = int(global_step)
    converted = {k: _to_uint8(k, v) for k, v in images.items()}
    self._submit(lambda: self._events.write_images(step, time.time(),
                                                    converted))

  def flush(self) -> None:
    """Blocks until every queued write is on disk; re-raises its error."""
    with self._lock:
      pending, self._pending = self._pending, []
    errors = [f.exception() for f in pending]
    self._events.flush()
    self._metrics.flush()
    for error in errors:
      if error is not None:
        raise error

  def close(self) -> None:
    if self._closed:
      return
    try:
      self.flush()
    finally:
      self._closed = True
      self._executor.shutdown(wait=True)
      self._events.close()
      self._metrics.close()


class NullWriter:
  """A writer that writes nothing, used when no checkpoint_dir is set."""

  def write_scalars(self, global_step: int, scalars: Mapping[str, Any]):
    del global_step
    writable_scalars(scalars)  # The same errors as a real writer.

  def write_images(self, global_step: int, images: Mapping[str, Any]):
    del global_step, images

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class MultiWriter:
  """Sends every write to several writers: TensorBoard plus W&B, say.

  A writer needs only `write_scalars`; `write_images`, `flush` and `close`
  are passed on to those that have them. Pass it from a writer factory:

      def writer_factory(config, mode):
        return writers.MultiWriter(platform.create_writer(config, mode),
                                   MyWandbWriter(mode))
  """

  def __init__(self, *writers_: Any):
    if len(writers_) == 1 and isinstance(writers_[0], (list, tuple)):
      writers_ = tuple(writers_[0])
    for writer in writers_:
      if not callable(getattr(writer, "write_scalars", None)):
        raise TypeError(f"{writer!r} has no write_scalars method; every "
                        "writer given to MultiWriter needs one.")
    self.writers: Sequence[Any] = tuple(writers_)

  def write_scalars(self, global_step: int, scalars: Mapping[str, Any]):
    scalars = writable_scalars(scalars)
    for writer in self.writers:
      writer.write_scalars(global_step, scalars)

  def write_images(self, global_step: int, images: Mapping[str, Any]):
    for writer in self.writers:
      write_images = getattr(writer, "write_images", None)
      if callable(write_images):
        write_images(global_step, images)

  def _each(self, method: str) -> None:
    """Calls `method` on every writer that has it; raises the first error."""
    first_error = None
    for writer in self.writers:
      fn = getattr(writer, method, None)
      if not callable(fn):
        continue
      try:
        fn()
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or e
    if first_error is not None:
      raise first_error

  def flush(self) -> None:
    self._each("flush")

  def close(self) -> None:
    self._each("close")


def flush_writer(writer: Any, *, raise_errors: bool = False) -> None:
  """Flushes any writer that can be flushed; others are left alone.

  On an error path the flush must not hide the original exception, so its
  own failure is only logged unless `raise_errors`.
  """
  flush = getattr(writer, "flush", None)
  if not callable(flush):
    return
  try:
    flush()
  except Exception:  # pylint: disable=broad-except
    if raise_errors:
      raise
    logging.exception("Flushing the writer failed.")
