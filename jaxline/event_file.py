"""One TensorBoard event file, written with tensorboardX's record writer.

Events go through tensorboardX's record writer and protos, which never
import TensorFlow (TensorBoard's own writer reaches for it whenever it is
installed, costing seconds and half a gigabyte per process). Images are
encoded with PIL.

This is apart from `writers` so that importing jaxline imports neither
tensorboardX nor PIL (issue 12): `writers.TensorBoardLogger` imports this
module when it is built, and a run without a `checkpoint_dir` never is.
"""

import io
import os
from typing import Mapping

import numpy as np
from PIL import Image
from tensorboardX import event_file_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.proto import tensor_pb2
from tensorboardX.proto import tensor_shape_pb2
from tensorboardX.proto import types_pb2


def _png(image: np.ndarray) -> bytes:
  if image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _image_value(key: str, images: np.ndarray) -> summary_pb2.Summary.Value:
  """One summary holding up to 3 images, as TensorBoard's image plugin reads.

  tensorboardX's own image summary tiles a batch into one picture; this
  keeps the images apart, as TensorBoard's `image` summary does.
  """
  height, width = images.shape[1:3]
  strings = [str(width).encode(), str(height).encode()]
  strings += [_png(image) for image in images]
  tensor = tensor_pb2.TensorProto(
      dtype=types_pb2.DT_STRING,
      string_val=strings,
      tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(strings))]))
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"))
  return summary_pb2.Summary.Value(tag=key, tensor=tensor, metadata=metadata)


class EventFile:
  """`<logdir>/events.out.tfevents.<time>.<host><filename_suffix>`.

  Not thread-safe: `writers.TensorBoardLogger` writes from its one worker
  thread.
  """

  def __init__(self, logdir: str, filename_suffix: str):
    self._writer = event_file_writer.EventsWriter(
        os.path.join(logdir, "events"), filename_suffix=filename_suffix)

  def _write(self, step: int, wall_time: float, values) -> None:
    event = event_pb2.Event(step=step, wall_time=wall_time,
                            summary=summary_pb2.Summary(value=values))
    self._writer.write_event(event)

  def write_scalars(self, step: int, wall_time: float,
                    numbers: Mapping[str, float]) -> None:
    """One event with a simple value per key; the key is the tag."""
    self._write(step, wall_time,
                [summary_pb2.Summary.Value(tag=k, simple_value=v)
                 for k, v in numbers.items()])

  def write_images(self, step: int, wall_time: float,
                   images: Mapping[str, np.ndarray]) -> None:
    """One event with a summary of [B, H, W, C] uint8 images per key."""
    self._write(step, wall_time,
                [_image_value(k, v) for k, v in images.items()])

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
