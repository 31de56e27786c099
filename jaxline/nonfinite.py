"""Stopping a run whose scalars turned NaN or infinite, before it is saved.

`config.terminate_on_nan` (default True) turns it on. The guard never fetches
anything per step: it checks the host copies that the stdout, writer and save
actions fetch anyway, and the newest step's scalars once more before the
final or preemption save, which transfers the whole state regardless. A save
is refused once any check failed, so "latest" stays the last good state.
"""

import threading
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(FloatingPointError):
  """A training scalar was NaN or infinite."""

  def __init__(self, key: str, value: Any, step: int):
    self.key, self.value, self.step = key, value, step
    super().__init__(
        f"Training scalar {key!r} is {_show(value)} at global_step {step}: "
        "training stopped, and no checkpoint of this step or a later one was "
        "saved, so the newest 'latest' checkpoint is the last good state. "
        "Lower the learning rate or fix the loss. If the value is NaN by "
        "design (kfac-jax reports NaN for statistics it skipped), train on "
        "as jaxline 0.0.8 did, which never checked: set "
        "config.terminate_on_nan = False.")


def _show(value: Any) -> str:
  array = np.asarray(value)
  return str(array.item()) if array.size == 1 else str(array.tolist())


def first_non_finite(scalars: Mapping[str, Any]) -> Optional[Tuple[str, Any]]:
  """The first (key, value) holding a NaN or an infinity, from host values."""
  for key, value in scalars.items():
    try:
      array = np.asarray(value)
    except Exception:  # pylint: disable=broad-except  # Not array-like.
      continue
    # jnp's dtype test knows bfloat16 and the other ml_dtypes floats.
    if (jnp.issubdtype(array.dtype, jnp.inexact) and
        not np.isfinite(array.astype(np.complex128 if array.dtype.kind == "c"
                                     else np.float64)).all()):
      return key, value
  return None


class NonFiniteGuard:
  """A periodic action (called after every step) plus checks for the others.

  Background actions record here through `checked`; the loop's thread raises
  at its next step boundary, and a save raises first (`check`,
  `check_before_save`).
  """

  def __init__(self):
    self._error: Optional[NonFiniteError] = None
    self._lock = threading.Lock()
    self._last: Optional[Tuple[int, Mapping[str, Any]]] = None
    self._last_checked = -1

  def record(self, step: int, scalars: Mapping[str, Any]) -> bool:
    """Records the first non-finite value in host `scalars`; any thread.

    Returns whether the run is still good. Background actions only record:
    the error is raised once, in the loop's thread, so it is reported once.
    """
    found = first_non_finite(scalars)
    with self._lock:
      if found is not None and self._error is None:
        self._error = NonFiniteError(found[0], found[1], step)
      if self._error is None:
        self._last_checked = max(self._last_checked, step)
      return self._error is None

  def check(self, step: int, scalars: Mapping[str, Any]) -> None:
    """`record`, then raises if the run has gone bad; the loop's thread."""
    if not self.record(step, scalars):
      raise self._error

  def checked(self, fn: Callable[[int, Any], Any]) -> Callable[[int, Any],
                                                                 Any]:
    """Wraps an action's function: it runs, then its scalars are checked.

    The value is still printed or written first, so the log shows it.
    """
    def run_then_check(step: int, scalars: Mapping[str, Any]) -> Any:
      result = fn(step, scalars)
      self.record(step, scalars)
      return result
    run_then_check.__name__ = getattr(fn, "__name__", "action")
    return run_then_check

  def check_before_save(self) -> None:
    """Raises if a check failed, or if the newest step's scalars are bad."""
    with self._lock:
      error, last = self._error, self._last
    if error is not None:
      raise error
    if last is not None and last[0] > self._last_checked:
      step, scalars = last
      self.check(step, jax.device_get(dict(scalars)))

  # The periodic-action protocol.
  def update_time(self, t: float, step: int) -> None:
    del t, step

  def __call__(self, t: float, step: int, scalar_outputs: Any) -> None:
    del t
    if self._error is not None:
      raise self._error
    self._last = (step, scalar_outputs)

  def wait_to_finish(self) -> None:
    pass
