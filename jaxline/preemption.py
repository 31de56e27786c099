"""Stopping training cleanly on SIGTERM or SIGINT.

Schedulers preempt jobs with SIGTERM and a grace period. The signal handler
only sets a flag; `StopOnSignal`, the last periodic action, turns it into a
`Preempted` exception at the next step boundary, where the state is
consistent. `train` then saves "latest", flushes the writer and returns, so
the process exits 0 and a restart resumes from that step.
"""

import contextlib
import signal
import threading
from typing import Iterator

from absl import logging

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Raised at a step boundary after a preemption signal."""

  def __init__(self, step: int):
    super().__init__(f"Preempted at step {step}.")
    self.step = step


class StopOnSignal:
  """A periodic action that raises `Preempted` once `event` is set."""

  def __init__(self, event: threading.Event):
    self._event = event

  def update_time(self, t: float, step: int) -> None:
    del t, step

  def __call__(self, t: float, step: int, scalar_outputs) -> None:
    del t, scalar_outputs
    if self._event.is_set():
      raise Preempted(step)

  def wait_to_finish(self) -> None:
    pass


@contextlib.contextmanager
def catch_signals(event: threading.Event) -> Iterator[threading.Event]:
  """Sets `event` on SIGTERM/SIGINT while inside; main thread only.

  A second SIGINT falls through to the previous handler, so Ctrl-C twice
  still interrupts a run that is stuck before the next step boundary.
  """
  if threading.current_thread() is not threading.main_thread():
    yield event
    return
  previous = {s: signal.getsignal(s) for s in _SIGNALS}

  def handler(signum, frame):
    if event.is_set() and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, previous[signal.SIGINT])
      signal.raise_signal(signal.SIGINT)
      return
    del frame
    logging.warning("Received %s: stopping at the next step boundary.",
                    signal.Signals(signum).name)
    event.set()

  for s in _SIGNALS:
    signal.signal(s, handler)
  try:
    yield event
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
