"""End to end: the tiny and fsdp presets through the real harness.

Runs of `python -m examples.charlm.experiment` in subprocesses, as a user
starts it, with on-disk checkpoints and TensorBoard files (read back with
TensorBoard's EventAccumulator):

* reference: 1 device, steps 1-16 uninterrupted;
* first half: 4 devices, `train_eval_multithreaded`, steps 1-8;
* resumed: 1 device, the first half's checkpoint directory, to step 16;
* the fsdp preset for 6 steps, split over 4 devices and unsplit on 1.

The learning rate is held constant after warm-up in all three, so that the
schedule does not depend on `training_steps` and the runs are comparable
step by step. A data-parallel run must then compute what a single device
computes, and a resumed run what an uninterrupted one computes: the same
batches (the input position is checkpointed), parameters, optimizer state
and step keys (dropout is on in the tiny preset).
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

import conftest

_TIMEOUT_SECS = 300
# Compiling takes most of a tiny run's time; these cut it by half or more.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
_CONFIG = os.path.join(conftest.REPO_ROOT, "examples", "charlm", "config.py")
# Float sums are ordered differently on 1 and 4 devices (the losses differ by
# about 1e-7); another batch or key would change the loss by 1e-2 or more.
_RTOL = 1e-4


def _start(checkpoint_dir, num_devices: int, training_steps: int,
           mode: str = "train", preset: str = "tiny",
           extra=()) -> subprocess.Popen:
  env = conftest.subprocess_env(num_devices)
  env["XLA_FLAGS"] += " " + _FAST_COMPILE_FLAGS
  command = [
      sys.executable, "-m", "examples.charlm.experiment",
      f"--config={_CONFIG}:{preset}",
      f"--jaxline_mode={mode}",
      f"--config.checkpoint_dir={checkpoint_dir}",
      f"--config.training_steps={training_steps}",
      "--config.log_train_data_interval=1",
      "--config.log_tensors_interval=4",
      "--config.save_checkpoint_interval=4",
      "--config.experiment_kwargs.config.final_learning_rate_fraction=1.0",
      *extra,
  ]
  return subprocess.Popen(command, cwd=conftest.REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(process: subprocess.Popen) -> str:
  try:
    output, _ = process.communicate(timeout=_TIMEOUT_SECS)
  except subprocess.TimeoutExpired:
    process.kill()
    output, _ = process.communicate()
    pytest.fail(f"Timed out after {_TIMEOUT_SECS}s:\n{output[-6000:]}")
  assert process.returncode == 0, output[-6000:]
  return output


def _scalars(directory, tag: str) -> dict[int, float]:
  accumulator = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  events = accumulator.Scalars(tag)
  steps = [e.step for e in events]
  assert len(steps) == len(set(steps)), f"{tag} logged twice: {steps}"
  return {e.step: e.value for e in events}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  reference_dir = tmp_path_factory.mktemp("reference")
  resumed_dir = tmp_path_factory.mktemp("resumed")
  # The two independent runs share the machine; each is mostly serial.
  reference = _start(reference_dir, 1, 16)
  first_half = _start(resumed_dir, 4, 8, mode="train_eval_multithreaded")
  outputs = {"reference": _finish(reference),
             "first_half": _finish(first_half)}
  outputs["resumed"] = _finish(_start(resumed_dir, 1, 16))
  return {"reference_dir": reference_dir, "resumed_dir": resumed_dir,
          "outputs": outputs}


def test_loss_decreases_and_learning_rate_warms_up(runs):
  losses = _scalars(runs["reference_dir"] / "train", "loss")
  assert sorted(losses) == list(range(1, 17))
  # Untrained, the model is near uniform over 128 characters.
  assert losses[1] == pytest.approx(math.log(128), abs=0.3)
  late = np.mean([losses[s] for s in range(13, 17)])
  assert late < losses[1] - 0.8
  bits = _scalars(runs["reference_dir"] / "train", "bits_per_char")
  assert bits[16] == pytest.approx(losses[16] / math.log(2), rel=1e-5)
  # Step 1 runs the update with global_step 0: the warm-up's first rate.
  rates = _scalars(runs["reference_dir"] / "train", "learning_rate")
  assert [rates[s] for s in (1, 2, 3, 16)] == pytest.approx(
      [0.0, 5e-3, 1e-2, 1e-2])


def test_four_devices_compute_what_one_device_computes(runs):
  reference = _scalars(runs["reference_dir"] / "train", "loss")
  losses = _scalars(runs["resumed_dir"] / "train", "loss")
  assert [losses[s] for s in range(1, 9)] == pytest.approx(
      [reference[s] for s in range(1, 9)], rel=_RTOL)


def test_evaluation_reports_validation_loss_and_keeps_the_best(runs):
  output = runs["outputs"]["first_half"]
  eval_dir = runs["resumed_dir"] / "eval"
  losses = _scalars(eval_dir, "loss")
  bits = _scalars(eval_dir, "bits_per_char")
  # Only the newest checkpoint at each poll is evaluated; the last always.
  assert max(losses) == 8 and set(losses) <= {4, 8}
  assert bits[8] == pytest.approx(losses[8] / math.log(2), rel=1e-5)
  assert losses[8] < math.log(128) - 0.5
  assert "Final evaluation at step 8 on 512 validation characters" in output
  assert "loss: " in output and "saving new best checkpoint" in output
  assert os.path.isdir(runs["resumed_dir"] / "checkpoints" / "best")
  assert "Sample at step 8:\ndef " in output


def test_resume_continues_at_the_saved_step_with_the_same_batches(runs):
  output = runs["outputs"]["resumed"]
  assert "Returned checkpoint latest with id 8." in output
  assert "from batch 8 (window 64)." in output
  # Steps 9-16 follow the first half's 1-8, none repeated or skipped.
  losses = _scalars(runs["resumed_dir"] / "train", "loss")
  assert sorted(losses) == list(range(1, 17))
  reference = _scalars(runs["reference_dir"] / "train", "loss")
  assert [losses[s] for s in range(9, 17)] == pytest.approx(
      [reference[s] for s in range(9, 17)], rel=_RTOL)
  assert "Saved checkpoint latest with id 16." in output


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
  """The fsdp preset, split over 4 devices and unsplit on 1 (fsdp=False)."""
  split_dir = tmp_path_factory.mktemp("fsdp")
  whole_dir = tmp_path_factory.mktemp("fsdp_off")
  split = _start(split_dir, 4, 6, preset="fsdp")
  whole = _start(whole_dir, 1, 6, preset="fsdp",
                 extra=["--config.experiment_kwargs.config.fsdp=False"])
  _finish(split)
  _finish(whole)
  return split_dir, whole_dir


def _partition_specs(checkpoint_dir, step: int) -> list[tuple]:
  """The partition spec of each saved parameter and optimizer-state array.

  Scalars (Adam's step count) are left out: they are never split.
  """
  step_dir = checkpoint_dir / "checkpoints" / "latest" / str(step)
  with open(step_dir / "meta" / "metadata") as f:
    entries = json.load(f)["entries"]
  keys = re.findall(r'"i": "(\d+)"', json.dumps(
      [entries["params"], entries["opt_state"]]))
  with ocp.StandardCheckpointer() as reader:
    stored = reader.metadata(step_dir / "arrays")
  # Orbax < 0.11.22 returns the tree itself; later ones wrap it.
  stored = getattr(stored, "item_metadata", stored)
  stored = getattr(stored, "tree", stored)
  return [tuple(stored[key].sharding.partition_spec) for key in keys
          if stored[key].shape]


def test_fsdp_computes_what_one_unsplit_device_computes(fsdp_runs):
  split_dir, whole_dir = fsdp_runs
  losses = _scalars(split_dir / "train", "loss")
  reference = _scalars(whole_dir / "train", "loss")
  assert sorted(losses) == sorted(reference) == list(range(1, 7))
  # jit gathered each weight for the forward and backward passes.
  assert [losses[s] for s in range(1, 7)] == pytest.approx(
      [reference[s] for s in range(1, 7)], rel=_RTOL)
  # Every array but the scalars was split over the data axis, and saved so.
  split = _partition_specs(split_dir, 6)
  assert split and all("data" in spec for spec in split), split
  whole = _partition_specs(whole_dir, 6)
  assert whole and not any("data" in spec for spec in whole), whole
