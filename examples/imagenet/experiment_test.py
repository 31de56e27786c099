"""Tests of the ImageNet experiment: its update rule, and end-to-end runs.

The update-rule tests run in this process on synthetic batches and need no
TensorFlow. The end-to-end runs are subprocesses with 8 CPU devices,
`platform.main`, an on-disk checkpoint_dir and TensorBoard files, on random
data from `tfds.testing.mock_data` (testdata/run_with_mock_data.py); they are
skipped where TensorFlow Datasets is not installed. The tiny config trains 6
steps (3 "epochs" of 2 steps), checkpointing every 2.
"""

import math
import os
import shutil
import sys

import haiku as hk
import jax
import jax.numpy as jnp
from jaxline import utils
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import conftest
from examples.imagenet import config as config_lib
from examples.imagenet import experiment

_TIMEOUT_SECS = 300
_NUM_DEVICES = 8
# 40 validation examples in global batches of 16: the last batch is padded.
_MOCK_EXAMPLES = 40
# Compiling the ResNet dominates a tiny run on a CPU; XLA's cheaper backend
# passes cut it about threefold, and the few steps run fast enough anyway.
_FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")


def _run(checkpoint_dir: str, *flags: str) -> str:
  """Runs the mocked experiment; returns its output, failing on an error."""
  command = [
      sys.executable, "-m", "examples.imagenet.testdata.run_with_mock_data",
      "--config=examples/imagenet/config.py:tiny",
      f"--config.checkpoint_dir={checkpoint_dir}",
      f"--mock_num_examples={_MOCK_EXAMPLES}", *flags]
  env = conftest.subprocess_env(_NUM_DEVICES)
  env["XLA_FLAGS"] += " " + _FAST_COMPILE_XLA_FLAGS
  result = conftest.run_python(command, cwd=conftest.REPO_ROOT, env=env,
                               timeout=_TIMEOUT_SECS)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-8000:]
  return output


def _scalars(directory: str, tag: str) -> dict[int, float]:
  """step -> value of a scalar in the TensorBoard files under `directory`."""
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  assert tag in accumulator.Tags()[event_accumulator.SCALARS], (
      accumulator.Tags())
  return {e.step: e.value for e in accumulator.Scalars(tag)}


def _steps(series_dir: str) -> list[int]:
  return sorted(int(name) for name in os.listdir(series_dir)
                if name.isdigit())


def _tiny_config(**training):
  config = config_lib.get_config("tiny").experiment_kwargs.config
  config.training.update(training)
  return config


def _batch(config, seed=0):
  """A per-device batch of random images for the local devices."""
  rng = np.random.default_rng(seed)
  n = jax.local_device_count()
  per_device = config.training.batch_size // jax.device_count()
  size = config.dataset.image_size
  return {
      "images": rng.normal(size=[n, per_device, size, size, 3]).astype(
          np.float32),
      "labels": rng.integers(0, config.dataset.num_classes,
                             size=[n, per_device]).astype(np.int32),
  }


def _dtypes(tree):
  return jax.tree.map(lambda x: x.dtype, tree)


@pytest.fixture(name="initial", scope="module")
def _initial():
  """Device 0's initial (params, state, opt_state) of the tiny config.

  Compiling the initialisation takes most of these tests' time on a CPU, so
  they share one.
  """
  exp = experiment.Experiment("train", jax.random.PRNGKey(0), _tiny_config(
      batch_size=2 * jax.device_count()))
  exp._initialize()
  return jax.device_get(utils.get_first(
      (exp._params, exp._state, exp._opt_state)))


class TestUpdateRule:

  def test_weight_decay_shrinks_kernels_only(self, initial):
    config = _tiny_config()
    params, _, _ = initial
    optimizer_config = config.optimizer
    optimizer_config.warmup_steps = 1
    # Large enough for the decay to show in float32.
    optimizer_config.peak_learning_rate = 100.0
    peak = optimizer_config.peak_learning_rate
    decay = optimizer_config.weight_decay
    optimizer = experiment.make_optimizer(optimizer_config, 100)
    opt_state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = params
    # With zero gradients only the decay moves anything. Step 0 has rate 0
    # (warm-up from 0) but fills the momentum with decay * w; step 1 at the
    # peak rate applies decay * w * (1 + momentum).
    update = jax.jit(optimizer.update)
    for _ in range(2):
      updates, opt_state = update(zeros, opt_state, new)
      new = jax.tree.map(jnp.add, new, updates)
    factor = 1 - peak * decay * (1 + optimizer_config.momentum)
    kinds = set()
    for module, name, value in hk.data_structures.traverse(params):
      updated = new[module][name]
      kinds.add(name)
      if name == "w":
        np.testing.assert_allclose(updated, value * factor, rtol=1e-6)
        # (haiku starts the logits' kernel at zero, which stays zero.)
        assert not np.any(value) or not np.allclose(updated, value)
      else:  # Batch-norm scale and offset, the logits' bias.
        np.testing.assert_array_equal(updated, value)
    assert kinds == {"w", "b", "scale", "offset"}

  def test_step_keeps_types(self, initial):
    # bf16, the harder case: float32 parameters and statistics around
    # bfloat16 compute.
    config = _tiny_config(bf16=True, batch_size=2 * jax.device_count())
    exp = experiment.Experiment("train", jax.random.PRNGKey(0), config)
    exp._params, exp._state, exp._opt_state = utils.bcast_local_devices(
        initial)
    types = _dtypes((exp._params, exp._state, exp._opt_state))
    step = utils.bcast_local_devices(np.int32(0))
    exp._params, exp._state, exp._opt_state, scalars = exp._update_pmap(
        exp._params, exp._state, exp._opt_state, _batch(config), step)
    # Same dtypes out as in (batch norm's int32 counter included), so the
    # next step reuses the compiled update instead of compiling another.
    assert _dtypes((exp._params, exp._state, exp._opt_state)) == types
    assert all(t == jnp.float32 for t in jax.tree.leaves(_dtypes(exp._params)))
    scalars = jax.device_get(utils.get_first(scalars))
    assert np.isfinite(scalars["loss"])
    assert scalars["learning_rate"] == 0.0  # Step 0 of the warm-up.

  @pytest.mark.parametrize("bf16", [False, True])
  def test_bf16_flag_sets_the_compute_dtype(self, bf16, initial):
    params, state, _ = initial
    exp = experiment.Experiment("train", jax.random.PRNGKey(0),
                                _tiny_config(bf16=bf16))
    images = jnp.zeros([2, 32, 32, 3])

    def forward(params, state):
      return exp._net.apply(params, state, images, is_training=False)[0]

    # Traced, not compiled: the convolutions' dtypes show in the jaxpr.
    jaxpr = str(jax.make_jaxpr(forward)(params, state))
    assert "conv_general_dilated" in jaxpr
    assert ("bf16[" in jaxpr) == bf16
    assert jax.eval_shape(forward, params, state).dtype == jnp.float32


@pytest.fixture(name="trained", scope="module")
def _trained(tmp_path_factory):
  """A checkpoint_dir after training the tiny config, and the run's output."""
  pytest.importorskip("tensorflow_datasets")
  checkpoint_dir = str(tmp_path_factory.mktemp("imagenet_tiny"))
  output = _run(checkpoint_dir, "--jaxline_mode=train")
  return checkpoint_dir, output


@pytest.fixture(name="evaluated", scope="module")
def _evaluated(trained):
  """The same checkpoint_dir after an evaluator has followed the training."""
  checkpoint_dir, _ = trained
  output = _run(checkpoint_dir, "--jaxline_mode=eval")
  return checkpoint_dir, output


def test_training_logs_every_step_and_saves_the_last(trained):
  checkpoint_dir, output = trained
  for step in range(1, 7):
    assert f"global_step: {step}," in output
  assert "global_step: 7," not in output
  latest = os.path.join(checkpoint_dir, "checkpoints", "latest")
  # Saved every 2 steps, the newest 2 kept (max_checkpoints_to_keep).
  assert _steps(latest) == [4, 6]


def test_tensorboard_has_the_schedule_and_a_finite_loss(trained):
  checkpoint_dir, _ = trained
  train_dir = os.path.join(checkpoint_dir, "train")
  config = config_lib.get_config("tiny").experiment_kwargs.config
  schedule = experiment.learning_rate_schedule(
      config.optimizer, config.training.training_steps)
  learning_rates = _scalars(train_dir, "learning_rate")
  assert sorted(learning_rates) == [1, 2, 3, 4, 5, 6]
  # Logged at global_step k: the rate of the step with index k - 1. Warm-up
  # to 0.1 * 16 / 256 over 2 steps, then a cosine to 0 at step 6.
  for step, value in learning_rates.items():
    assert value == pytest.approx(float(schedule(step - 1)), rel=1e-5)
  assert learning_rates[3] == pytest.approx(0.1 * 16 / 256)
  losses = _scalars(train_dir, "loss")
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  # Label-smoothed cross-entropy of 1000 classes near chance.
  for value in losses.values():
    assert math.isfinite(value)
    assert abs(value - math.log(1000)) < 0.5


def test_evaluator_scores_every_example_once_and_keeps_the_best(evaluated):
  checkpoint_dir, output = evaluated
  assert (f"Evaluation at step 6 on {_MOCK_EXAMPLES} examples of validation"
          in output)
  eval_dir = os.path.join(checkpoint_dir, "eval")
  assert _scalars(eval_dir, "num_examples") == {6: _MOCK_EXAMPLES}
  top_1 = _scalars(eval_dir, "top_1_acc")[6]
  top_5 = _scalars(eval_dir, "top_5_acc")[6]
  # Counts of examples out of 40, top-5 at least top-1.
  assert 0 <= top_1 <= top_5 <= 1
  assert top_5 * _MOCK_EXAMPLES == pytest.approx(
      round(top_5 * _MOCK_EXAMPLES), abs=1e-4)
  assert math.isfinite(_scalars(eval_dir, "loss")[6])
  best = os.path.join(checkpoint_dir, "checkpoints", "best")
  assert _steps(best) == [6]


def test_training_resumes_from_the_checkpoint(evaluated, tmp_path):
  checkpoint_dir, _ = evaluated
  # A copy, so that the order of the tests does not matter.
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(checkpoint_dir, resumed_dir)
  output = _run(resumed_dir, "--jaxline_mode=train",
                "--config.training_steps=8")
  assert "Returned checkpoint latest with id 6" in output
  assert "global_step: 7," in output and "global_step: 8," in output
  assert "global_step: 6," not in output
  assert _steps(os.path.join(resumed_dir, "checkpoints", "latest"))[-1] == 8
