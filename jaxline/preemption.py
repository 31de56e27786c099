"""Stopping training cleanly on SIGTERM, SIGUSR1 or SIGINT.

Schedulers preempt jobs with SIGTERM (SLURM often with SIGUSR1 first) and a
grace period. The signal handler only sets a flag; `StopOnSignal`, the last
periodic action, turns it into a `Preempted` exception at the next step
boundary, where the state is consistent. `train` then saves "latest",
flushes the writer and returns, so the process exits 0 and a restart resumes
from that step.

In a job of several processes, all must save the same step, whichever of
them was signalled. JAX's preemption sync point does that: its notifier owns
SIGTERM, tells every process, and `reached_preemption_sync_point` returns
True on all of them at one agreed step. SIGUSR1 and SIGINT are passed on to
it as SIGTERM.
"""

import contextlib
import functools
import os
import signal
import threading
from typing import Callable, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
  """Raised at a step boundary after a preemption signal."""

  def __init__(self, step: int):
    super().__init__(f"Preempted at step {step}.")
    self.step = step


@functools.lru_cache(maxsize=None)
def _uses_sync_point() -> bool:
  """Whether JAX's preemption service runs (several processes, enabled).

  Probed once per process: JAX's sync protocol gives up for good when a
  notice finds every step counter still at the probe's -1.
  """
  if jax.process_count() <= 1:
    return False
  try:
    multihost_utils.reached_preemption_sync_point(-1)
  except RuntimeError:  # jax_enable_preemption_service is off.
    logging.warning("JAX's preemption service is off: a signalled process "
                    "stops alone, and its peers follow when it leaves.")
    return False
  return True


class StopOnSignal:
  """A periodic action that raises `Preempted` once `event` is set.

  With several processes it asks JAX's sync point at every step instead,
  which is True on every process at the same step.
  """

  def __init__(self, event: threading.Event):
    self._event = event
    self._sync = _uses_sync_point()

  def update_time(self, t: float, step: int) -> None:
    del t
    if self._sync:  # The starting step, so a notice in the first step counts.
      multihost_utils.reached_preemption_sync_point(step)

  def __call__(self, t: float, step: int, scalar_outputs) -> None:
    del t, scalar_outputs
    if self._sync:
      if multihost_utils.reached_preemption_sync_point(step):
        raise Preempted(step)
    elif self._event.is_set():
      raise Preempted(step)

  def wait_to_finish(self) -> None:
    pass


class _SignalWatcher:
  """Reports our signals from a thread, even while the main thread is stuck.

  Python runs a signal handler only when the main thread returns to the
  interpreter, which a step stuck inside XLA never does. The C-level handler
  still writes the signal number to the wakeup fd, which this thread reads.
  """

  def __init__(self, signals, on_signal: Callable[[str], None]):
    self._signals = {int(s) for s in signals}
    self._on_signal = on_signal
    self._read, self._write = os.pipe()
    os.set_blocking(self._write, False)
    self._previous = signal.set_wakeup_fd(self._write,
                                          warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="jaxline_signal_watcher")
    self._thread.start()

  def _run(self) -> None:
    while True:
      try:
        data = os.read(self._read, 64)
      except OSError:
        return
      if not data:  # The write end is closed: we are done.
        return
      for signum in data:
        if signum in self._signals:
          self._on_signal(signal.Signals(signum).name)

  def close(self) -> None:
    signal.set_wakeup_fd(self._previous)
    os.close(self._write)
    self._thread.join(timeout=5)
    os.close(self._read)


@contextlib.contextmanager
def catch_signals(
    event: threading.Event,
    *,
    on_signal: Optional[Callable[[str], None]] = None,
) -> Iterator[threading.Event]:
  """Sets `event` on SIGTERM/SIGUSR1/SIGINT while inside; main thread only.

  A second SIGINT falls through to the previous handler, so Ctrl-C twice
  still interrupts a run that is stuck before the next step boundary.
  `on_signal(name)` is called from a thread as the signal arrives, even if
  the main thread is stuck in native code (for a grace-period timer).
  """
  if threading.current_thread() is not threading.main_thread():
    yield event
    return
  forward = _uses_sync_point()
  # JAX's notifier handles SIGTERM itself when it runs: leave it in place.
  signals = [s for s in _SIGNALS if not (forward and s == signal.SIGTERM)]
  previous = {s: signal.getsignal(s) for s in signals}

  def handler(signum, frame):
    del frame
    if event.is_set() and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, previous[signal.SIGINT])
      signal.raise_signal(signal.SIGINT)
      return
    logging.warning("Received %s: stopping at the next step boundary%s.",
                    signal.Signals(signum).name,
                    ", with every process" if forward else "")
    event.set()
    if forward:
      os.kill(os.getpid(), signal.SIGTERM)

  for s in signals:
    signal.signal(s, handler)
  watcher = _SignalWatcher(signals, on_signal) if on_signal else None
  try:
    yield event
  finally:
    if watcher is not None:
      watcher.close()
    for s, h in previous.items():
      signal.signal(s, h)
