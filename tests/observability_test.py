"""Failing loudly and showing progress, run as a user runs jaxline.

Every test starts `tests/testdata/observe_experiment.py` (or `hooks_main.py`)
in a subprocess with `python <file> --config=<file> ...` and checks the exit
status, the log and what is on disk: event files read with TensorBoard's own
reader, Orbax checkpoint directories, metrics.jsonl, profiler traces.
"""

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

import conftest

_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "testdata")
_EXPERIMENT = os.path.join(_TESTDATA, "observe_experiment.py")
_HOOKS_MAIN = os.path.join(_TESTDATA, "hooks_main.py")
_TIMEOUT_SECS = 240
_KW = "--config.experiment_kwargs.config."

# Records real imports of tensorflow (not `find_spec` probes, which etils
# makes to pick a file system), and at exit whether tensorflow is loaded.
_TF_PROBE = '''
import atexit, os, sys
_LOG = os.environ["TF_PROBE_LOG"]
def _record(text):
  with open(_LOG, "a") as f:
    f.write(text + "\\n")
class _Probe:
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      frame = sys._getframe(1)
      while frame is not None:
        if frame.f_code.co_name == "_find_and_load":
          _record("import " + name)
          break
        frame = frame.f_back
    return None
sys.meta_path.insert(0, _Probe())
atexit.register(lambda: _record(
    "loaded" if "tensorflow" in sys.modules else "not loaded"))
'''


def _command(args, script=_EXPERIMENT, config_arg=None):
  config = _EXPERIMENT if config_arg is None else f"{_EXPERIMENT}:{config_arg}"
  return [sys.executable, script, f"--config={config}"] + list(args)


def _run(args, *, script=_EXPERIMENT, config_arg=None, env=None,
         timeout=_TIMEOUT_SECS, cwd=_TESTDATA):
  return conftest.run_python(_command(args, script, config_arg),
                             cwd=cwd, env=env or conftest.subprocess_env(),
                             timeout=timeout)


def _output(result):
  return result.stdout + result.stderr


def _assert_ok(result):
  assert result.returncode == 0, _output(result)[-6000:]


def _saved_steps(checkpoint_dir, series="latest"):
  directory = os.path.join(checkpoint_dir, "checkpoints", series)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _progress_lines(result):
  return [line for line in _output(result).splitlines()
          if "global_step: " in line and "] global_step:" in line]


# --- 1. No TensorFlow --------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="Needs TensorFlow installed, to show it stays out.")
def test_train_and_eval_never_import_tensorflow(tmp_path):
  probe_dir = tmp_path / "probe"
  probe_dir.mkdir()
  (probe_dir / "sitecustomize.py").write_text(_TF_PROBE)
  log = tmp_path / "tf_probe.log"
  env = conftest.subprocess_env(TF_PROBE_LOG=str(log))
  env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), env["PYTHONPATH"]])
  run_dir = tmp_path / "run"
  train = _run(["--config.training_steps=4", f"--config.checkpoint_dir={run_dir}"],
               env=env)
  _assert_ok(train)
  evaluate = _run(["--jaxline_mode=eval", "--config.training_steps=4",
                   "--config.one_off_evaluate=True",
                   f"--config.checkpoint_dir={run_dir}"], env=env)
  _assert_ok(evaluate)
  # Both processes ran the probe, and neither imported TensorFlow.
  assert log.read_text().split() == ["not", "loaded", "not", "loaded"], (
      log.read_text())

  # TensorBoard's own reader still reads what was written.
  train_events = conftest.read_events(run_dir / "train")
  assert [e.step for e in train_events.Scalars("loss")] == [1, 2, 3, 4]
  assert "inputs" in (train_events.Tags()[event_accumulator.TENSORS] +
                      train_events.Tags()[event_accumulator.IMAGES])
  assert [e.step for e in conftest.read_events(run_dir / "eval").Scalars("eval_loss")] == [4]


# --- 2. Non-finite guard -----------------------------------------------------


def test_nan_stops_the_run_before_it_is_saved(tmp_path):
  # Steps get global_step 0, 1, ...; from the one that gets 5 the loss is
  # NaN, so the log line "global_step: 6" is the first to show it.
  result = _run(["--config.training_steps=20", f"{_KW}nan_at_step=5",
                 f"--config.checkpoint_dir={tmp_path}"])
  output = _output(result)
  assert result.returncode != 0, output[-4000:]
  assert re.search(r"Training scalar 'loss' is nan at global_step 6\b",
                   output), output[-4000:]
  assert output.count("Training scalar 'loss' is nan") == 1  # Reported once.
  # Saves every 2 steps: 2 and 4 are good; 6 (NaN) and later never saved.
  assert _saved_steps(tmp_path) == [2, 4]
  assert "Saved checkpoint latest with id 6" not in output


def test_nan_from_an_unlogged_step_is_caught_before_the_final_save(tmp_path):
  # Nothing is logged or saved mid-run: the final save's check catches it.
  result = _run(["--config.training_steps=6", f"{_KW}nan_at_step=3",
                 "--config.log_tensors_interval=100",
                 "--config.log_train_data_interval=100",
                 "--config.save_checkpoint_interval=100",
                 f"--config.checkpoint_dir={tmp_path}"])
  assert result.returncode != 0, _output(result)[-4000:]
  assert "Training scalar 'loss' is nan at global_step 6" in _output(result)
  assert _saved_steps(tmp_path) == []


def test_terminate_on_nan_false_trains_on(tmp_path):
  result = _run(["--config.training_steps=8", f"{_KW}nan_at_step=5",
                 "--config.terminate_on_nan=False",
                 f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(result)
  assert _saved_steps(tmp_path)[-1] == 8
  rows = _metrics(tmp_path / "train" / "metrics.jsonl")
  assert math.isnan(rows[-1]["loss"])


# --- 3. Hang watchdog and the signal grace period ---------------------------


@pytest.mark.parametrize("hang_kind", ["python", "xla"])
def test_step_timeout_dumps_stacks_flushes_and_exits(tmp_path, hang_kind):
  start = time.monotonic()
  result = _run(["--config.training_steps=10", "--config.step_timeout_secs=3",
                 f"{_KW}hang_at_step=3", f"{_KW}hang_kind={hang_kind}",
                 f"--config.checkpoint_dir={tmp_path}"], timeout=120)
  output = _output(result)
  assert result.returncode == 4, output[-4000:]
  assert time.monotonic() - start < 100
  assert re.search(r"Training hung: no step ended for 3 s after "
                   r"global_step 3 \(config.step_timeout_secs\)", output)
  assert "Thread 'MainThread'" in output  # Every thread's stack.
  assert "_hang_forever" in output or "time.sleep(3600)" in output
  # The writer was flushed: steps 1-3 are in the metrics file and events.
  steps = [row["step"] for row in _metrics(tmp_path / "train" /
                                           "metrics.jsonl")]
  assert steps == [1, 2, 3]
  assert [e.step for e in conftest.read_events(tmp_path / "train").Scalars("loss")] == [
      1, 2, 3]


def test_first_step_is_exempt_from_the_step_timeout(tmp_path):
  # Compiling the first step takes longer than the timeout here.
  result = _run(["--config.training_steps=3", "--config.step_timeout_secs=0.2",
                 f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(result)


@pytest.mark.parametrize("hang_kind", ["python", "xla"])
def test_sigterm_during_a_step_that_never_returns(tmp_path, hang_kind):
  command = _command(["--config.training_steps=10",
                      "--config.preemption_grace_secs=2",
                      f"{_KW}hang_at_step=2", f"{_KW}hang_kind={hang_kind}",
                      f"--config.checkpoint_dir={tmp_path}"])
  process = subprocess.Popen(command, cwd=_TESTDATA, text=True,
                             env=conftest.subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  try:
    deadline = time.monotonic() + 120
    for line in process.stdout:
      lines.append(line)
      if "global_step: 2," in line:
        break
      assert time.monotonic() < deadline, "".join(lines)[-4000:]
    time.sleep(1.0)  # Now inside the step that got global_step 2.
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rest, _ = process.communicate(timeout=60)
    ended = time.monotonic() - signalled
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  output = "".join(lines) + rest
  assert process.returncode == 4, output[-4000:]
  assert ended < 30, ended
  assert "Received SIGTERM, but the running step (after global_step 2) did " \
         "not end within 2 s (config.preemption_grace_secs)" in output, (
             output[-4000:])
  assert _saved_steps(tmp_path) == [2]


# --- 4, 5. Metrics file and plot ---------------------------------------------


def test_metrics_file_matches_tensorboard_and_plots(tmp_path):
  train = _run(["--config.training_steps=6", f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(train)
  evaluate = _run(["--jaxline_mode=eval", "--config.training_steps=6",
                   "--config.one_off_evaluate=True",
                   f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(evaluate)
  for mode, keys in [("train", ["loss", "steps_per_sec"]),
                     ("eval", ["eval_loss", "eval_step"])]:
    rows = _metrics(tmp_path / mode / "metrics.jsonl")
    events = conftest.read_events(tmp_path / mode)
    for key in keys:
      from_json = [(row["step"], row[key]) for row in rows]
      from_events = [(e.step, e.value) for e in events.Scalars(key)]
      assert [s for s, _ in from_json] == [s for s, _ in from_events]
      for (_, a), (_, b) in zip(from_json, from_events):
        assert a == pytest.approx(b, rel=1e-6)  # Events keep float32.
    assert all(isinstance(row["wall_time"], float) for row in rows)

  plot = conftest.run_python([sys.executable, "-m", "jaxline.plot",
                              str(tmp_path)], cwd=conftest.REPO_ROOT,
                             env=conftest.subprocess_env(), timeout=120)
  assert plot.returncode == 0, plot.stderr
  png = tmp_path / "curves.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  empty = tmp_path / "empty"
  empty.mkdir()
  missing = conftest.run_python([sys.executable, "-m", "jaxline.plot",
                                 str(empty)], cwd=conftest.REPO_ROOT,
                                env=conftest.subprocess_env(), timeout=120)
  assert missing.returncode != 0
  assert missing.stderr.strip().count("\n") == 0
  assert str(empty) in missing.stderr


# --- 6. Profiler --------------------------------------------------------------


def test_profile_captures_the_asked_steps(tmp_path):
  result = _run(["--config.training_steps=6", "--config.profile_start_step=2",
                 "--config.profile_num_steps=2",
                 f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(result)
  output = _output(result)
  profile = tmp_path / "profile"
  assert f"Profiling steps 2 to 3 into {profile}" in output
  files = [os.path.join(root, name) for root, _, names in os.walk(profile)
           for name in names]
  assert any(f.endswith(".xplane.pb") for f in files), files
  assert any(f.endswith("perfetto_trace.json.gz") for f in files), files


# --- 7. Dry run ---------------------------------------------------------------


def test_dry_run_runs_one_step_and_one_eval_and_writes_nothing(tmp_path):
  run_dir = tmp_path / "run"
  result = _run(["--jaxline_dry_run", f"--config.checkpoint_dir={run_dir}"])
  _assert_ok(result)
  assert not run_dir.exists()
  assert "['params']: (3,) float32" in result.stdout
  assert "step() scalars: loss ()" in result.stdout
  assert "evaluate() scalars: eval_loss (), eval_step ()" in result.stdout
  assert "global_step: 2," not in _output(result)


def test_dry_run_with_a_failing_step_exits_non_zero(tmp_path):
  result = _run(["--jaxline_dry_run", f"{_KW}fail_at_step=0",
                 f"--config.checkpoint_dir={tmp_path / 'run'}"])
  assert result.returncode != 0
  assert "RuntimeError: Deliberate failure at step 0." in result.stderr
  assert not (tmp_path / "run").exists()


# --- 8. Progress line ---------------------------------------------------------


def test_progress_line_and_a_finished_run(tmp_path):
  result = _run(["--config.training_steps=8", f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(result)
  lines = _progress_lines(result)
  assert len(lines) == 8
  for n, line in enumerate(lines, start=1):
    assert f"global_step: {n}, " in line
    assert f"[{n}/8 ({100 * n / 8:.1f}%)" in line
    assert "steps_per_sec" not in line
    message = line.split("] ", 1)[1]
    for number in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", message):
      digits = number.split("e")[0].replace(".", "").lstrip("0")
      assert len(digits) <= 7, (number, line)
  # The first step's compile is left out: the first line has no rate.
  assert "steps/s" not in lines[0]
  for line in lines[1:]:
    assert re.search(r", [\d.e+]+ steps/s, ETA \d+:\d\d:\d\d\]$", line), line

  again = _run(["--config.training_steps=8", f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(again)
  output = _output(again)
  assert output.count("Nothing to train") == 1
  assert "Nothing to train: global_step 8 of training_steps 8 is done." in output
  assert not _progress_lines(again)


# --- 9. Errors before any compile --------------------------------------------


def _assert_config_error(result, *texts):
  output = _output(result)
  assert result.returncode != 0, output[-3000:]
  for text in texts:
    assert text in output, output[-3000:]
  assert "experiment init starting" not in output  # Stopped before building.


def test_value_of_the_wrong_type_is_named(tmp_path):
  _assert_config_error(
      _run([f"--config.checkpoint_dir={tmp_path}"], config_arg="bad_type"),
      "config.training_steps='abc' (str) has the wrong type; set it to a "
      "whole number of steps.")


def test_zero_interval_is_named(tmp_path):
  _assert_config_error(
      _run(["--config.log_tensors_interval=0",
            f"--config.checkpoint_dir={tmp_path}"]),
      "config.log_tensors_interval=0 must be > 0")


def test_misspelt_override_is_a_short_error(tmp_path):
  result = _run(["--config.traning_steps=5", f"--config.checkpoint_dir={tmp_path}"])
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
  assert "traning_steps" in result.stderr
  assert 'Did you mean "training_steps"' in result.stderr


def test_step_value_that_is_not_a_number_is_named(tmp_path):
  result = _run([f"{_KW}extra_scalar=hello",
                 f"--config.checkpoint_dir={tmp_path}"])
  assert result.returncode != 0
  assert "Experiment.step returned 'extra': str ('hello')" in result.stderr
  assert _saved_steps(tmp_path) == []


# --- 10. Extra periodic actions and MultiWriter -------------------------------


def test_early_stopping_action_and_a_second_writer(tmp_path):
  result = _run(["--config.training_steps=50", f"--config.checkpoint_dir={tmp_path}"],
                script=_HOOKS_MAIN)
  _assert_ok(result)
  output = _output(result)
  stopped = int(re.search(r"Early stop at (\d+)", output).group(1))
  assert stopped < 50
  assert f"Training stopped at global_step {stopped} by a periodic action" \
      in output
  assert _saved_steps(tmp_path)[-1] == stopped
  # Both writers got the same scalars.
  extra = [json.loads(line) for line in
           (tmp_path / "extra_writer.jsonl").read_text().splitlines()]
  metrics = _metrics(tmp_path / "train" / "metrics.jsonl")
  assert [r["step"] for r in extra] == [r["step"] for r in metrics]
  assert [r["loss"] for r in extra] == pytest.approx(
      [r["loss"] for r in metrics])


# --- 11. Debugging with pmap and jit off --------------------------------------


def test_debug_print_shows_values_with_pmap_jit_disabled(tmp_path):
  result = _run(["--jaxline_disable_pmap_jit", "--config.training_steps=2",
                 f"{_KW}debug_print=True", f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(result)
  values = re.findall(r"debug_print loss=([-\d.e]+)", result.stdout)
  assert len(values) == 2, result.stdout[-3000:]
  losses = [row["loss"] for row in _metrics(tmp_path / "train" /
                                            "metrics.jsonl")]
  assert [float(v) for v in values] == pytest.approx(losses, rel=1e-5)
  # As the README says: a plain print inside pmap still sees a tracer.
  assert re.search(r"python_print loss= \S*Tracer", result.stdout), (
      result.stdout[-3000:])


# --- 12. Run directories ------------------------------------------------------


def test_a_resumed_run_says_from_which_step_and_directory(tmp_path):
  _assert_ok(_run(["--config.training_steps=4",
                   f"--config.checkpoint_dir={tmp_path}"]))
  result = _run(["--config.training_steps=6", f"--config.checkpoint_dir={tmp_path}"])
  _assert_ok(result)
  latest = tmp_path / "checkpoints" / "latest" / "4"
  assert f"Resuming training at global_step 4 from checkpoint {latest}." in \
      _output(result)


def test_a_relative_checkpoint_dir_is_under_the_working_directory(tmp_path):
  # The examples' default (runs/<example>_<preset>) is relative; Orbax needs
  # absolute paths, so jaxline resolves it against the working directory.
  for steps in (2, 4):
    result = _run([f"--config.training_steps={steps}",
                   "--config.checkpoint_dir=runs/relative",
                   "--config.profile_start_step=1",
                   "--config.profile_num_steps=1"], cwd=tmp_path)
    _assert_ok(result)
  run_dir = tmp_path / "runs" / "relative"
  assert _saved_steps(run_dir) == [2, 4]
  assert "Resuming training at global_step 2 from checkpoint " \
      f"{run_dir / 'checkpoints' / 'latest' / '2'}." in _output(result)
  assert [row["step"] for row in _metrics(run_dir / "train" /
                                          "metrics.jsonl")] == [1, 2, 3, 4]
  assert os.listdir(run_dir / "profile")
