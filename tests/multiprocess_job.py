"""Real multi-process jobs on 127.0.0.1, for the tests that need them.

A `Job` starts one Python process per process id, each in its own process
group with its own log file, joined through jax.distributed at a free
coordinator port (found by binding port 0). Leaving the `with` block kills
every process still alive, whatever happened; every wait has a deadline and
fails the test with the tail of each log.
"""

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import shutil
import time

import pytest

from conftest import subprocess_env

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "testdata")
RUN_TIMEOUT_SECS = 150


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """Processes of one multi-process (or single-process) run.

  Output goes to one log file per process. Leaving the `with` block kills
  every process still alive (SIGKILL to its process group).
  """

  def __init__(self, log_dir, name, script, args, num_processes,
               start_ids=None, distributed=True, devices_per_process=2,
               xla_flags=""):
    self.log_dir = str(log_dir)
    self.name = name
    self.script = script
    self.args = list(args)
    self.num_processes = num_processes
    self.start_ids = (list(range(num_processes)) if start_ids is None
                      else list(start_ids))
    self.distributed = distributed
    self.devices_per_process = devices_per_process
    self.xla_flags = xla_flags
    self.processes = {}
    self._files = []

  def log_path(self, process_id):
    return os.path.join(self.log_dir, f"{self.name}_log{process_id}.txt")

  def start(self):
    port = free_port()
    env = subprocess_env(self.devices_per_process)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {self.xla_flags}".strip()
    for i in self.start_ids:
      flags = []
      if self.distributed:
        flags = [f"--jaxline_coordinator_address=127.0.0.1:{port}",
                 f"--jaxline_num_processes={self.num_processes}",
                 f"--jaxline_process_id={i}"]
      log = open(self.log_path(i), "w")
      self._files.append(log)
      self.processes[i] = subprocess.Popen(
          # A script's path, or a list such as ["-m", "jaxline"].
          [sys.executable] + (list(self.script) if isinstance(
              self.script, (list, tuple)) else [self.script]) +
          self.args + flags, cwd=TESTDATA,
          env=env, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True)
    return self

  def output(self, process_id):
    with open(self.log_path(process_id), errors="replace") as f:
      return f.read()

  def outputs(self):
    return {i: self.output(i) for i in self.processes}

  def pids(self):
    return {i: p.pid for i, p in self.processes.items()}

  def wait(self, timeout=RUN_TIMEOUT_SECS):
    """Waits for every process; returns {process id: return code}."""
    deadline = time.monotonic() + timeout
    codes = {}
    for i, process in self.processes.items():
      try:
        codes[i] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"{self.name}: process {i} still running after "
                    f"{timeout}s.\n{self.describe()}")
    return codes

  def wait_for_success(self, timeout=RUN_TIMEOUT_SECS):
    """Waits for every process; fails the test unless all exited 0."""
    codes = self.wait(timeout)
    assert all(c == 0 for c in codes.values()), self.describe()
    return self.outputs()

  def signal(self, process_id, signum):
    """Sends `signum` to the Python process itself (not its group)."""
    os.kill(self.processes[process_id].pid, signum)

  def kill(self, process_id=None):
    ids = self.processes if process_id is None else [process_id]
    for i in ids:
      process = self.processes[i]
      if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(process.pid, signal.SIGKILL)
        process.wait()

  def describe(self, tail=4000):
    return "\n".join(f"--- {self.name} process {i} (pid {p.pid}, rc "
                     f"{p.poll()}) ---\n{self.output(i)[-tail:]}"
                     for i, p in self.processes.items())

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.kill()
    for f in self._files:
      f.close()


def wait_for_text(job, process_id, text, timeout):
  """Polls a process's log until it holds `text`; fails on exit or deadline."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if text in job.output(process_id):
      return
    if job.processes[process_id].poll() is not None:
      pytest.fail(f"process {process_id} ended before {text!r}.\n"
                  f"{job.describe()}")
    time.sleep(0.1)
  pytest.fail(f"no {text!r} from process {process_id} in {timeout}s.\n"
              f"{job.describe()}")


def exit_times(job, process_ids, timeout):
  """Polls until the processes end; returns {id: time.monotonic() at exit}."""
  deadline = time.monotonic() + timeout
  ended = {}
  while len(ended) < len(process_ids):
    for i in process_ids:
      if i not in ended and job.processes[i].poll() is not None:
        ended[i] = time.monotonic()
    if time.monotonic() > deadline:
      pytest.fail(f"processes {sorted(set(process_ids) - set(ended))} still "
                  f"running after {timeout}s.\n{job.describe()}")
    time.sleep(0.1)
  return ended


def once_per_session(tmp_path_factory, name, produce):
  """A directory that `produce(directory)` fills once per test session.

  pytest-xdist's workers are separate processes, each with its own session
  fixtures, so an expensive reference run would be repeated in each. They
  share the parent of their base temporary directories: the first worker
  runs `produce` there under a file lock, the others wait for it and reuse
  the result. Without xdist it is a plain temporary directory.
  """
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    directory = tmp_path_factory.mktemp(name)
    produce(directory)
    return directory
  root = tmp_path_factory.getbasetemp().parent
  directory, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)  # A failed attempt's.
      directory.mkdir()
      produce(directory)
      done.touch()
  return directory
