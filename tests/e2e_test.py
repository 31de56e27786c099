"""End to end: a real experiment file run as a user runs it, in subprocesses.

`tests/testdata/experiment.py` ends with the `app.run(functools.partial(
platform.main, Experiment))` pattern and is started as
`python experiment.py --config=experiment.py ...` on 1 and 8 CPU devices.
Checks are on exit codes, log lines and the TensorBoard event files.
"""

import os
import re
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator

import conftest
from conftest import subprocess_env

_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "testdata")
_EXPERIMENT = os.path.join(_TESTDATA, "experiment.py")
_DIRECT_MAIN = os.path.join(_TESTDATA, "direct_main.py")
_TIMEOUT_SECS = 240

# The stdout action's line, with progress (the first line has no rate yet).
_PROGRESS_RE = re.compile(
    r"global_step: (\d+), \{.*'loss': [-\d.e]+.*\} "
    r"\[\d+/\d+ \([\d.]+%\)(?:, [\d.e+]+ steps/s, ETA \d+:\d\d:\d\d)?\]")
_EVALUATED_RE = re.compile(
    r"Evaluated step (\d+) \(mode=(\S+), host_steps=(\d+)\)")


def _run(args, num_devices=1, script=_EXPERIMENT, config_arg=None,
         cwd=_TESTDATA):
  config = _EXPERIMENT if config_arg is None else f"{_EXPERIMENT}:{config_arg}"
  command = [sys.executable, script, f"--config={config}"] + list(args)
  return conftest.run_python(command, cwd=cwd,
                             env=subprocess_env(num_devices),
                             timeout=_TIMEOUT_SECS)


def _output(result):
  return result.stdout + result.stderr


def _assert_ok(result):
  assert result.returncode == 0, _output(result)[-6000:]


def _progress_steps(result):
  return [int(m.group(1)) for m in _PROGRESS_RE.finditer(_output(result))]


def _evaluated(result):
  return [(int(m.group(1)), m.group(2), int(m.group(3)))
          for m in _EVALUATED_RE.finditer(_output(result))]


def _events(directory):
  accumulator = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0,
                                     event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return accumulator


def _scalar_steps(accumulator, tag):
  return [e.step for e in accumulator.Scalars(tag)]


@pytest.mark.parametrize("num_devices", [1, 8])
def test_train_writes_logs_events_and_checkpoints(tmp_path, num_devices):
  result = _run(["--jaxline_mode=train", "--config.training_steps=8",
                 f"--config.checkpoint_dir={tmp_path}"], num_devices)
  _assert_ok(result)
  output = _output(result)
  assert f"Experiment built: mode=train label= devices={num_devices}" in output
  assert _progress_steps(result) == [4, 8]
  assert "Saved checkpoint latest" in output

  train_events = _events(tmp_path / "train")
  assert _scalar_steps(train_events, "loss") == [4, 8]
  assert _scalar_steps(train_events, "steps_per_sec") == [4, 8]
  losses = [e.value for e in train_events.Scalars("loss")]
  assert losses[1] < losses[0]  # SGD on a convex loss makes progress.
  # The image written from step (D10).
  assert "inputs" in train_events.Tags()[event_accumulator.TENSORS]

  # A separate eval process finds the on-disk checkpoint.
  result = _run(["--jaxline_mode=eval", "--config.training_steps=8",
                 "--config.one_off_evaluate=True",
                 f"--config.checkpoint_dir={tmp_path}"], num_devices)
  _assert_ok(result)
  assert _evaluated(result) == [(8, "eval", 8)]
  eval_events = _events(tmp_path / "eval")
  assert _scalar_steps(eval_events, "eval_loss") == [8]
  assert _scalar_steps(eval_events, "eval_step") == [8]

  # Training again resumes from step 8 and runs to the new end.
  result = _run(["--jaxline_mode=train", "--config.training_steps=12",
                 f"--config.checkpoint_dir={tmp_path}"], num_devices)
  _assert_ok(result)
  assert _progress_steps(result) == [12]


@pytest.mark.parametrize("num_devices", [1, 8])
def test_config_file_argument_and_overrides(num_devices, tmp_path):
  result = _run(["--config.log_tensors_interval=2"], num_devices,
                config_arg="short,tagged", cwd=tmp_path)
  _assert_ok(result)
  output = _output(result)
  assert "label=short,tagged" in output
  assert _progress_steps(result) == [2, 4, 6]
  # No checkpoint_dir: the writer warns and writes nothing.
  warnings = re.findall(r"^W\d{4} .*checkpoint_dir.*$", output, re.MULTILINE)
  assert len(warnings) == 1, warnings
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("num_devices", [1, 8])
def test_train_eval_multithreaded(tmp_path, num_devices):
  result = _run(["--jaxline_mode=train_eval_multithreaded",
                 "--config.training_steps=12",
                 f"--config.checkpoint_dir={tmp_path}"], num_devices)
  _assert_ok(result)
  assert _progress_steps(result) == [4, 8, 12]
  evaluated = _evaluated(result)
  assert evaluated, _output(result)[-4000:]
  assert evaluated[-1][0] == 12
  # The eval experiment's mode is the flag value (§3.5).
  assert {mode for _, mode, _ in evaluated} == {"train_eval_multithreaded"}
  assert _scalar_steps(_events(tmp_path / "train"), "loss") == [4, 8, 12]
  eval_steps = _scalar_steps(_events(tmp_path / "eval"), "eval_loss")
  assert eval_steps[-1] == 12
  assert eval_steps == sorted(eval_steps)


def test_train_eval_multithreaded_in_memory():
  result = _run(["--jaxline_mode=train_eval_multithreaded",
                 "--config.training_steps=8"], 8)
  _assert_ok(result)
  evaluated = _evaluated(result)
  assert evaluated and evaluated[-1][:2] == (8, "train_eval_multithreaded")
  # The restored host state came through the in-memory history.
  assert evaluated[-1][2] == 8


def test_train_failure_in_multithreaded_mode_exits_non_zero():
  result = _run(["--jaxline_mode=train_eval_multithreaded",
                 "--config.training_steps=12",
                 "--config.experiment_kwargs.config.fail_at_step=5"])
  assert result.returncode != 0
  assert "Deliberate failure at step 5." in _output(result)
  assert _progress_steps(result) == [4]


def test_eval_failure_in_multithreaded_mode_exits_non_zero():
  result = _run(["--jaxline_mode=train_eval_multithreaded",
                 "--config.training_steps=1000000",
                 "--config.eval_initial_weights=True",
                 "--config.experiment_kwargs.config.fail_in_eval=True"])
  assert result.returncode != 0
  output = _output(result)
  assert "Deliberate eval failure at step 0." in output
  steps = _progress_steps(result)
  assert not steps or steps[-1] < 1000000


def test_eval_process_without_checkpoint_and_initial_weights_fails():
  result = _run(["--jaxline_mode=eval", "--config.one_off_evaluate=True"])
  assert result.returncode != 0
  assert ("Checkpoint invalid and eval_initial_weights set to False"
          in _output(result))
  assert not _evaluated(result)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_eval_process_evaluates_initial_weights(num_devices):
  result = _run(["--jaxline_mode=eval_test", "--config.one_off_evaluate=True",
                 "--config.eval_initial_weights=True"], num_devices)
  _assert_ok(result)
  assert _evaluated(result) == [(0, "eval_test", 0)]


def test_unknown_mode_exits_non_zero():
  result = _run(["--jaxline_mode=bogus_mode"])
  assert result.returncode != 0
  assert "Mode bogus_mode not recognized" in _output(result)


def test_missing_config_flag_exits_non_zero():
  result = subprocess.run(
      [sys.executable, _EXPERIMENT], cwd=_TESTDATA, env=subprocess_env(1),
      capture_output=True, text=True, timeout=_TIMEOUT_SECS, check=False)
  assert result.returncode != 0
  assert "--config" in _output(result)


def test_misspelled_config_key_stops_before_training():
  result = _run([], config_arg="short,typo")
  assert result.returncode != 0
  output = _output(result)
  assert "traning_steps" in output and "'training_steps'" in output
  assert "Experiment built" not in output
  assert not _progress_steps(result)


def test_direct_main_call_without_app_run(tmp_path):
  """D14: platform.main(Experiment, sys.argv[1:]) parses the flags itself."""
  result = _run(["--config.training_steps=4",
                 f"--config.checkpoint_dir={tmp_path}"], 1,
                script=_DIRECT_MAIN)
  _assert_ok(result)
  assert _scalar_steps(_events(tmp_path / "train"), "loss") == [4]
