"""Tests for `jaxline.watchdog`, with the exit replaced by a recorder.

The real exits (status 4, stacks, flushed writer) are tested in
tests/observability_test.py, where a subprocess really hangs.
"""

import threading
import time

import pytest

from jaxline import watchdog


def _recording_watchdog(timeout):
  fired = []
  done = threading.Event()

  def on_timeout(message):
    fired.append(message)
    done.set()

  return watchdog.StepWatchdog(timeout, on_timeout=on_timeout), fired, done


def test_fires_when_steps_stop_ending():
  dog, fired, done = _recording_watchdog(0.2)
  dog.update_time(0.0, 0)
  dog(0.0, 1, {})
  dog(0.0, 2, {})
  assert done.wait(5)
  assert fired == [
      "Training hung: no step ended for 0.2 s after global_step 2 "
      "(config.step_timeout_secs). The step that received global_step 2 "
      "never finished."]


def test_first_step_is_exempt():
  dog, fired, done = _recording_watchdog(0.1)
  dog.update_time(0.0, 0)
  assert not done.wait(0.5)  # No step has ended: compiling, not hung.
  dog.wait_to_finish()
  assert not fired


def test_steady_steps_and_the_end_of_the_loop_disarm_it():
  dog, fired, done = _recording_watchdog(0.3)
  dog.update_time(0.0, 0)
  for step in range(1, 8):
    dog(0.0, step, {})
    time.sleep(0.05)
  dog.wait_to_finish()
  assert not done.wait(0.8)
  assert not fired


def test_all_stacks_names_every_thread():
  started = threading.Event()
  release = threading.Event()

  def parked_here():
    started.set()
    release.wait()

  thread = threading.Thread(target=parked_here, name="parked")
  thread.start()
  started.wait()
  try:
    stacks = watchdog.all_stacks()
  finally:
    release.set()
    thread.join()
  assert "Thread 'MainThread'" in stacks
  assert "Thread 'parked'" in stacks and "parked_here" in stacks


@pytest.fixture
def exits(monkeypatch):
  """The messages `exit_hung` would have exited with."""
  messages = []
  monkeypatch.setattr(watchdog, "exit_hung",
                      lambda message, writer=None: messages.append(message))
  return messages


def test_signal_grace_cancelled_in_time_does_nothing(exits):
  grace = watchdog.SignalGrace(0.2, step=lambda: 3)
  grace.start("SIGTERM")
  grace.cancel()
  time.sleep(0.5)
  assert not exits


def test_signal_grace_expires(exits):
  grace = watchdog.SignalGrace(0.1, step=lambda: 3)
  grace.start("SIGUSR1")
  grace.start("SIGTERM")  # A second signal does not start a second timer.
  time.sleep(0.6)
  assert len(exits) == 1
  assert exits[0].startswith("Received SIGUSR1, but the running step (after "
                             "global_step 3) did not end within 0.1 s")


def test_signal_grace_of_none_never_expires(exits):
  grace = watchdog.SignalGrace(None)
  grace.start("SIGTERM")
  time.sleep(0.2)
  assert not exits
