"""Background threads: ordered async calls and a prefetching generator.

Both log failures through absl at call time and hand them back to the caller,
so an error in a background thread is never lost.
"""

import concurrent.futures
import functools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from absl import logging

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
  files, building a dataset) overlaps with the caller's work too.
  """
  if buffer_size <= 1:
    raise ValueError(f"buffer_size must be > 1 to prefetch, got {buffer_size}.")
  buffer: queue.Queue = queue.Queue(maxsize=buffer_size - 1)
  end = object()
  failure: list[BaseException] = []

  def producer():
    try:
      for item in iterable_function():
        buffer.put(item)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("Error in producer thread for %s",
                        thread_name or "py_prefetch")
      failure.append(e)
    finally:
      buffer.put(end)

  threading.Thread(target=producer, name=thread_name, daemon=True).start()
  while True:
    item = buffer.get()
    if item is end:
      break
    yield item
  if failure:
    raise failure[0]
