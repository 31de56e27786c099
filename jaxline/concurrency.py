"""Background threads: ordered async calls and prefetching generators.

They log failures through absl at call time and hand them back to the caller,
so an error in a background thread is never lost.
"""

import concurrent.futures
import functools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from absl import logging
import jax
import numpy as np

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def make_async(thread_name_prefix: str = "") -> Callable[[F], F]:
  """Runs the decorated callable in one background thread, in call order.

  Each `make_async(...)` call makes one single-worker executor shared by what
  it decorates, so calls never overlap. After a call fails, queued calls are
  skipped and every later call re-raises that error in the caller.
  """
  executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix=thread_name_prefix)
  error: list[BaseException] = []

  def decorator(fn: F) -> F:

    def run(*args, **kwargs):
      if error:
        return None  # Skipped: an earlier call failed.
      try:
        return fn(*args, **kwargs)
      except BaseException as e:  # pylint: disable=broad-except
        error.append(e)
        logging.exception("Error in async call %s.",
                          getattr(fn, "__name__", repr(fn)))
        raise

    @functools.wraps(fn)
    def submit(*args, **kwargs) -> concurrent.futures.Future:
      if error:
        raise error[0]
      return executor.submit(run, *args, **kwargs)

    return submit  # pytype: disable=bad-return-type

  return decorator


def py_prefetch(iterable_function: Callable[[], Iterable[T]],
                buffer_size: int = 5,
                *,
                thread_name: Optional[str] = None) -> Iterator[T]:
  """Iterates `iterable_function()` in a daemon thread, `buffer_size-1` ahead.

  The factory runs inside the producer thread so that slow set-up (opening
  files, building a dataset) overlaps with the caller's work too. A consumer
  that stops early (a `break`, or dropping the generator) stops the producer
  at its next item, and the buffered items are released, rather than leaving
  a thread blocked forever holding them.
  """
  if buffer_size <= 1:
    raise ValueError(f"buffer_size must be > 1 to prefetch, got {buffer_size}.")
  buffer: queue.Queue = queue.Queue(maxsize=buffer_size - 1)
  end = object()
  failure: list[BaseException] = []
  stop = threading.Event()

  def put(item) -> bool:
    # A timeout, so that a consumer gone away is noticed; a free slot still
    # wakes the put at once.
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def producer():
    try:
      for item in iterable_function():
        if not put(item) or stop.is_set():
          return
        del item  # Hold no reference while waiting for the next one.
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("Error in producer thread for %s",
                        thread_name or "py_prefetch")
      failure.append(e)
    finally:
      put(end)

  threading.Thread(target=producer, name=thread_name, daemon=True).start()
  try:
    while True:
      item = buffer.get()
      if item is end:
        break
      yield item
  finally:
    stop.set()
    _drain(buffer)
  if failure:
    raise failure[0]


def _drain(buffer: queue.Queue) -> None:
  while True:
    try:
      buffer.get_nowait()
    except queue.Empty:
      return


def place_ahead(ds: Iterable[Any],
                place: Callable[[Any], T],
                *,
                thread_name: str = "place_ahead",
                what: str = "place_ahead") -> Iterator[T]:
  """Yields `place(copy of item)` for each item of `ds`, one item ahead.

  The engine of `utils.double_buffer` and `sharding.double_buffer_global`.
  Before item i is yielded, item i+1 has been pulled from `ds` and handed to
  one background thread, which copies its numpy leaves and calls `place` on
  the copy (a host-to-device transfer), so that work runs while the caller
  computes on item i. `ds` itself is iterated in the caller's thread: wrap
  it in `py_prefetch` to move the host work off that thread too.

  Two things keep it correct:
  - The copy: a dataset may refill one numpy buffer for every item, and a
    CPU transfer may alias the buffer it is given. `ds` is not advanced
    until the previous item's copy is made; `place` may still be running.
  - Errors come at the item they belong to: an error raised by `ds`, or a
    None item (a `ValueError` naming `what`), comes after every earlier item
    has been yielded; an error in `place` comes instead of its item.

  The thread goes away when the generator ends or is closed.
  """
  executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix=thread_name)

  def work(item, copied: threading.Event):
    try:
      host = jax.tree.map(
          lambda x: np.array(x) if isinstance(x, np.ndarray) else x, item)
    finally:
      copied.set()  # Also on failure: the caller waits for this.
    del item
    return place(host)

  iterator = iter(ds)
  pending: Optional[concurrent.futures.Future] = None
  copied: Optional[threading.Event] = None
  error: Optional[BaseException] = None
  try:
    while True:
      if copied is not None:
        copied.wait()  # `ds` may overwrite the buffer the last item is in.
      try:
        item = next(iterator)
      except StopIteration:
        break
      except Exception as e:  # pylint: disable=broad-except
        error = e
        break
      if item is None:
        error = ValueError(
            f"{what} got a None item; the dataset must yield pytrees of "
            "arrays. Signal the end of the data by ending the iterator.")
        break
      copied = threading.Event()
      future = executor.submit(work, item, copied)
      del item
      if pending is not None:
        yield pending.result()
      pending = future
    if pending is not None:
      future, pending = pending, None
      yield future.result()
    if error is not None:
      raise error
  finally:
    executor.shutdown(wait=False, cancel_futures=True)
