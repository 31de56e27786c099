"""Resuming from disk checkpoints, with real processes and real signals.

`tests/testdata/resume_experiment.py` runs as a user runs it (`python
resume_experiment.py --config=resume_experiment.py ...`) on 2 CPU devices.
Runs are killed with SIGKILL, stopped with SIGTERM/SIGINT and restarted; a
separate `--jaxline_mode=eval` process follows a training process. Checks
are on exit codes, log lines, the checkpoints on disk, the final parameters
(bit for bit) and TensorBoard's own reader.

A shared JAX compilation cache keeps the many restarts from recompiling.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time

from conftest import subprocess_env
from ml_collections import config_dict
import numpy as np
# The checkpoints name optax's state classes; restoring needs them imported.
import optax  # pylint: disable=unused-import
import pytest
from tensorboard.backend.event_processing import event_accumulator

from jaxline import checkpointing
from jaxline import experiment

_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "testdata")
_EXPERIMENT = os.path.join(_TESTDATA, "resume_experiment.py")
_TIMEOUT_SECS = 150
_DEVICES = 2
_STEPS = 40  # resume_experiment's training_steps; saves every 2 steps.
_STEP_RE = re.compile(r"\[resume_experiment\] step (\d+)")


# --- Running the experiment --------------------------------------------------


class _Process:
  """One run of the experiment, its output going to a log file."""

  def __init__(self, args, log_path, cache_dir, num_devices=_DEVICES):
    self.log_path = log_path
    command = [sys.executable, _EXPERIMENT, f"--config={_EXPERIMENT}"]
    env = subprocess_env(
        num_devices, JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    with open(log_path, "w") as log:
      self.proc = subprocess.Popen(command + list(args), cwd=_TESTDATA,
                                   env=env, stdout=log,
                                   stderr=subprocess.STDOUT)

  def output(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def steps(self) -> list[int]:
    return [int(m) for m in _STEP_RE.findall(self.output())]

  def wait_for(self, predicate, what: str, timeout=_TIMEOUT_SECS):
    """Polls the log until `predicate(text)` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
      text = self.output()
      value = predicate(text)
      if value:
        return value
      if self.proc.poll() is not None:
        pytest.fail(f"Run exited ({self.proc.returncode}) before {what}:\n"
                    f"{text[-6000:]}")
      if time.monotonic() > deadline:
        self.proc.kill()
        pytest.fail(f"Timed out waiting for {what}:\n{text[-6000:]}")
      time.sleep(0.02)

  def wait_for_step(self, step: int) -> None:
    self.wait_for(lambda text: any(s >= step for s in map(
        int, _STEP_RE.findall(text))), f"step {step}")

  def finish(self, timeout=_TIMEOUT_SECS) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f"Run did not finish in {timeout}s:\n"
                  f"{self.output()[-6000:]}")

  def assert_ok(self) -> None:
    code = self.finish()
    assert code == 0, self.output()[-6000:]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture
def start(tmp_path, cache_dir):
  """Starts runs; any still running at the end of the test is killed."""
  processes = []

  def start_run(*args, name="run", num_devices=_DEVICES):
    log_path = str(tmp_path / f"{name}_{len(processes)}.log")
    process = _Process(args, log_path, cache_dir, num_devices)
    processes.append(process)
    return process

  yield start_run
  for process in processes:
    if process.proc.poll() is None:
      process.proc.kill()
      process.proc.wait()


def _train_args(checkpoint_dir, final_path="", sleep=0.0, *extra):
  return [f"--config.checkpoint_dir={checkpoint_dir}",
          f"--config.experiment_kwargs.config.final_params_path={final_path}",
          f"--config.experiment_kwargs.config.step_sleep_secs={sleep}",
          *extra]


def _committed(checkpoint_dir, series="latest"):
  directory = os.path.join(checkpoint_dir, "checkpoints", series)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _restored_step(output: str, series="latest"):
  found = re.findall(rf"Returned checkpoint {series} with id (\d+)\.", output)
  return int(found[-1]) if found else None


def _first_step(text):
  found = _STEP_RE.search(text)
  return (int(found.group(1)),) if found else None


def _assert_bit_identical(path, reference_path):
  with np.load(path) as got, np.load(reference_path) as want:
    assert sorted(got.files) == sorted(want.files)
    assert any(k.startswith("params") for k in want.files)
    assert any(k.startswith("opt_state") for k in want.files)
    for key in want.files:
      assert got[key].dtype == want[key].dtype, key
      assert got[key].shape == want[key].shape, key
      assert got[key].tobytes() == want[key].tobytes(), key


def _scalars(directory, tag):
  accumulator = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  if tag not in accumulator.Tags()["scalars"]:
    return []
  return [(e.step, e.value) for e in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """Final parameters of an uninterrupted run."""
  directory = tmp_path_factory.mktemp("reference")
  final = str(directory / "final.npz")
  run = _Process(_train_args(str(directory / "run"), final),
                 str(directory / "run.log"), cache_dir)
  run.assert_ok()
  assert run.steps() == list(range(_STEPS))
  assert _restored_step(run.output()) is None
  assert _committed(str(directory / "run"))[-1] == _STEPS
  return final


# --- SIGKILL ------------------------------------------------------------------


def test_killed_at_random_moments_ends_bit_identical(tmp_path, start,
                                                     reference):
  seed = random.randrange(2**31)
  rng = random.Random(seed)
  print(f"kill schedule seed: {seed}")
  run_dir = str(tmp_path / "run")
  final = str(tmp_path / "final.npz")
  args = _train_args(run_dir, final)
  restored = []

  # 1: mid-training, once a checkpoint is committed, after a random step.
  run = start(*args, name="kill1")
  run.wait_for(lambda _: _committed(run_dir), "a committed checkpoint")
  run.wait_for_step(rng.randint(2, 5))
  time.sleep(rng.uniform(0.0, 0.1))
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  # 2: while it restores (or just after).
  run = start(*args, name="kill2")
  run.wait_for(lambda t: "checkpoint restore starting" in t, "the restore")
  time.sleep(rng.uniform(0.0, 0.3))
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  # 3: just as a save starts, while Orbax is still writing it.
  run = start(*args, name="kill3")
  first, = run.wait_for(_first_step, "the first step")
  restored.append(_restored_step(run.output()))
  run.wait_for(lambda t: any(int(s) > first for s in re.findall(
      r"Saved checkpoint latest with id (\d+)", t)), "a save")
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  # 4: mid-training again, a few steps after resuming.
  run = start(*args, name="kill4")
  first, = run.wait_for(_first_step, "the first step")
  restored.append(_restored_step(run.output()))
  run.wait_for_step(first + rng.randint(1, 6))
  time.sleep(rng.uniform(0.0, 0.1))
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  assert not os.path.exists(final), "a killed run got to the end"

  # Restart until done (once is enough: nothing kills it now).
  run = start(*args, name="final")
  run.assert_ok()
  restored.append(_restored_step(run.output()))
  # Later runs resumed from checkpoints rather than starting over...
  assert all(r is not None and r > 0 for r in restored), (seed, restored)
  assert run.steps()[0] == restored[-1]
  assert run.steps() == list(range(restored[-1], _STEPS))
  # ...and ended exactly where the uninterrupted run did.
  _assert_bit_identical(final, reference)


# --- SIGTERM and SIGINT -------------------------------------------------------


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, start, reference):
  run_dir = str(tmp_path / "run")
  final = str(tmp_path / "final.npz")
  args = _train_args(run_dir, final, 0.1)

  run = start(*args, name="sigterm")
  run.wait_for_step(5)
  run.proc.send_signal(signal.SIGTERM)
  run.assert_ok()
  output = run.output()
  stopped = int(re.search(r"Preempted at step (\d+)", output).group(1))
  assert stopped == len(run.steps())  # Steps done, as global_step counts.
  assert 5 < stopped < _STEPS
  assert _committed(run_dir)[-1] == stopped
  assert "Received SIGTERM" in output
  # The writer was flushed: every trigger up to the stop is on disk.
  logged = [step for step, _ in _scalars(os.path.join(run_dir, "train"),
                                         "loss")]
  assert logged == list(range(4, stopped + 1, 4))

  run = start(*args, name="sigint")
  run.wait_for_step(stopped + 3)
  run.proc.send_signal(signal.SIGINT)
  run.assert_ok()
  assert _restored_step(run.output()) == stopped
  assert run.steps()[0] == stopped
  second_stop = int(re.search(r"Preempted at step (\d+)",
                              run.output()).group(1))
  assert "Received SIGINT" in run.output()
  assert _committed(run_dir)[-1] == second_stop > stopped

  run = start(*args, name="finish")
  run.assert_ok()
  assert _restored_step(run.output()) == second_stop
  assert run.steps() == list(range(second_stop, _STEPS))
  _assert_bit_identical(final, reference)


# --- A separate eval process -------------------------------------------------


class _Shadow(experiment.AbstractExperiment):
  """The experiment's checkpointed attributes, to read checkpoints here."""

  CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_data_position": "data_position"}

  def __init__(self, mode, init_rng=None):
    self._params = self._opt_state = None
    self._data_position = 0

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def _read_best(checkpoint_dir):
  config = config_dict.ConfigDict({"checkpoint_dir": checkpoint_dir,
                                   "max_checkpoints_to_keep": 5})
  checkpointer = checkpointing.DiskCheckpointer(config, "eval")
  exp = _Shadow("eval")
  best = checkpointer.get_experiment_state("best")
  best.best_eval_metric_value = -float("inf")
  best.best_model_eval_metric = "score"
  best.experiment_module = exp
  checkpointer.restore("best")
  return best.best_eval_metric_value, exp


def test_eval_process_follows_training(tmp_path, start):
  run_dir = str(tmp_path / "run")
  final = str(tmp_path / "final.npz")
  eval_args = [f"--config.checkpoint_dir={run_dir}", "--jaxline_mode=eval",
               "--config.best_model_eval_metric=score"]

  evaluator = start(*eval_args, name="eval")
  evaluator.wait_for(lambda t: "invalid or already evaluated, waiting" in t,
                     "eval to poll")
  # Training keeps every checkpoint here: a reader racing the deletion of
  # old ones is a known bug, pinned by checkpointing_test.
  trainer = start(*_train_args(run_dir, final, 0.1),
                  "--config.max_checkpoints_to_keep=100", name="train")
  trainer.assert_ok()
  evaluator.assert_ok()
  output = evaluator.output()
  assert f"Last checkpoint (iteration {_STEPS}) evaluated, exiting." in output

  scores = _scalars(os.path.join(run_dir, "eval"), "score")
  steps = [step for step, _ in scores]
  # Only committed checkpoints were evaluated, newest first seen, in order,
  # several of them while training ran, the last one at training_steps.
  assert set(steps) <= set(range(2, _STEPS + 1, 2)), steps
  assert steps == sorted(steps) and steps[-1] == _STEPS
  assert len(set(steps)) >= 2, steps
  for step, value in scores:
    assert value == -abs(step - 10)
  # Each evaluation saw that checkpoint's state.
  positions = _scalars(os.path.join(run_dir, "eval"), "data_position")
  assert [(s, float(s)) for s, _ in positions] == positions
  with np.load(final) as values:
    norm = sum(np.sum(np.square(values[k].astype(np.float64)))
               for k in values.files if k.startswith("params"))
  final_norm = [v for s, v in _scalars(os.path.join(run_dir, "eval"),
                                       "param_norm") if s == _STEPS]
  np.testing.assert_allclose(final_norm, [norm], rtol=1e-5)

  # "best" is on disk: the first step with the highest score.
  best_score = max(value for _, value in scores)
  best_step = next(step for step, value in scores if value == best_score)
  assert best_step != _STEPS
  assert _committed(run_dir, "best")[-1] == best_step
  value, exp = _read_best(run_dir)
  assert value == best_score
  assert exp._data_position == best_step
  assert output.count("saving new best checkpoint") >= 1

  # Restarted, eval gets its best value back: the last step is not a new best.
  best_before = _committed(run_dir, "best")
  evaluator = start(*eval_args, name="eval_again")
  evaluator.assert_ok()
  output = evaluator.output()
  assert _restored_step(output, "best") == best_step
  assert "saving new best checkpoint" not in output
  assert _committed(run_dir, "best") == best_before
  steps_again = [s for s, _ in _scalars(os.path.join(run_dir, "eval"),
                                        "score")]
  assert steps_again.count(_STEPS) == steps.count(_STEPS) + 1

  # One-off: evaluates the newest checkpoint once and exits, although
  # training_steps says there is more to come.
  one_off = start(f"--config.checkpoint_dir={run_dir}",
                  "--jaxline_mode=eval_once", "--config.one_off_evaluate=True",
                  "--config.training_steps=1000", name="one_off")
  one_off.assert_ok()
  assert f"Last checkpoint (iteration {_STEPS}) evaluated" in one_off.output()
  assert [s for s, _ in _scalars(os.path.join(run_dir, "eval_once"),
                                 "score")] == [_STEPS]

  # eval_specific_checkpoint_dir: a named older checkpoint, evaluated by a
  # job with its own checkpoint_dir; it exits at its own training_steps.
  other_dir = str(tmp_path / "other")
  oldest = _committed(run_dir)[0]
  assert oldest < _STEPS
  named = os.path.join(run_dir, "checkpoints", "latest", str(oldest))
  specific = start(f"--config.checkpoint_dir={other_dir}",
                   "--jaxline_mode=eval",
                   f"--config.eval_specific_checkpoint_dir={named}",
                   f"--config.training_steps={oldest}", name="specific")
  specific.assert_ok()
  assert _scalars(os.path.join(other_dir, "eval"), "data_position") == [
      (oldest, float(oldest))]
  assert _committed(run_dir)[-1] == _STEPS  # Still there, untouched.


# --- Start-up failures and device counts --------------------------------------


def test_unwritable_checkpoint_dir_fails_before_training(start):
  run = start("--config.checkpoint_dir=/proc/jaxline_resume_test",
              name="proc")
  code = run.finish()
  output = run.output()
  assert code != 0
  assert "Cannot write checkpoints" in output
  assert "/proc/jaxline_resume_test" in output
  assert "training loop starting" not in output
  assert not run.steps()


def test_resume_on_another_device_count(tmp_path, start):
  run_dir = str(tmp_path / "run")
  run = start(*_train_args(run_dir), "--config.training_steps=6",
              name="eight", num_devices=8)
  run.assert_ok()
  assert _committed(run_dir)[-1] == 6
  run = start(*_train_args(run_dir), "--config.training_steps=10",
              name="one", num_devices=1)
  run.assert_ok()
  assert _restored_step(run.output()) == 6
  assert run.steps() == [6, 7, 8, 9]
  # And back to 8.
  run = start(*_train_args(run_dir), "--config.training_steps=12",
              name="eight_again", num_devices=8)
  run.assert_ok()
  assert _restored_step(run.output()) == 10
  assert run.steps() == [10, 11]
