"""Ending a hung run with a diagnosis instead of letting it hang.

`config.step_timeout_secs` arms `StepWatchdog`: when no training step ends
within that many seconds (the first step, which compiles, is exempt), it logs
every thread's Python stack, flushes the writer and exits the process. After
a preemption signal, `SignalGrace` gives the current step
`config.preemption_grace_secs` to reach its boundary (where the save
happens) and otherwise exits the same way. Both run in their own threads, so
they work while the main thread is stuck inside XLA.
"""

import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

from absl import logging

# The exit status of a process ended by either watchdog.
EXIT_CODE_HUNG = 4
_FLUSH_TIMEOUT_SECS = 10.0


def all_stacks() -> str:
  """Every thread's Python stack, named, as one text."""
  names = {thread.ident: thread.name for thread in threading.enumerate()}
  parts = []
  for ident, frame in sys._current_frames().items():  # pylint: disable=protected-access
    stack = "".join(traceback.format_stack(frame))
    parts.append(f"Thread {names.get(ident, ident)!r}:\n{stack}")
  return "\n".join(parts)


def _flush_with_timeout(writer: Any) -> None:
  """Flushes `writer` unless that itself hangs."""
  flush = getattr(writer, "flush", None)
  if not callable(flush):
    return
  thread = threading.Thread(target=flush, name="jaxline_final_flush",
                            daemon=True)
  thread.start()
  thread.join(_FLUSH_TIMEOUT_SECS)


def exit_hung(message: str, writer: Any = None) -> None:
  """Logs `message` and the stacks, flushes, and ends the process."""
  logging.error("%s\nStacks of all threads:\n%s", message, all_stacks())
  _flush_with_timeout(writer)
  logging.error("%s Exiting with status %d.", message, EXIT_CODE_HUNG)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_CODE_HUNG)  # pylint: disable=protected-access


class StepWatchdog:
  """A periodic action that exits when steps stop ending.

  The time between two step ends includes the periodic actions that ran
  between them, such as a synchronous checkpoint save, so the timeout should
  cover the slowest of those too.
  """

  def __init__(self, timeout_secs: float, *, writer: Any = None,
               on_timeout: Optional[Callable[[str], None]] = None):
    self._timeout = float(timeout_secs)
    self._writer = writer
    self._on_timeout = on_timeout or (lambda m: exit_hung(m, self._writer))
    self._last_end: Optional[float] = None  # Monotonic; None until armed.
    self._step = 0
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def update_time(self, t: float, step: int) -> None:
    del t
    self._step = step
    if self._thread is None:
      self._thread = threading.Thread(target=self._watch, daemon=True,
                                      name="jaxline_step_watchdog")
      self._thread.start()

  def __call__(self, t: float, step: int, scalar_outputs: Any) -> None:
    del t, scalar_outputs
    self._step = step
    self._last_end = time.monotonic()

  def wait_to_finish(self) -> None:
    """Disarms it: the loop has ended, normally or not."""
    self._stop.set()

  def _watch(self) -> None:
    poll = min(1.0, self._timeout / 4)
    while not self._stop.wait(poll):
      last = self._last_end
      if last is None or time.monotonic() - last < self._timeout:
        continue
      if self._stop.is_set():
        return
      self._on_timeout(
          f"Training hung: no step ended for {self._timeout:g} s after "
          f"global_step {self._step} (config.step_timeout_secs). The step "
          f"that received global_step {self._step} never finished.")
      return


class SignalGrace:
  """Exits if a signalled run does not reach a step boundary in time.

  `start()` is called from the signal handler; `cancel()` once the loop
  has stopped at a boundary, before the save.
  """

  def __init__(self, grace_secs: Optional[float], *, writer: Any = None,
               step: Callable[[], Any] = lambda: "?"):
    self._grace = grace_secs
    self._writer = writer
    self._step = step
    self._done = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def start(self, signal_name: str) -> None:
    if self._grace is None or self._thread is not None:
      return
    self._thread = threading.Thread(target=self._wait, args=(signal_name,),
                                    name="jaxline_signal_grace", daemon=True)
    self._thread.start()

  def cancel(self) -> None:
    self._done.set()

  def _wait(self, signal_name: str) -> None:
    if self._done.wait(self._grace):
      return
    exit_hung(f"Received {signal_name}, but the running step (after "
              f"global_step {self._step()}) did not end within "
              f"{self._grace:g} s (config.preemption_grace_secs), so no "
              "checkpoint could be saved; the newest one on disk stays.",
              self._writer)
