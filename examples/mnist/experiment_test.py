"""End-to-end tests: the example through the real harness, as users run it.

Each run is a subprocess (`python -m examples.mnist.experiment ...`) with two
forced CPU devices, so flags, config overrides, the pmapped update with its
pmean, on-disk checkpoints and TensorBoard files are all the real ones. The
runs are tiny; they check wiring and determinism, not accuracy (the README
reports the full run's accuracy).
"""

import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest
from tensorboard.backend.event_processing import event_accumulator

import conftest
from examples.mnist import config as config_lib
from jaxline import base_config

_TIMEOUT_SECS = 420
_STEPS = 30
_DEVICES = 2

# Small enough to compile in seconds on a busy CPU; still the convnet.
_TINY_FLAGS = [
    f"--config.training_steps={_STEPS}",
    "--config.save_checkpoint_interval=10",
    "--config.log_tensors_interval=10",
    "--config.log_train_data_interval=10",
    "--config.eval_poll_interval_secs=0.2",
    "--config.experiment_kwargs.config.warmup_steps=5",
    "--config.experiment_kwargs.config.model.conv_channels=(8,16)",
    "--config.experiment_kwargs.config.model.conv_head_size=32",
]

_FINAL_LINE = re.compile(
    rf"Final evaluation at step {_STEPS} on 360 digits test examples: "
    r"accuracy: (0\.\d{4}|1\.0000), loss: \d+\.\d{4}")


def _run(checkpoint_dir: str, *extra_flags: str,
         num_devices: int = _DEVICES) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "examples.mnist.experiment",
             "--config=examples/mnist/config.py",
             f"--config.checkpoint_dir={checkpoint_dir}",
             *_TINY_FLAGS, *extra_flags]
  result = conftest.run_python(
      command, cwd=conftest.REPO_ROOT, env=conftest.subprocess_env(num_devices),
      timeout=_TIMEOUT_SECS)
  return result


def _check_ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, (
      f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
      f"stderr:\n{result.stderr[-6000:]}")


def _events(logdir: str) -> event_accumulator.EventAccumulator:
  accumulator = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.SCALARS: 0,
                             event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return accumulator


def _scalars(accumulator, tag: str) -> Dict[int, float]:
  return {e.step: e.value for e in accumulator.Scalars(tag)}


def _steps(series_dir: str) -> List[int]:
  return sorted(int(name) for name in os.listdir(series_dir)
                if name.isdigit())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Tuple[str, subprocess.CompletedProcess]:
  """One uninterrupted train_eval_multithreaded run, shared by the tests."""
  checkpoint_dir = str(tmp_path_factory.mktemp("full") / "run")
  result = _run(checkpoint_dir, "--jaxline_mode=train_eval_multithreaded")
  _check_ok(result)
  return checkpoint_dir, result


class TestConfig:

  @pytest.mark.parametrize("preset", [None, "digits", "mnist"])
  def test_presets_pass_jaxline_validation(self, preset):
    config = config_lib.get_config(preset)
    base_config.validate_config(config)
    assert config.best_model_eval_metric == "accuracy"
    assert config.experiment_kwargs.config.dataset == (preset or "digits")

  def test_training_steps_override_reaches_the_experiment(self):
    # The schedule and the "final" marker read it through a reference.
    config = config_lib.get_config()
    config.training_steps = 77
    assert config.experiment_kwargs.config.training_steps == 77

  def test_unknown_preset_is_rejected(self):
    with pytest.raises(ValueError, match="Unknown preset 'cifar'"):
      config_lib.get_config("cifar")


class TestEndToEnd:

  def test_prints_final_accuracy(self, full_run):
    _, result = full_run
    match = _FINAL_LINE.search(result.stdout)
    assert match, result.stdout[-3000:]
    # Thirty steps of a tiny convnet (about 0.44) are well above chance.
    assert float(match.group(1)) > 0.25
    # The final line is the last evaluation the run printed.
    evaluations = [line for line in result.stdout.splitlines()
                   if "valuation at step" in line]
    assert evaluations[-1] == match.group(0)

  def test_train_events_hold_scalars_and_images(self, full_run):
    checkpoint_dir, _ = full_run
    train = _events(os.path.join(checkpoint_dir, "train"))
    for tag in ("loss", "accuracy", "learning_rate", "steps_per_sec"):
      assert sorted(_scalars(train, tag)) == [10, 20, _STEPS], tag
    # Warmup then cosine decay to zero at the last step.
    rates = _scalars(train, "learning_rate")
    assert rates[10] > rates[20] > rates[_STEPS] >= 0.0
    assert rates[_STEPS] < 1e-4
    # Images go through the TensorBoard image plugin.
    assert "train/inputs" in train.PluginTagToContent("images")
    (images,) = train.Tensors("train/inputs")
    assert images.step == 0
    # Width, height, then up to three PNGs.
    assert images.tensor_proto.string_val[:2] == [b"8", b"8"]
    assert len(images.tensor_proto.string_val) == 5

  def test_eval_events_and_best_checkpoint(self, full_run):
    checkpoint_dir, result = full_run
    accuracy = _scalars(_events(os.path.join(checkpoint_dir, "eval")),
                        "accuracy")
    assert _STEPS in accuracy
    printed = float(_FINAL_LINE.search(result.stdout).group(1))
    assert accuracy[_STEPS] == pytest.approx(printed, abs=5e-5)
    checkpoints = os.path.join(checkpoint_dir, "checkpoints")
    assert _steps(os.path.join(checkpoints, "latest"))[-1] == _STEPS
    # The evaluator kept the best-accuracy checkpoint.
    best_steps = _steps(os.path.join(checkpoints, "best"))
    assert best_steps
    best_step = best_steps[-1]
    assert accuracy[best_step] == max(
        v for s, v in accuracy.items() if s <= best_step)

  def test_resumed_run_matches_uninterrupted_run(self, full_run, tmp_path):
    """A run pre-empted after step 20 and restarted ends as if never stopped.

    The restart restores the input position with the parameters, so it
    trains on the same batches; any difference would show in the losses.
    """
    full_dir, _ = full_run
    resumed_dir = str(tmp_path / "resumed")
    series = os.path.join(resumed_dir, "checkpoints", "latest")
    shutil.copytree(os.path.join(full_dir, "checkpoints", "latest"), series)
    for step in _steps(series):
      if step > 20:
        shutil.rmtree(os.path.join(series, str(step)))
    assert _steps(series)[-1] == 20

    result = _run(resumed_dir, "--jaxline_mode=train_eval_multithreaded")
    _check_ok(result)
    assert "Returned checkpoint latest with id 20." in result.stderr

    full_train = _events(os.path.join(full_dir, "train"))
    resumed_train = _events(os.path.join(resumed_dir, "train"))
    # Only the steps after the restore were trained again.
    assert sorted(_scalars(resumed_train, "loss")) == [_STEPS]
    for tag in ("loss", "accuracy", "learning_rate"):
      assert (_scalars(resumed_train, tag)[_STEPS] ==
              _scalars(full_train, tag)[_STEPS]), tag
    full_eval = _events(os.path.join(full_dir, "eval"))
    resumed_eval = _events(os.path.join(resumed_dir, "eval"))
    for tag in ("loss", "accuracy"):
      assert (_scalars(resumed_eval, tag)[_STEPS] ==
              _scalars(full_eval, tag)[_STEPS]), tag

  def test_uneven_batch_fails_at_start_with_a_clear_message(self, tmp_path):
    result = _run(str(tmp_path / "bad"), "--jaxline_mode=train",
                  "--config.experiment_kwargs.config.batch_size=7")
    assert result.returncode != 0
    assert ("batch_size=7 cannot be split evenly over 2 devices"
            in result.stderr), result.stderr[-3000:]
