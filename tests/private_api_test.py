"""Runs with JAX's private modules out of jaxline's reach (issue: fence).

`testdata/without_jax_private.py` makes `jax._src.clusters` and
`jax._src.distributed` unimportable for jaxline, as a JAX release that moved
them would, and runs the multi-host test experiment. A single process must
still start (JAX's public `jax.distributed.initialize()` looks for the
cluster instead), and a multi-process job runs on JAX's own heartbeat, with
a log line saying jaxline's watchdog is off.
"""

import json
import os
import signal
import time

import multiprocess_job as jobs

_LAUNCHER = os.path.join(jobs.TESTDATA, "without_jax_private.py")
_EXPERIMENT = os.path.join(jobs.TESTDATA, "multihost_experiment.py")
_NO_CLUSTER = "jax.distributed.initialize() found no cluster"
_WATCHDOG_OFF = "jaxline's watchdog for dead or hung processes is off"
# JAX's coordination service names the process whose heartbeats stopped.
_HEARTBEAT_LOST = "tasks are unhealthy (stopped sending heartbeats):\n1"


def _args(record_dir, *extra):
  return [f"--config={_EXPERIMENT}",
          f"--config.experiment_kwargs.config.record_dir={record_dir}",
          *extra]


def _steps(record_dir, process_id):
  with open(os.path.join(record_dir, f"train_p{process_id}.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_single_process_starts(tmp_path):
  with jobs.Job(tmp_path, "single", _LAUNCHER,
                _args(tmp_path, "--config.training_steps=3"), 1,
                distributed=False) as job:
    output = job.wait_for_success()[0]
  assert _NO_CLUSTER in output, output[-3000:]
  assert "Initializing jax.distributed" not in output
  assert _steps(tmp_path, 0) == [0, 1, 2]


def test_two_processes_train_without_jaxline_watchdog(tmp_path):
  with jobs.Job(tmp_path, "two", _LAUNCHER,
                _args(tmp_path, "--config.training_steps=3"), 2) as job:
    outputs = job.wait_for_success()
  for i in (0, 1):
    assert _WATCHDOG_OFF in outputs[i], outputs[i][-3000:]
    assert "Process %d of 2" % i in outputs[i]
    assert _steps(tmp_path, i) == [0, 1, 2]


def test_dead_peer_is_caught_by_jax_heartbeat(tmp_path):
  args = _args(tmp_path, "--config.training_steps=1000",
               "--config.experiment_kwargs.config.step_sleep_secs=0.3")
  with jobs.Job(tmp_path, "kill", _LAUNCHER, args, 2) as job:
    jobs.wait_for_text(job, 1, "step 3 done", timeout=120)
    os.kill(job.processes[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    ended = jobs.exit_times(job, [0], timeout=90)
    code = job.processes[0].returncode
    output = job.output(0)
  assert code != 0, output[-4000:]
  assert ended[0] - killed_at < 60, output[-4000:]
  assert _WATCHDOG_OFF in output
  assert _HEARTBEAT_LOST in output, output[-4000:]
