"""Tests for `jaxline.claim`: one training job per checkpoint directory.

The holders here are real processes (`python -c`), killed with real signals,
so the liveness check runs against the kernel's view of them: a live pid, a
dead one, a zombie not yet reaped, and claims of other hosts judged by age.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import subprocess_env
import pytest

from jaxline import claim

_TIMEOUT_SECS = 60

_HOLDER = """
import sys, time
from jaxline import claim
held = claim.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""

_RACER = """
import os, sys, time
from jaxline import claim
directory, barrier, done = sys.argv[1:4]
deadline = time.monotonic() + 60
while not os.path.exists(barrier) and time.monotonic() < deadline:
  time.sleep(0.0005)
try:
  held = claim.acquire(directory)
except claim.DirectoryInUseError as e:
  print("lost", str(e).replace(chr(10), " "), flush=True)
  sys.exit(0)
print("won", os.getpid(), flush=True)
while not os.path.exists(done) and time.monotonic() < deadline:
  time.sleep(0.01)
"""


def _start(code, *args):
  return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                          env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _claim_path(directory):
  return os.path.join(directory, claim.FILENAME)


def _read_holder(directory):
  with open(_claim_path(directory)) as f:
    return json.load(f)


@pytest.fixture
def directory(tmp_path):
  path = tmp_path / "run" / "checkpoints"
  path.mkdir(parents=True)
  return str(path)


@pytest.fixture
def holder(directory):
  """A live child process holding the claim on `directory`."""
  process = _start(_HOLDER, directory)
  try:
    line = process.stdout.readline()
    if line.strip() != "held":
      process.kill()
      pytest.fail(f"holder did not start: {line!r} {process.stderr.read()}")
    yield process
  finally:
    if process.poll() is None:
      process.kill()
    process.communicate(timeout=_TIMEOUT_SECS)


def _wait_until_zombie(pid):
  deadline = time.monotonic() + _TIMEOUT_SECS
  while time.monotonic() < deadline:
    with open(f"/proc/{pid}/stat") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "Z":
        return
    time.sleep(0.01)
  pytest.fail(f"process {pid} did not become a zombie")


def _acquired(directory):
  """Acquires, checks the file names this process, and releases."""
  held = claim.acquire(directory)
  try:
    assert _read_holder(directory)["pid"] == os.getpid()
    assert _read_holder(directory)["host"] == socket.gethostname()
  finally:
    held.release()
  assert not os.path.exists(_claim_path(directory))


def test_claim_of_a_live_process_is_refused_naming_it(directory, holder):
  saved = _read_holder(directory)
  assert saved["pid"] == holder.pid
  with pytest.raises(claim.DirectoryInUseError) as info:
    claim.acquire(directory)
  message = str(info.value)
  assert f"host {socket.gethostname()}" in message
  assert f"pid {holder.pid}" in message
  assert f"since {saved['since']}" in message
  assert os.path.dirname(directory) in message
  # The holder's claim is left as it was.
  assert _read_holder(directory) == saved


def test_claim_of_a_killed_and_reaped_process_is_taken_over(directory,
                                                            holder):
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=_TIMEOUT_SECS)
  assert os.path.exists(_claim_path(directory))  # SIGKILL left it behind.
  _acquired(directory)


def test_claim_of_a_zombie_is_taken_over(directory, holder):
  """A holder killed but not yet reaped by its parent is dead."""
  holder.send_signal(signal.SIGKILL)
  _wait_until_zombie(holder.pid)
  os.kill(holder.pid, 0)  # The pid still exists...
  _acquired(directory)  # ...but the claim is free.
  # The leader shows "Z" while its other threads may still be exiting, so
  # waitpid can lag the /proc state by a moment: wait, do not poll.
  assert holder.wait(timeout=_TIMEOUT_SECS) == -signal.SIGKILL


def _foreign_claim(directory, age_secs):
  with open(_claim_path(directory), "w") as f:
    json.dump({"host": "another-host.example", "pid": os.getpid(),
               "started": "1", "since": "2030-01-02T03:04:05"}, f)
  now = time.time()
  os.utime(_claim_path(directory), (now - age_secs, now - age_secs))


def test_claim_of_another_host_with_a_fresh_heartbeat_blocks(directory):
  _foreign_claim(directory, age_secs=claim.STALE_AFTER_SECS - 20)
  with pytest.raises(claim.DirectoryInUseError) as info:
    claim.acquire(directory)
  message = str(info.value)
  assert "host another-host.example" in message
  assert f"pid {os.getpid()}" in message
  assert "since 2030-01-02T03:04:05" in message
  assert _read_holder(directory)["host"] == "another-host.example"


def test_claim_of_another_host_with_an_old_heartbeat_is_taken_over(
    directory):
  _foreign_claim(directory, age_secs=claim.STALE_AFTER_SECS + 5)
  _acquired(directory)


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00"],
                         ids=["empty", "garbage", "binary"])
def test_unreadable_claim_is_taken_over(directory, content):
  with open(_claim_path(directory), "wb") as f:
    f.write(content)
  _acquired(directory)


def test_acquire_nests_within_one_process(directory):
  first = claim.acquire(directory)
  second = claim.acquire(directory)
  assert second is first
  first.release()
  assert _read_holder(directory)["pid"] == os.getpid()  # Still held.
  second.release()
  assert not os.path.exists(_claim_path(directory))
  # And the directory can be claimed afresh.
  _acquired(directory)


def test_release_leaves_a_claim_that_is_no_longer_ours(directory):
  held = claim.acquire(directory)
  _foreign_claim(directory, age_secs=0)
  held.release()
  assert _read_holder(directory)["host"] == "another-host.example"


def _race(tmp_path, directory, racers=4):
  barrier, done = tmp_path / "go", tmp_path / "done"
  processes = [_start(_RACER, directory, barrier, done)
               for _ in range(racers)]
  try:
    time.sleep(1.0)  # Let the interpreters start and reach the barrier.
    barrier.touch()
    lines = [p.stdout.readline().strip() for p in processes]
    winners = [line for line in lines if line.startswith("won")]
    holder = _read_holder(directory) if os.path.exists(
        _claim_path(directory)) else None
  finally:
    done.touch()
    for p in processes:
      try:
        p.communicate(timeout=_TIMEOUT_SECS)
      except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
  return lines, winners, holder, processes


_RACE_ROUNDS = 4


# Fails in most runs until `claim.Claim` creates its file whole and
# serializes take-overs; see the helper report. Remove the mark then.
@pytest.mark.parametrize("previous", ["none", "stale"])
def test_racing_processes_exactly_one_wins(tmp_path, previous):
  """Newcomers starting at one moment: one holds, the others are told who.

  With a stale claim in place they also race to take it over.
  """
  for round_ in range(_RACE_ROUNDS):
    directory = tmp_path / f"round_{round_}" / "checkpoints"
    directory.mkdir(parents=True)
    directory = str(directory)
    if previous == "stale":
      _foreign_claim(directory, age_secs=claim.STALE_AFTER_SECS + 5)
    lines, winners, holder, processes = _race(
        tmp_path / f"round_{round_}", directory)
    assert len(winners) == 1, (round_, lines)
    losers = [line for line in lines if line.startswith("lost")]
    assert len(losers) == len(lines) - 1, lines
    assert holder is not None and winners[0] == f"won {holder['pid']}", (
        lines, holder)
    assert all(f"pid {holder['pid']}" in line for line in losers), lines
    assert holder["pid"] in [p.pid for p in processes]
