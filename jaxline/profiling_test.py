"""Tests for `jaxline.profiling.ProfileSteps` with a recording profiler.

A real trace of real steps is taken in tests/observability_test.py.
"""

import pytest

from jaxline import profiling


@pytest.fixture
def calls(monkeypatch):
  record = []
  monkeypatch.setattr(profiling.jax.profiler, "start_trace",
                      lambda logdir, **kw: record.append(("start", logdir)))
  monkeypatch.setattr(profiling.jax.profiler, "stop_trace",
                      lambda: record.append(("stop",)))
  return record


def _run(action, first_step, last_step):
  action.update_time(0.0, first_step)
  for step in range(first_step + 1, last_step + 1):
    action(0.0, step, {})
    yield step


def test_traces_the_asked_steps(calls):
  action = profiling.ProfileSteps(start_step=3, num_steps=2, logdir="/p")
  for step in _run(action, 0, 10):
    if step == 3:
      assert calls == [("start", "/p")]  # After 3 steps: index 3 is next.
    if step == 4:
      assert calls == [("start", "/p")]
  action.wait_to_finish()
  assert calls == [("start", "/p"), ("stop",)]


def test_start_step_zero_includes_the_first_step(calls):
  action = profiling.ProfileSteps(start_step=0, num_steps=1, logdir="/p")
  action.update_time(0.0, 0)
  assert calls == [("start", "/p")]
  action(0.0, 1, {})
  assert calls == [("start", "/p"), ("stop",)]


def test_a_run_resumed_past_the_start_is_not_traced(calls):
  action = profiling.ProfileSteps(start_step=2, num_steps=2, logdir="/p")
  list(_run(action, 5, 9))
  action.wait_to_finish()
  assert calls == []


def test_training_that_ends_early_still_stops_the_trace(calls):
  action = profiling.ProfileSteps(start_step=1, num_steps=100, logdir="/p")
  list(_run(action, 0, 4))
  action.wait_to_finish()
  assert calls == [("start", "/p"), ("stop",)]
