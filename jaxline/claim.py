"""One training job per checkpoint directory.

Two trainers writing one series corrupt each other's rotation and resume
from each other's steps. The chief of a training job therefore claims the
directory with a small JSON file, created atomically (`O_EXCL`), that names
the holder, and refreshes its modification time from a daemon thread. A
claim is stale, and is taken over, when its process is gone on this host
(SIGKILL, crash) or its heartbeat is older than `STALE_AFTER_SECS` (a lost
host). Eval jobs never claim: they only read.
"""

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Dict, Optional

from absl import logging

FILENAME = "trainer_claim.json"
HEARTBEAT_SECS = 5.0
STALE_AFTER_SECS = 60.0


class DirectoryInUseError(RuntimeError):
  """Another live trainer holds the checkpoint directory."""


def _start_time(pid: int) -> Optional[str]:
  """The kernel's start time of `pid`, which tells a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return None if fields[0] == "Z" else fields[19]  # A zombie is gone.


def _alive(holder: Dict[str, Any]) -> bool:
  """Whether the holder's process still runs (its own host only)."""
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  started = _start_time(pid)
  if os.path.isdir("/proc") and started is None:
    return False
  return holder.get("started") in (None, started)


_HELD: Dict[str, "Claim"] = {}  # Path -> this process's claim on it.
_HELD_LOCK = threading.Lock()


def acquire(directory: str) -> "Claim":
  """Claims `directory` for this process; `release` the result when done.

  Within one process claims nest (sequential `platform.main` calls, tests):
  a second acquire shares the first, and the last release frees it.
  """
  path = os.path.abspath(os.path.join(directory, FILENAME))
  with _HELD_LOCK:
    held = _HELD.get(path)
    if held is None:
      held = _HELD[path] = Claim(path)
    held.count += 1
    return held


class Claim:
  """Holds `<directory>/trainer_claim.json`; made by `acquire`."""

  def __init__(self, path: str):
    self.path = path
    self.count = 0
    self._stop = threading.Event()
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": _start_time(os.getpid()),
                    "since": datetime.datetime.now().isoformat(
                        timespec="seconds")}
    if not self._create():
      self._take_over_if_stale()
    threading.Thread(target=self._beat, name="jaxline_claim",
                     daemon=True).start()

  def _create(self) -> bool:
    """Creates the file whole (a link of a written one): never seen empty."""
    new = f"{self.path}.new-{os.getpid()}-{threading.get_ident()}"
    with open(new, "w") as f:
      json.dump(self._holder, f)
    try:
      os.link(new, self.path)
    except FileExistsError:
      return False
    finally:
      os.unlink(new)
    return True

  def _take_over_if_stale(self) -> None:
    lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)  # One newcomer judges at a time.
      self._take_over_locked()
    finally:
      os.close(lock)

  def _take_over_locked(self) -> None:
    for _ in range(3):  # Another newcomer may take it over at the same time.
      try:
        with open(self.path) as f:
          holder = json.load(f)
        age = time.time() - os.stat(self.path).st_mtime
      except FileNotFoundError:
        holder, age = None, 0.0
      except (OSError, ValueError):
        holder, age = {}, STALE_AFTER_SECS  # Unreadable: treat as stale.
      if holder is not None and not isinstance(holder, dict):
        holder = {}
      if holder is not None:
        self._raise_if_live(holder, age)
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
          os.rename(self.path, aside)  # Only one newcomer wins the rename.
          os.unlink(aside)
          logging.warning("Took over the stale claim of %s (holder %s).",
                          os.path.dirname(self.path), holder)
        except FileNotFoundError:
          pass
      if self._create():
        return
    raise DirectoryInUseError(f"Could not claim {self.path}: other trainers "
                              "keep taking it. Is another job starting?")

  def _raise_if_live(self, holder: Dict[str, Any], age: float) -> None:
    same_host = holder.get("host") == self._holder["host"]
    if _alive(holder) if same_host else age < STALE_AFTER_SECS:
      raise DirectoryInUseError(
          f"checkpoint_dir {os.path.dirname(os.path.dirname(self.path))!r} is "
          f"held by another trainer: host {holder.get('host')}, pid "
          f"{holder.get('pid')}, since {holder.get('since')} (heartbeat "
          f"{age:.0f} s ago). Two trainers on one directory would overwrite "
          "each other's checkpoints. Stop that run, or set "
          "config.checkpoint_dir to another directory. A claim whose holder "
          f"died expires {STALE_AFTER_SECS:.0f} s after its last heartbeat; "
          f"delete {self.path} only if you are sure the holder is gone.")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECS):
      try:
        os.utime(self.path)
      except OSError:
        logging.warning("Cannot refresh the claim %s.", self.path)

  def release(self) -> None:
    """Deletes the file once every acquire of this process is released."""
    with _HELD_LOCK:
      self.count -= 1
      if self.count > 0:
        return
      _HELD.pop(self.path, None)
    self._stop.set()
    try:
      with open(self.path) as f:
        mine = json.load(f) == self._holder
    except (OSError, ValueError):
      return
    if mine:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
