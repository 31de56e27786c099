"""`PeriodicAction`: run a function every N steps or seconds.

The training loop calls every action after every step, so the path that
does not fire is a few comparisons; the log is fetched from the device only
when the action fires, and in a background thread when `run_async`.
"""

import decimal
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax

from jaxline import concurrency

_MIN_ELAPSED_SECS = 1e-6


def _exact(value: float) -> decimal.Decimal:
  return decimal.Decimal(repr(float(value))) if not isinstance(
      value, int) else decimal.Decimal(value)


def growth_hit(step: int, ratios: Sequence[float]) -> bool:
  """Whether `step` equals round_half_even(r * 10**e) for some ratio r.

  `e` is the number of digits of `step` minus one. Everything is exact
  integer/decimal arithmetic on the host, with no JAX op per step.
  """
  exponent = len(str(max(1, step))) - 1
  scale = decimal.Decimal(10) ** exponent
  for ratio in ratios:
    target = (_exact(ratio) * scale).to_integral_value(
        rounding=decimal.ROUND_HALF_EVEN)
    if target == step:
      return True
  return False


class StopTraining(Exception):
  """Raised by a periodic action to end training at this step, with a save.

  For early stopping: training saves "latest" and returns normally, as on
  preemption. From an async action it takes effect when the action next
  fires, so raise it from one with `run_async=False`.
  """


class PeriodicAction:
  """Calls `fn(step, scalars)` when a step or time interval has passed."""

  def __init__(self,
               fn: Callable[[int, Dict[str, Any]], None],
               interval_type: str,
               interval: Optional[float],
               start_time: float = 0.0,
               start_step: int = 0,
               run_async: bool = True,
               log_all_data: bool = False,
               logging_growth_ratios: Optional[Sequence[float]] = None,
               end_step_to_action: Optional[int] = None):
    if interval_type not in ("secs", "steps"):
      raise ValueError(f"Unrecognized interval type: {interval_type!r}; use "
                       "'secs' or 'steps'.")
    if logging_growth_ratios and interval_type != "steps":
      raise ValueError("logging_growth_ratios need interval_type='steps', got "
                       f"{interval_type!r}.")
    self._fn = fn
    self._interval_type = interval_type
    self._interval = interval
    self._growth_ratios = logging_growth_ratios
    self._end_step = end_step_to_action
    self._prev_time = start_time
    self._prev_step = start_step
    self.log_all_data = log_all_data
    self.log: Dict[int, Any] = {}
    self._last_future = None
    self._next_growth = self._next_growth_after(start_step)
    if run_async:
      name = getattr(fn, "__name__", None) or type(fn).__name__
      self._apply_fn = concurrency.make_async(name)(self._apply)
    else:
      self._apply_fn = self._apply

  def _next_growth_after(self, step: int) -> Optional[int]:
    """The first growth step > `step`, searched decade by decade."""
    if not self._growth_ratios:
      return None
    exponent = len(str(max(1, step))) - 1
    while exponent < 40:
      scale = decimal.Decimal(10) ** exponent
      hits = sorted(
          int((_exact(r) * scale).to_integral_value(
              rounding=decimal.ROUND_HALF_EVEN)) for r in self._growth_ratios)
      for hit in hits:
        if hit > step and len(str(max(1, hit))) - 1 == exponent:
          return hit
      exponent += 1
    return None

  def update_time(self, t: float, step: int) -> None:
    self._prev_time = t
    self._prev_step = step
    if self._growth_ratios:
      self._next_growth = self._next_growth_after(step - 1)

  def _should_trigger(self, t: float, step: int) -> bool:
    if self._end_step and step == self._end_step:
      return True
    if self._interval is not None:
      if self._interval_type == "secs":
        if t - self._prev_time >= self._interval:
          return True
      elif step % self._interval == 0:
        return True
    if self._next_growth is not None and step >= self._next_growth:
      if step == self._next_growth:
        return True
      self._next_growth = self._next_growth_after(step - 1)
      return step == self._next_growth
    return False

  def _on_trigger(self, t: float, step: int) -> None:
    """Runs in the loop's thread when the action fires; for subclasses."""

  def _apply(self, log: Mapping[int, Any], step: int,
             steps_per_sec: float) -> None:
    host_log = jax.device_get(log)
    host_log[step] = dict(host_log[step])
    host_log[step]["steps_per_sec"] = steps_per_sec
    for logged_step, scalars in host_log.items():
      self._fn(logged_step, scalars)

  def __call__(self, t: float, step: int,
               scalar_outputs: Mapping[str, Any]) -> None:
    if self._should_trigger(t, step):
      self._on_trigger(t, step)
      elapsed = max(t - self._prev_time, _MIN_ELAPSED_SECS)
      steps_per_sec = (step - self._prev_step) / elapsed
      log, self.log = self.log, {}
      log[step] = scalar_outputs
      self._last_future = self._apply_fn(log, step, steps_per_sec)
      self.update_time(t, step)
    elif self.log_all_data:
      self.log[step] = scalar_outputs

  def wait_to_finish(self) -> None:
    if self._last_future is not None:
      self._last_future.result()

