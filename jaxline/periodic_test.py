"""Tests for jaxline.periodic (`utils.PeriodicAction`).

The training loop calls every action after every step, so the trigger rules
decide which steps users see logged and checkpointed; they must match 0.0.8
(growth ratios included) while the fixed corner cases no longer crash.
"""

import functools
import threading
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from jaxline import periodic
from jaxline import utils

_WAIT_SECS = 30  # Generous: only reached if something is broken.


class _Recorder:
  """Records every call of the action's function, and the thread it ran in."""

  def __init__(self):
    self.calls = []
    self.threads = []

  def __call__(self, step, scalars):
    self.calls.append((step, scalars))
    self.threads.append(threading.current_thread())

  @property
  def steps(self):
    return [step for step, _ in self.calls]


def _triggered_steps(steps, **kwargs):
  """The steps at which an action fires when called at each of `steps`."""
  recorder = _Recorder()
  kwargs.setdefault("run_async", False)
  action = periodic.PeriodicAction(recorder, **kwargs)
  for step in steps:
    action(t=float(step), step=step, scalar_outputs={"x": step})
  return recorder.steps


class TriggerTest(parameterized.TestCase):

  def test_secs_interval(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "secs", 10, run_async=False)
    for t, step in [(5.0, 1), (9.99, 2), (10.0, 3), (15.0, 4), (19.9, 5),
                    (20.0, 6), (35.0, 7)]:
      action(t, step, {"step": step})
    self.assertEqual(recorder.steps, [3, 6, 7])

  def test_secs_interval_counts_from_start_time(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "secs", 10, start_time=100.0,
                                     run_async=False)
    action(105.0, 1, {})
    action(109.0, 2, {})
    action(110.0, 3, {})
    self.assertEqual(recorder.steps, [3])

  def test_steps_interval(self):
    self.assertEqual(
        _triggered_steps(range(1, 13), interval_type="steps", interval=4),
        [4, 8, 12])

  def test_steps_interval_uses_absolute_step_after_restore(self):
    # A restored run at step 7 still logs at multiples of the interval.
    self.assertEqual(
        _triggered_steps(range(8, 16), interval_type="steps", interval=5,
                         start_step=7),
        [10, 15])

  def test_update_time_resets_the_reference(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "secs", 10, run_async=False)
    action.update_time(100.0, 50)
    action(105.0, 51, {})
    self.assertEqual(recorder.steps, [])
    action(110.0, 60, {})
    self.assertEqual(recorder.steps, [60])
    # steps_per_sec is measured from the reset point: 10 steps in 10 s.
    self.assertEqual(recorder.calls[0][1]["steps_per_sec"], 1.0)

  @parameterized.parameters("secs", "steps")
  def test_interval_none_never_fires_by_interval(self, interval_type):
    steps = list(range(1, 50)) + [1000, 10**6]
    self.assertEqual(
        _triggered_steps(steps, interval_type=interval_type, interval=None),
        [])

  @parameterized.parameters("secs", "steps")
  def test_interval_none_still_fires_at_the_end_step(self, interval_type):
    self.assertEqual(
        _triggered_steps(range(1, 30), interval_type=interval_type,
                         interval=None, end_step_to_action=17),
        [17])

  def test_end_step_to_action_1010(self):
    self.assertEqual(
        _triggered_steps(range(1, 1101), interval_type="steps", interval=200,
                         end_step_to_action=1010),
        [200, 400, 600, 800, 1000, 1010])

  def test_end_step_zero_is_ignored(self):
    # 0.0.8 tested truthiness, so training_steps=0 adds no trigger.
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "secs", 1000, run_async=False,
                                     end_step_to_action=0)
    for step in range(0, 3):
      action(0.5, step, {})
    self.assertEqual(recorder.steps, [])

  def test_end_step_with_secs(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "secs", 1000, run_async=False,
                                     end_step_to_action=3)
    for step in range(1, 6):
      action(0.5, step, {})
    self.assertEqual(recorder.steps, [3])


class GrowthRatioTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("one_two_five", [1, 2, 5]),
      ("with_ten", [1, 2, 5, 10]),
      ("floats", [1.0, 2.0, 5.0]),
  )
  def test_decades(self, ratios):
    expected = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    self.assertEqual(
        _triggered_steps(range(1, 2001), interval_type="steps", interval=None,
                         logging_growth_ratios=ratios),
        expected)

  def test_combined_with_an_interval(self):
    triggered = _triggered_steps(range(1, 1001), interval_type="steps",
                                 interval=250, logging_growth_ratios=[1, 2, 5])
    self.assertEqual(triggered,
                     [1, 2, 5, 10, 20, 50, 100, 200, 250, 500, 750, 1000])

  def test_nothing_near_400000_but_400000(self):
    # 0.0.8 computed the targets in float32 on device; the hit set must
    # stay exact far from the origin.
    steps = range(395_001, 405_001)
    self.assertEqual(
        _triggered_steps(steps, interval_type="steps", interval=5000,
                         logging_growth_ratios=[1, 2, 3, 4, 5],
                         start_step=395_000),
        [400_000, 405_000])

  def test_rounding_is_half_to_even(self):
    # 1.5 -> 2, 15, 150; 2.5 -> 2 (half to even), 25, 250.
    self.assertEqual(
        _triggered_steps(range(1, 301), interval_type="steps", interval=None,
                         logging_growth_ratios=[1.5]),
        [2, 15, 150])
    self.assertEqual(
        _triggered_steps(range(1, 301), interval_type="steps", interval=None,
                         logging_growth_ratios=[2.5]),
        [2, 25, 250])

  def test_growth_hit(self):
    self.assertTrue(periodic.growth_hit(1, [1, 2, 5]))
    self.assertTrue(periodic.growth_hit(500, [1, 2, 5]))
    self.assertTrue(periodic.growth_hit(400_000, [1, 2, 3, 4, 5]))
    self.assertFalse(periodic.growth_hit(399_999, [1, 2, 3, 4, 5]))
    self.assertFalse(periodic.growth_hit(400_001, [1, 2, 3, 4, 5]))
    self.assertFalse(periodic.growth_hit(3, [1, 2, 5]))
    self.assertTrue(periodic.growth_hit(10**12, [1]))
    self.assertFalse(periodic.growth_hit(0, [1, 2, 5]))

  @parameterized.parameters(
      ([1, 2, 5],), ([1.5, 2.5, 9.99],), ([0.5, 10],), ([1, 2, 3, 4, 5],),
      ([9.5],), ([3.3333],))
  def test_actions_fire_exactly_at_growth_hits(self, ratios):
    steps = range(1, 3001)
    expected = [s for s in steps if periodic.growth_hit(s, ratios)]
    self.assertEqual(
        _triggered_steps(steps, interval_type="steps", interval=None,
                         logging_growth_ratios=ratios),
        expected)

  def test_skipped_steps_only_fire_on_exact_hits(self):
    # With several steps per call (steps_per_run), a hit is only a step that
    # equals a growth target, as in 0.0.8.
    self.assertEqual(
        _triggered_steps(range(3, 700, 3), interval_type="steps",
                         interval=None, logging_growth_ratios=[1, 2, 5]),
        [])
    self.assertEqual(
        _triggered_steps(range(0, 2001, 50), interval_type="steps",
                         interval=None, logging_growth_ratios=[1, 2, 5]),
        [50, 100, 200, 500, 1000, 2000])

  def test_update_time_after_restore_keeps_later_hits(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", None, run_async=False,
                                     logging_growth_ratios=[1, 2, 5])
    action.update_time(0.0, 150)
    for step in range(151, 1001):
      action(float(step), step, {})
    self.assertEqual(recorder.steps, [200, 500, 1000])

  def test_growth_with_secs_raises_value_error(self):
    with self.assertRaises(ValueError):
      periodic.PeriodicAction(lambda s, x: None, "secs", 10,
                              logging_growth_ratios=[1, 2, 5])


class ConstructionTest(parameterized.TestCase):

  @parameterized.parameters("epochs", None, "", "SECS")
  def test_invalid_interval_type(self, interval_type):
    with self.assertRaisesRegex(ValueError, "Unrecognized interval type"):
      periodic.PeriodicAction(lambda s, x: None, interval_type, 10)

  def test_public_attributes(self):
    action = periodic.PeriodicAction(lambda s, x: None, "steps", 10,
                                     log_all_data=True)
    self.assertTrue(action.log_all_data)
    self.assertEqual(action.log, {})
    self.assertIs(utils.PeriodicAction, periodic.PeriodicAction)

  def test_positional_signature(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", 2, 0.0, 0, False,
                                     False, None, None)
    action(1.0, 2, {"a": 1})
    self.assertEqual(recorder.steps, [2])


class ApplyTest(parameterized.TestCase):

  def test_steps_per_sec(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "secs", 10, run_async=False)
    action(10.0, 5, {"loss": 1.0})
    action(30.0, 25, {"loss": 0.5})
    self.assertEqual(recorder.calls[0], (5, {"loss": 1.0,
                                             "steps_per_sec": 0.5}))
    self.assertEqual(recorder.calls[1], (25, {"loss": 0.5,
                                              "steps_per_sec": 1.0}))

  def test_steps_per_sec_never_divides_by_zero(self):
    # F11: two triggers with the same timestamp.
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", 1, run_async=False)
    action(7.0, 1, {})
    action(7.0, 2, {})
    action(7.0, 2, {})
    self.assertLen(recorder.calls, 3)
    second = recorder.calls[1][1]["steps_per_sec"]
    self.assertTrue(np.isfinite(second))
    self.assertGreater(second, 0)
    self.assertEqual(recorder.calls[2][1]["steps_per_sec"], 0)

  def test_scalars_come_to_the_host_and_the_input_is_not_mutated(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", 1, run_async=False)
    outputs = {"loss": jnp.float32(2.0), "acc": jnp.ones((2,))}
    action(1.0, 1, outputs)
    self.assertNotIn("steps_per_sec", outputs)
    self.assertIsInstance(outputs["loss"], jnp.ndarray)
    _, scalars = recorder.calls[0]
    self.assertIsNot(scalars, outputs)
    self.assertIsInstance(scalars["loss"], (np.ndarray, np.generic))
    self.assertIsInstance(scalars["acc"], np.ndarray)
    self.assertEqual(float(scalars["loss"]), 2.0)

  def test_log_all_data_accumulates_between_triggers(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", 3, run_async=False,
                                     log_all_data=True)
    for step in range(1, 7):
      action(float(step), step, {"v": step * 10})
      if step == 2:
        self.assertEqual(sorted(action.log), [1, 2])
    self.assertEqual(action.log, {})
    self.assertEqual(recorder.steps, [1, 2, 3, 4, 5, 6])
    for step, scalars in recorder.calls:
      self.assertEqual(scalars["v"], step * 10)
      # Only the triggering step gets the rate.
      self.assertEqual("steps_per_sec" in scalars, step % 3 == 0)

  def test_without_log_all_data_only_trigger_steps_are_logged(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", 3, run_async=False)
    for step in range(1, 7):
      action(float(step), step, {"v": step})
      self.assertEqual(action.log, {})
    self.assertEqual(recorder.steps, [3, 6])

  def test_sync_runs_in_the_calling_thread_and_raises_there(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", 1, run_async=False)
    action(1.0, 1, {})
    self.assertIs(recorder.threads[0], threading.current_thread())

    def fail(step, scalars):
      raise RuntimeError(f"bad step {step}")

    failing = periodic.PeriodicAction(fail, "steps", 1, run_async=False)
    with self.assertRaisesRegex(RuntimeError, "bad step 1"):
      failing(1.0, 1, {})


class AsyncTest(parameterized.TestCase):

  def test_runs_in_a_thread_named_after_fn(self):

    def log_to_stdout(step, scalars):
      recorder(step, scalars)

    recorder = _Recorder()
    action = periodic.PeriodicAction(log_to_stdout, "steps", 1)
    action(1.0, 1, {"a": 1})
    action.wait_to_finish()
    self.assertEqual(recorder.steps, [1])
    self.assertIsNot(recorder.threads[0], threading.current_thread())
    self.assertTrue(recorder.threads[0].name.startswith("log_to_stdout"),
                    recorder.threads[0].name)

  @parameterized.named_parameters(
      ("partial", lambda rec: functools.partial(rec.__call__)),
      ("callable_object", lambda rec: rec),
      ("partial_of_partial",
       lambda rec: functools.partial(functools.partial(rec.__call__))),
  )
  def test_fn_without_name(self, make_fn):
    # F17: 0.0.8 read fn.__name__ for the thread name and crashed.
    recorder = _Recorder()
    fn = make_fn(recorder)
    self.assertFalse(hasattr(fn, "__name__"))
    action = periodic.PeriodicAction(fn, "steps", 2)
    for step in range(1, 7):
      action(float(step), step, {"s": step})
    action.wait_to_finish()
    self.assertEqual(recorder.steps, [2, 4, 6])

  def test_calls_run_in_order(self):
    recorder = _Recorder()
    action = periodic.PeriodicAction(recorder, "steps", 1, log_all_data=True)
    for step in range(1, 15):
      action(float(step), step, {"s": step})
    action.wait_to_finish()
    self.assertEqual(recorder.steps, list(range(1, 15)))

  def test_log_is_detached_before_the_hand_off(self):
    # The background thread must see exactly the steps up to its trigger,
    # even while the caller keeps logging into `action.log`. The copy to the
    # host is held back until the caller has logged more steps.
    recorder = _Recorder()
    release = threading.Event()
    real_device_get = periodic.jax.device_get
    first_call = []
    caller = threading.current_thread()

    def held_device_get(tree):
      # Only a copy made in the background thread is held back: one made in
      # the caller's thread is a valid way to detach the log.
      if threading.current_thread() is not caller and not first_call:
        first_call.append(True)
        self.assertTrue(release.wait(_WAIT_SECS))
      return real_device_get(tree)

    action = periodic.PeriodicAction(recorder, "steps", 3, log_all_data=True)
    with mock.patch.object(periodic.jax, "device_get", held_device_get):
      for step in range(1, 6):
        action(float(step), step, {"s": step})
      self.assertEqual(sorted(action.log), [4, 5])
      release.set()
      action(6.0, 6, {"s": 6})
      action.wait_to_finish()
    self.assertEqual(recorder.steps, [1, 2, 3, 4, 5, 6])
    for step, scalars in recorder.calls:
      self.assertEqual(scalars["s"], step)

  def test_wait_to_finish_reraises_fn_errors(self):

    def broken(step, scalars):
      raise KeyError(f"missing {step}")

    action = periodic.PeriodicAction(broken, "steps", 1)
    with mock.patch.object(utils.logging, "exception") as log_exception:
      action(1.0, 1, {})
      with self.assertRaisesRegex(KeyError, "missing 1"):
        action.wait_to_finish()
      log_exception.assert_called()
      # Later triggers re-raise it in the caller, without running fn again.
      with self.assertRaisesRegex(KeyError, "missing 1"):
        action(2.0, 2, {})

  def test_wait_to_finish_without_a_trigger(self):
    action = periodic.PeriodicAction(_Recorder(), "steps", 100)
    action(1.0, 1, {})
    action.wait_to_finish()

  def test_wait_to_finish_waits_for_the_last_call(self):
    release = threading.Event()
    done = []

    def slow(step, scalars):
      self.assertTrue(release.wait(_WAIT_SECS))
      done.append(step)

    action = periodic.PeriodicAction(slow, "steps", 1)
    action(1.0, 1, {})
    action(2.0, 2, {})
    self.assertEqual(done, [])
    release.set()
    action.wait_to_finish()
    self.assertEqual(done, [1, 2])


if __name__ == "__main__":
  absltest.main()
