"""The progress line: `global_step: N, {scalars} [N/T (p%), r steps/s, ETA]`.

The rate leaves out the first step, which includes compilation, and is taken
over the last few log intervals, so the ETA follows the run's current speed.
All of it is host arithmetic on the times the loop already records: the line
adds no device call and no transfer to the training loop.
"""

import collections
import datetime
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from jaxline import periodic
from jaxline import writers

# Log intervals the rate is averaged over.
RATE_WINDOW = 5
_DIGITS = 6  # Significant digits of every number on the line.


def format_number(value: Any) -> str:
  """A scalar or array as short text: at most `_DIGITS` significant digits."""
  array = np.asarray(value)
  if array.ndim > 0:
    return "[" + ", ".join(format_number(v) for v in array.tolist()) + "]"
  item = array.item() if array.dtype != object else value
  if isinstance(item, bool):
    return str(item)
  if isinstance(item, int):
    return str(item)
  if isinstance(item, float):
    text = f"{item:.{_DIGITS}g}"
    return text + ".0" if text.lstrip("-").isdigit() else text
  if isinstance(item, complex):
    return f"{item:.{_DIGITS}g}"
  return repr(item)


def format_scalars(scalars: Mapping[str, Any]) -> str:
  """`{'loss': 0.123457}`: a dict's look, with short numbers."""
  items = [f"{key!r}: {format_number(value)}" for key, value in
           writers.writable_scalars(scalars).items()
           if key != "steps_per_sec"]
  return "{" + ", ".join(items) + "}"


def progress_suffix(step: int, training_steps: Optional[int],
                    rate: Optional[float]) -> str:
  """` [120/1000 (12.0%), 45.2 steps/s, ETA 0:00:19]`, or what is known."""
  parts = []
  if training_steps:
    parts.append(f"{step}/{training_steps} "
                 f"({100.0 * step / training_steps:.1f}%)")
  if rate is not None and rate > 0 and math.isfinite(rate):
    parts.append(f"{rate:.4g} steps/s")
    if training_steps:
      left = max(training_steps - step, 0) / rate
      parts.append(f"ETA {datetime.timedelta(seconds=round(left))}")
  return f" [{', '.join(parts)}]" if parts else ""


class ProgressLogger(periodic.PeriodicAction):
  """The stdout action: 0.0.8's `global_step: N, {...}` line, then progress.

  `steps_per_sec` is not printed in the dict: the line's own rate replaces
  it, measured from the end of the first step.
  """

  def __init__(self, *, training_steps: Optional[int], interval_type: str,
               interval: Optional[float], run_async: bool = True,
               logging_growth_ratios: Optional[Sequence[float]] = None,
               fn_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]] = (
                   lambda fn: fn)):
    super().__init__(fn_wrapper(self._emit), interval_type, interval,
                     run_async=run_async,
                     logging_growth_ratios=logging_growth_ratios)
    self._training_steps = training_steps
    # (time, step) at the end of the first step, then at each trigger.
    self._marks = collections.deque(maxlen=RATE_WINDOW + 1)
    self._suffixes = {}

  def __call__(self, t: float, step: int,
               scalar_outputs: Mapping[str, Any]) -> None:
    if not self._marks:  # The first step has ended: compilation is behind.
      self._marks.append((t, step))
    super().__call__(t, step, scalar_outputs)

  def _on_trigger(self, t: float, step: int) -> None:
    first_t, first_step = self._marks[0]
    rate = None
    if step > first_step and t > first_t:
      rate = (step - first_step) / (t - first_t)
    if step > self._marks[-1][1]:
      self._marks.append((t, step))
    self._suffixes[step] = progress_suffix(step, self._training_steps, rate)

  def _emit(self, step: int, scalars: Mapping[str, Any]) -> None:
    suffix = self._suffixes.pop(step, "")
    logging.info("global_step: %d, %s%s", step, format_scalars(scalars),
                 suffix)
