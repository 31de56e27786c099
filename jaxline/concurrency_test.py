"""Tests for jaxline.concurrency (`utils.make_async`, `utils.py_prefetch`).

Background work in the harness (async logging, prefetching) must keep call
order, never overlap, and never lose an error: a failure in a thread has to
reach the caller, after whatever was already produced.
"""

import threading
import time
import traceback
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from jaxline import concurrency
from jaxline import utils

_WAIT_SECS = 30  # Generous: only reached if something is broken.


class MakeAsyncTest(parameterized.TestCase):

  def test_reexported_by_utils(self):
    self.assertIs(utils.make_async, concurrency.make_async)
    self.assertIs(utils.py_prefetch, concurrency.py_prefetch)

  def test_returns_a_future_at_once(self):
    release = threading.Event()

    @concurrency.make_async()
    def blocked(x):
      self.assertTrue(release.wait(_WAIT_SECS))
      return x * 2

    future = blocked(21)
    self.assertFalse(future.done())
    release.set()
    self.assertEqual(future.result(timeout=_WAIT_SECS), 42)

  def test_calls_run_in_submission_order(self):
    seen = []

    @concurrency.make_async()
    def record(i):
      seen.append(i)
      return i

    futures = [record(i) for i in range(50)]
    self.assertEqual([f.result(timeout=_WAIT_SECS) for f in futures],
                     list(range(50)))
    self.assertEqual(seen, list(range(50)))

  def test_runs_in_a_named_background_thread(self):

    @concurrency.make_async("my_prefix")
    def where():
      return threading.current_thread()

    thread = where().result(timeout=_WAIT_SECS)
    self.assertIsNot(thread, threading.current_thread())
    self.assertTrue(thread.name.startswith("my_prefix"), thread.name)

  def test_one_executor_per_make_async_call(self):
    # Everything one decorator decorates shares a single worker, so calls
    # never overlap, even across functions.
    decorator = concurrency.make_async("shared")
    active = []
    overlaps = []
    lock = threading.Lock()
    order = []

    def body(name, i):
      with lock:
        active.append(name)
        if len(active) > 1:
          overlaps.append(list(active))
      time.sleep(0.001)
      order.append((name, i))
      with lock:
        active.remove(name)

    first = decorator(lambda i: body("first", i))
    second = decorator(lambda i: body("second", i))
    futures = []
    for i in range(10):
      futures.append(first(i))
      futures.append(second(i))
    for future in futures:
      future.result(timeout=_WAIT_SECS)
    self.assertEqual(overlaps, [])
    self.assertEqual(order, [(name, i) for i in range(10)
                             for name in ("first", "second")])

  def test_separate_make_async_calls_do_not_share_a_worker(self):
    # If both decorators shared a worker, `waiter` would block `setter`
    # forever and the wait below would time out.
    event = threading.Event()

    @concurrency.make_async("a")
    def waiter():
      return event.wait(_WAIT_SECS)

    @concurrency.make_async("b")
    def setter():
      event.set()

    waited = waiter()
    setter().result(timeout=_WAIT_SECS)
    self.assertTrue(waited.result(timeout=_WAIT_SECS))

  def test_decorates_bound_methods(self):

    class Logger:

      def __init__(self):
        self.lines = []

      @concurrency.make_async("logger")
      def log(self, line):
        self.lines.append(line)
        return len(self.lines)

    logger = Logger()
    futures = [logger.log(f"line {i}") for i in range(5)]
    self.assertEqual([f.result(timeout=_WAIT_SECS) for f in futures],
                     [1, 2, 3, 4, 5])
    self.assertEqual(logger.lines, [f"line {i}" for i in range(5)])

  def test_keeps_the_wrapped_name(self):

    @concurrency.make_async()
    def write_summaries():
      pass

    self.assertEqual(write_summaries.__name__, "write_summaries")

  def test_error_skips_queued_calls_and_reraises_later(self):
    release = threading.Event()
    ran = []

    @concurrency.make_async("failing")
    def step(i):
      if i == 0:
        self.assertTrue(release.wait(_WAIT_SECS))
        raise ValueError("step 0 failed")
      ran.append(i)

    with mock.patch.object(utils.logging, "exception") as log_exception:
      failed = step(0)
      queued = step(1)  # Submitted before the failure happened.
      release.set()
      error = failed.exception(timeout=_WAIT_SECS)
      self.assertIsInstance(error, ValueError)
      self.assertIsNone(queued.result(timeout=_WAIT_SECS))
      log_exception.assert_called_once()
      # Every later call re-raises the same error in the caller, with the
      # original traceback, and does not run.
      # (assertRaises would drop the traceback, so catch by hand.)
      for i in (2, 3):
        try:
          step(i)
        except ValueError as e:
          self.assertIs(e, error)
          frames = [frame.name for frame in
                    traceback.extract_tb(e.__traceback__)]
          self.assertIn("step", frames)
        else:
          self.fail("a call after the failure did not raise")
    self.assertEqual(ran, [])

  def test_error_is_shared_by_everything_one_decorator_wraps(self):
    decorator = concurrency.make_async("shared_error")
    ran = []

    @decorator
    def fail():
      raise RuntimeError("boom")

    @decorator
    def other():
      ran.append(True)

    with mock.patch.object(utils.logging, "exception"):
      with self.assertRaisesRegex(RuntimeError, "boom"):
        fail().result(timeout=_WAIT_SECS)
      with self.assertRaisesRegex(RuntimeError, "boom"):
        other()
    self.assertEqual(ran, [])

  def test_error_does_not_leak_to_other_decorators(self):

    @concurrency.make_async()
    def fail():
      raise RuntimeError("boom")

    @concurrency.make_async()
    def fine():
      return "ok"

    with mock.patch.object(utils.logging, "exception"):
      with self.assertRaises(RuntimeError):
        fail().result(timeout=_WAIT_SECS)
    self.assertEqual(fine().result(timeout=_WAIT_SECS), "ok")


class PyPrefetchTest(parameterized.TestCase):

  @parameterized.parameters(1, 0, -3)
  def test_buffer_size_of_one_or_less_raises(self, buffer_size):
    factory = mock.Mock(return_value=iter(range(3)))
    with self.assertRaises(ValueError):
      next(iter(concurrency.py_prefetch(factory, buffer_size)))
    factory.assert_not_called()

  @parameterized.parameters(2, 5, 100)
  def test_yields_every_item_in_order(self, buffer_size):
    items = list(concurrency.py_prefetch(lambda: iter(range(37)),
                                         buffer_size=buffer_size))
    self.assertEqual(items, list(range(37)))

  def test_empty_iterable(self):
    self.assertEqual(list(concurrency.py_prefetch(lambda: [])), [])

  def test_factory_runs_in_a_daemon_producer_thread(self):
    threads = []

    def factory():
      threads.append(threading.current_thread())
      return iter([1, 2])

    items = list(concurrency.py_prefetch(factory, thread_name="my_loader"))
    self.assertEqual(items, [1, 2])
    self.assertLen(threads, 1)
    self.assertIsNot(threads[0], threading.current_thread())
    self.assertTrue(threads[0].daemon)
    self.assertEqual(threads[0].name, "my_loader")

  def test_factory_is_not_called_before_iteration(self):
    factory = mock.Mock(return_value=iter([1]))
    generator = concurrency.py_prefetch(factory)
    factory.assert_not_called()
    self.assertEqual(list(generator), [1])
    factory.assert_called_once_with()

  def test_producer_stays_at_most_buffer_size_ahead(self):
    # With buffer_size=3 the queue holds 2 items; while the consumer holds
    # item 0 the producer has also made items 1, 2 (queued) and 3 (waiting to
    # be queued), and nothing more.
    produced = []
    reached = threading.Event()

    def source():
      for i in range(100):
        produced.append(i)
        if len(produced) == 4:
          reached.set()
        yield i

    generator = concurrency.py_prefetch(source, buffer_size=3)
    self.assertEqual(next(generator), 0)
    self.assertTrue(reached.wait(_WAIT_SECS))
    time.sleep(0.2)  # Give an unbounded producer the chance to run ahead.
    self.assertLen(produced, 4)
    self.assertEqual(list(generator), list(range(1, 100)))

  def test_producer_error_comes_after_the_produced_items(self):
    error = IOError("disk gone")

    def source():
      yield "a"
      yield "b"
      raise error

    received = []
    with mock.patch.object(utils.logging, "exception") as log_exception:
      with self.assertRaises(IOError) as cm:
        for item in concurrency.py_prefetch(source, buffer_size=4):
          received.append(item)
    self.assertEqual(received, ["a", "b"])
    self.assertIs(cm.exception, error)
    log_exception.assert_called_once()

  def test_consumer_stopping_early_stops_the_producer(self):
    # Otherwise the producer blocks forever on a full buffer, holding its
    # items (device arrays, say).
    closed = threading.Event()
    produced = []

    def source():
      try:
        for i in range(1000):
          produced.append(i)
          yield i
      finally:
        closed.set()

    generator = concurrency.py_prefetch(source, buffer_size=2,
                                        thread_name="stops_early")
    self.assertEqual(next(generator), 0)
    generator.close()
    self.assertTrue(closed.wait(_WAIT_SECS))
    for thread in threading.enumerate():
      if thread.name == "stops_early":
        thread.join(_WAIT_SECS)
        self.assertFalse(thread.is_alive())
    self.assertLess(len(produced), 10)

  def test_factory_error_is_delivered(self):

    def factory():
      raise FileNotFoundError("no data")

    with mock.patch.object(utils.logging, "exception") as log_exception:
      with self.assertRaisesRegex(FileNotFoundError, "no data"):
        list(concurrency.py_prefetch(factory))
    log_exception.assert_called_once()


if __name__ == "__main__":
  absltest.main()
