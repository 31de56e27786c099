"""Every process of a multi-process job exits 0 once its work is done.

Processes other than the coordinator used to die at interpreter exit with
SIGABRT ("terminate called after throwing an instance of ''"): jaxline's
watchdog thread sat in `get_live_nodes`, a barrier that finished peers no
longer join; JAX's atexit hook cleared the backends and shut the client
down, which released the thread into interpreter finalization, where it
rebuilt a backend and aborted. `distributed.shutdown`, registered at exit,
now releases and joins the watchdog while Python still runs.

Each job here is 4 processes with checkpoints through Orbax, run with a
0.2 s watchdog interval, where processes other than the chief finish a
second after it (as one that still flushes or writes results does), so
that their watchdogs wait in that barrier: before the fix, every such job
lost a process.
"""

import os
import socket
import subprocess
import sys

from conftest import subprocess_env

_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "testdata", "multihost_experiment.py")
_PROCESSES = 4
_REPEATS = 4
_TIMEOUT_SECS = 240
# Runs the experiment as its own __main__ with a fast watchdog.
_LAUNCH = """
import runpy, sys, time
import jax
from jaxline import distributed
distributed.WATCHDOG_INTERVAL_SECS = 0.2
mark_finished = distributed.mark_finished
def finish_late():
  if jax.process_index() != 0:
    time.sleep(1.0)
  mark_finished()
distributed.mark_finished = finish_late
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_job(tmp_path, index: int) -> dict[int, tuple[int, str]]:
  port = _free_port()
  processes = {}
  for i in range(_PROCESSES):
    log = open(tmp_path / f"job{index}_p{i}.log", "w+")
    processes[i] = (subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, _EXPERIMENT,
         f"--config={_EXPERIMENT}",
         f"--config.experiment_kwargs.config.record_dir={tmp_path}",
         f"--config.checkpoint_dir={tmp_path / f'ckpt{index}'}",
         "--config.training_steps=4",
         f"--jaxline_coordinator_address=127.0.0.1:{port}",
         f"--jaxline_num_processes={_PROCESSES}",
         f"--jaxline_process_id={i}"],
        env=subprocess_env(1), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True), log)
  results = {}
  try:
    for i, (process, log) in processes.items():
      code = process.wait(timeout=_TIMEOUT_SECS)
      log.seek(0)
      results[i] = (code, log.read())
  finally:
    for process, log in processes.values():
      if process.poll() is None:
        os.killpg(process.pid, 9)
        process.wait()
      log.close()
  return results


def test_every_process_exits_zero_at_interpreter_exit(tmp_path):
  for index in range(_REPEATS):
    results = _run_job(tmp_path, index)
    for i, (code, output) in sorted(results.items()):
      assert code == 0 and "terminate called" not in output, (
          f"job {index}, process {i} exited with {code}:\n{output[-4000:]}")
      assert "Saved checkpoint latest with id 4." in output
