"""The checkpoint design end to end, with real processes, files and signals.

Each test runs `tests/testdata/checkpoint_experiment.py` as a user runs it
(`python checkpoint_experiment.py --config=checkpoint_experiment.py ...`) on
one CPU device, in training and eval processes that share a checkpoint_dir:
two trainers racing for one directory, a trainer killed (and left a zombie)
and restarted, eval jobs beside a trainer that deletes old steps, strict
restores of a changed model, and SIGUSR1. Checks are on exit codes, log
lines, the Orbax step directories, the experiment's final parameters (bit
for bit) and the event files, read with TensorBoard's own loader.

Every process has a deadline; any still running at the end of a test is
killed.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from conftest import subprocess_env
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "testdata")
_EXPERIMENT = os.path.join(_TESTDATA, "checkpoint_experiment.py")
_TIMEOUT_SECS = 150
_STEP_RE = re.compile(r"\[checkpoint_experiment\] step (\d+)")
_RESTORED_RE = re.compile(r"Returned checkpoint latest with id (\d+)\.")
_SKIP_NOTE = "can no longer be read"
_KWARGS = "--config.experiment_kwargs.config."


# --- Running the experiment --------------------------------------------------


class _Run:
  """One process of the experiment; stdout and stderr go to files."""

  def __init__(self, args, log_base, cache_dir):
    self.stdout_path = log_base + ".out"
    self.stderr_path = log_base + ".err"
    env = subprocess_env(
        1, JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    command = [sys.executable, _EXPERIMENT, f"--config={_EXPERIMENT}",
               *args]
    self.started = time.monotonic()
    self.ended = None
    with open(self.stdout_path, "w") as out, open(self.stderr_path,
                                                  "w") as err:
      self.proc = subprocess.Popen(command, cwd=_TESTDATA, env=env,
                                   stdout=out, stderr=err)

  @property
  def pid(self) -> int:
    return self.proc.pid

  def stdout(self) -> str:
    with open(self.stdout_path, errors="replace") as f:
      return f.read()

  def stderr(self) -> str:
    with open(self.stderr_path, errors="replace") as f:
      return f.read()

  def output(self) -> str:
    return self.stdout() + self.stderr()

  def steps(self) -> list[int]:
    return [int(s) for s in _STEP_RE.findall(self.stdout())]

  def poll(self):
    code = self.proc.poll()
    if code is not None and self.ended is None:
      self.ended = time.monotonic()
    return code

  def wait_for(self, predicate, what: str, timeout=_TIMEOUT_SECS):
    """Polls until `predicate()` is truthy and returns it; fails on exit."""
    deadline = time.monotonic() + timeout
    while True:
      value = predicate()
      if value:
        return value
      if self.poll() is not None:
        pytest.fail(f"Run exited ({self.proc.returncode}) before {what}:\n"
                    f"{self.output()[-6000:]}")
      if time.monotonic() > deadline:
        pytest.fail(f"Timed out waiting for {what}:\n"
                    f"{self.output()[-6000:]}")
      time.sleep(0.02)

  def wait_for_step(self, step: int) -> None:
    self.wait_for(lambda: any(s >= step for s in self.steps()),
                  f"step {step}")

  def finish(self, timeout=_TIMEOUT_SECS) -> int:
    try:
      code = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f"Run did not finish in {timeout}s:\n"
                  f"{self.output()[-6000:]}")
    self.poll()
    return code

  def assert_ok(self) -> None:
    code = self.finish()
    assert code == 0, self.output()[-6000:]

  def assert_fails(self) -> str:
    code = self.finish()
    assert code not in (0, None), self.output()[-6000:]
    return self.output()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture
def start(tmp_path, cache_dir):
  """Starts runs; any still running (or unreaped) at the end is killed."""
  runs = []

  def start_run(*args, name="run"):
    run = _Run(args, str(tmp_path / f"{name}_{len(runs)}"), cache_dir)
    runs.append(run)
    return run

  yield start_run
  for run in runs:
    if run.proc.poll() is None:
      run.proc.kill()
    try:
      run.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass


def _args(run_dir, *extra, sleep=0.0, final=""):
  return [f"--config.checkpoint_dir={run_dir}",
          f"{_KWARGS}step_sleep_secs={sleep}",
          f"{_KWARGS}final_params_path={final}", *extra]


def _eval_args(run_dir, *extra, sleep=0.0):
  """The trainer's experiment_kwargs, so that no restore warns of changes."""
  return _args(run_dir, "--jaxline_mode=eval",
               "--config.eval_poll_interval_secs=0.02", *extra, sleep=sleep)


def _series_dir(run_dir, series="latest"):
  return os.path.join(str(run_dir), "checkpoints", series)


def _committed(run_dir, series="latest") -> list[int]:
  directory = _series_dir(run_dir, series)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _host_item(run_dir, step) -> dict:
  path = os.path.join(_series_dir(run_dir), str(step), "host",
                      "process_0.json")
  with open(path) as f:
    return json.load(f)


def _restored(output: str):
  found = _RESTORED_RE.findall(output)
  return int(found[-1]) if found else None


def _event_files(directory) -> list[str]:
  return sorted(glob.glob(os.path.join(str(directory), "events.out.*")))


def _scalar_events(directory, tag) -> list[tuple[int, float]]:
  """Every (step, value) of `tag`, in file order, duplicates kept."""
  found = []
  for path in _event_files(directory):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        if value.tag == tag:
          found.append((event.step,
                        float(tensor_util.make_ndarray(value.tensor))))
  return found


def _pid_of_event_file(path) -> int:
  # TensorBoard names files events.out.tfevents.<time>.<host>.<pid>.<n>.
  return int(os.path.basename(path).split(".")[-2])


def _assert_same_arrays(path, reference_path):
  with np.load(path) as got, np.load(reference_path) as want:
    assert sorted(got.files) == sorted(want.files) == ["b", "marker", "w"]
    for key in want.files:
      assert got[key].dtype == want[key].dtype, key
      assert got[key].shape == want[key].shape, key
      assert got[key].tobytes() == want[key].tobytes(), key


# --- One trainer per directory -----------------------------------------------


def test_two_trainers_at_once_exactly_one_runs(tmp_path, start):
  run_dir = tmp_path / "run"
  steps = 24
  args = _args(run_dir, f"--config.training_steps={steps}", sleep=0.25)
  runs = [start(*args, name="a"), start(*args, name="b")]

  deadline = time.monotonic() + _TIMEOUT_SECS
  while all(r.poll() is None for r in runs):
    if time.monotonic() > deadline:
      pytest.fail("Neither trainer exited:\n" +
                  "\n".join(r.output()[-3000:] for r in runs))
    time.sleep(0.02)
  loser = next(r for r in runs if r.poll() is not None)
  winner = next(r for r in runs if r is not loser)
  # The loser left while the winner still trained: it did not wait for it.
  winner_steps_then = winner.steps()
  assert winner.poll() is None, (winner.output()[-3000:],
                                 loser.output()[-3000:])
  assert len(winner_steps_then) < steps
  print(f"loser exited {loser.ended - loser.started:.1f} s after its start, "
        f"the winner at step {len(winner_steps_then)} of {steps}")
  winner.assert_ok()
  print(f"winner ran {winner.ended - winner.started:.1f} s")

  assert loser.proc.returncode != 0
  error = loser.stderr()
  assert "held by another trainer" in error, error[-3000:]
  assert repr(str(run_dir)) in error
  assert f"host {socket.gethostname()}, pid {winner.pid}," in error
  assert not loser.steps()
  assert "training loop starting" not in loser.output()

  # Only the winner wrote: its steps, its checkpoints, its event file.
  assert winner.steps() == list(range(steps))
  assert _restored(winner.output()) is None
  committed = _committed(run_dir)
  assert committed == list(range(steps - 8, steps + 1, 2))
  for step in committed:
    item = _host_item(run_dir, step)
    assert item["entries"]["writer_pid"] == {"t": "py", "v": winner.pid}
    assert item["fields"]["global_step"] == {"t": "py", "v": step}
  files = _event_files(run_dir / "train")
  assert files and {_pid_of_event_file(f) for f in files} == {winner.pid}
  assert [s for s, _ in _scalar_events(run_dir / "train", "loss")] == [
      5, 10, 15, 20, steps]
  assert not os.path.exists(run_dir / "eval")
  # The winner gave its claim back when it finished.
  assert not os.path.exists(run_dir / "checkpoints" / "trainer_claim.json")


def _proc_state(pid: int) -> str:
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_killed_trainer_restarted_at_once(tmp_path, start, reaped):
  run_dir = tmp_path / "run"
  args = _args(run_dir, sleep=0.1)
  run = start(*args, name="killed")
  run.wait_for(lambda: _committed(run_dir), "a committed checkpoint")
  run.wait_for_step(5)
  run.proc.send_signal(signal.SIGKILL)
  if reaped:
    assert run.finish() == -signal.SIGKILL
  else:
    # Not waited for: the dead trainer stays a zombie holding its pid.
    deadline = time.monotonic() + 30
    while _proc_state(run.pid) != "Z":
      assert time.monotonic() < deadline, "SIGKILL did not take"
      time.sleep(0.01)
  claim = run_dir / "checkpoints" / "trainer_claim.json"
  with open(claim) as f:
    assert json.load(f)["pid"] == run.pid  # Left behind by the kill.
  newest = _committed(run_dir)[-1]

  restart = start(*args, name="restart")
  restart.assert_ok()
  if not reaped:
    assert _proc_state(run.pid) == "Z"  # Still unreaped all along.
    assert run.finish() == -signal.SIGKILL
  output = restart.output()
  assert "held by another trainer" not in output
  assert "Took over the stale claim" in output
  assert _restored(output) == newest
  assert newest > 0
  assert restart.steps() == list(range(newest, 20))
  assert _committed(run_dir)[-1] == 20
  assert _host_item(run_dir, 20)["entries"]["writer_pid"]["v"] == restart.pid
  assert not os.path.exists(claim)


# --- Eval jobs and the trainer's rotation ------------------------------------


def _assert_eval_log_consistent(run_dir):
  """Every eval event holds the step it is logged under, once each."""
  values = _scalar_events(run_dir / "eval", "step_value")
  steps = [s for s, _ in values]
  assert values, "no eval events"
  for step, value in values:
    assert value == step, values
  assert len(steps) == len(set(steps)), steps
  assert steps == sorted(steps), steps
  globals_ = _scalar_events(run_dir / "eval", "eval_global_step")
  assert globals_ == values
  return steps


def test_eval_beside_trainer_deleting_every_step(tmp_path, start):
  run_dir = tmp_path / "run"
  steps = 40
  trainer = start(*_args(run_dir, f"--config.training_steps={steps}",
                         "--config.save_checkpoint_interval=1",
                         "--config.max_checkpoints_to_keep=1", sleep=0.02),
                  name="train")
  evaluator = start(*_eval_args(run_dir, f"--config.training_steps={steps}",
                                "--config.max_checkpoints_to_keep=1",
                                sleep=0.02), name="eval")
  trainer.assert_ok()
  evaluator.assert_ok()
  output = evaluator.output()
  assert f"Last checkpoint (iteration {steps}) evaluated, exiting." in output
  assert _committed(run_dir) == [steps]

  evaluated = _assert_eval_log_consistent(run_dir)
  assert evaluated[-1] == steps
  assert set(evaluated) <= set(range(1, steps + 1))
  skips = output.count(_SKIP_NOTE)
  if skips:
    assert output.count("Skipping it; looking for the next one.") == skips
  print(f"{len(evaluated)} steps evaluated, {skips} deleted under the "
        "reader and skipped")


def test_eval_every_checkpoint_with_all_kept(tmp_path, start):
  run_dir = tmp_path / "run"
  evaluator = start(*_eval_args(run_dir, "--config.eval_every_checkpoint=True",
                                "--config.max_checkpoints_to_keep=100",
                                sleep=0.05), name="eval")
  trainer = start(*_args(run_dir, "--config.max_checkpoints_to_keep=100",
                         sleep=0.05), name="train")
  trainer.assert_ok()
  evaluator.assert_ok()
  assert _committed(run_dir) == list(range(2, 21, 2))
  assert _assert_eval_log_consistent(run_dir) == list(range(2, 21, 2))
  # Nothing was deleted, so no step may be reported deleted.
  warned = re.findall(r"step (\d+) was deleted before this eval job",
                      evaluator.output())
  assert not warned, warned


def test_eval_every_checkpoint_after_rotation(tmp_path, start):
  run_dir = tmp_path / "run"
  trainer = start(*_args(run_dir, "--config.max_checkpoints_to_keep=3"),
                  name="train")
  trainer.assert_ok()
  kept = _committed(run_dir)
  assert kept == [16, 18, 20]
  evaluator = start(*_eval_args(run_dir, "--config.eval_every_checkpoint=True",
                                "--config.max_checkpoints_to_keep=3"),
                    name="eval")
  evaluator.assert_ok()
  assert _assert_eval_log_consistent(run_dir) == kept
  output = evaluator.output()
  warned = [int(s) for s in re.findall(
      r"step (\d+) was deleted before this eval job reached it", output)]
  print(f"steps warned about: {warned}")
  # Never a step that it did evaluate...
  assert not set(warned) & set(kept), warned
  # ...but steps 2..14 were gone before this job started; it says so,
  # naming the one saved just before the first it found.
  assert warned == [14], evaluator.stderr()[-4000:]


# --- Strict restores ---------------------------------------------------------


def _assert_refused_before_any_step(run, run_dir, committed, *fragments):
  output = run.assert_fails()
  assert not run.steps(), output[-4000:]
  assert "training loop starting" not in output
  assert _committed(run_dir) == committed
  # One error: the same one logged by the restore and in the traceback.
  errors = set(re.findall(r"CheckpointMismatchError: (.*)", output))
  assert len(errors) == 1, output[-4000:]
  assert "falling back" not in output
  error, = errors
  for fragment in fragments:
    assert fragment in error, error
  return error


def test_eager_parameters_of_another_shape_or_dtype_fail(tmp_path, start):
  run_dir = tmp_path / "run"
  start(*_args(run_dir, "--config.training_steps=4"), name="train").assert_ok()
  committed = _committed(run_dir)
  assert committed == [2, 4]

  run = start(*_args(run_dir, "--config.training_steps=8",
                     f"{_KWARGS}hidden=32"), name="hidden")
  _assert_refused_before_any_step(
      run, run_dir, committed, "Checkpoint entry 'params'",
      "attribute _params", str(run_dir / "checkpoints" / "latest" / "4"),
      "at ['b'] the checkpoint holds float32[16] and the experiment "
      "float32[32]")

  run = start(*_args(run_dir, "--config.training_steps=8",
                     f"{_KWARGS}dtype=bfloat16"), name="dtype")
  _assert_refused_before_any_step(
      run, run_dir, committed, "Checkpoint entry 'params'",
      "attribute _params",
      "at ['b'] the checkpoint holds float32[16] and the experiment "
      "bfloat16[16]")


def test_lazy_parameters_declared_fail_undeclared_resume(tmp_path, start):
  run_dir = tmp_path / "run"
  lazy = f"{_KWARGS}eager=False"
  start(*_args(run_dir, "--config.training_steps=4", lazy),
        name="train").assert_ok()
  committed = _committed(run_dir)
  assert committed == [2, 4]

  run = start(*_args(run_dir, "--config.training_steps=8", lazy,
                     f"{_KWARGS}declare_abstract=True",
                     f"{_KWARGS}hidden=32"), name="declared")
  _assert_refused_before_any_step(
      run, run_dir, committed, "Checkpoint entry 'params'",
      "attribute _params",
      "at ['b'] the checkpoint holds float32[16] and the experiment "
      "float32[32]")

  run = start(*_args(run_dir, "--config.training_steps=8", lazy,
                     f"{_KWARGS}learning_rate=0.2"), name="lr")
  run.assert_ok()
  output = run.output()
  assert _restored(output) == 4
  assert run.steps() == [4, 5, 6, 7]
  warnings = re.findall(r"written under other experiment_kwargs; restoring "
                        r"it anyway\. Changed: (.*)", output)
  assert warnings == ["config.learning_rate: 0.1 -> 0.2"], warnings
  # The start-up record compares the whole config with the last run's.
  record = re.findall(r"config changed since the last run in \S+: (\d+) "
                      r"config key\(s\) differ from (\S+) \(old -> new\): "
                      r"(.*)", output)
  assert len(record) == 1, output
  count, path, changes = record[0]
  assert path == str(run_dir / "config.json")
  assert "experiment_kwargs.config.learning_rate: 0.1 -> 0.2" in changes
  assert "training_steps: 4 -> 8" in changes
  # The refused run (hidden=32) never started, so it left no record.
  assert "hidden" not in changes and "declare_abstract" not in changes


# --- SIGUSR1 -----------------------------------------------------------------


def test_sigusr1_saves_exits_zero_and_resumes_bit_identical(tmp_path, start):
  reference_final = str(tmp_path / "reference.npz")
  reference = start(*_args(tmp_path / "reference", final=reference_final),
                    name="reference")
  run_dir = tmp_path / "run"
  final = str(tmp_path / "final.npz")
  args = _args(run_dir, sleep=0.15, final=final)

  run = start(*args, name="sigusr1")
  run.wait_for_step(4)
  run.proc.send_signal(signal.SIGUSR1)
  run.assert_ok()
  output = run.output()
  assert "Received SIGUSR1" in output
  stopped = int(re.search(r"Preempted at step (\d+)", output).group(1))
  assert run.steps() == list(range(stopped))
  assert 4 < stopped < 20
  assert _committed(run_dir)[-1] == stopped
  assert _host_item(run_dir, stopped)["fields"]["global_step"]["v"] == stopped
  assert not os.path.exists(final)

  restart = start(*args, name="restart")
  restart.assert_ok()
  assert _restored(restart.output()) == stopped
  assert restart.steps() == list(range(stopped, 20))
  reference.assert_ok()
  assert reference.steps() == list(range(20))
  _assert_same_arrays(final, reference_final)
