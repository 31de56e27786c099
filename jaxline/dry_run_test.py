"""Tests for `jaxline.dry_run`, in process; tests/observability_test.py runs
`--jaxline_dry_run` from the command line."""

import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import pytest

from jaxline import base_config
from jaxline import dry_run
from jaxline import experiment
from jaxline import utils


class _Experiment(experiment.AbstractExperiment):
  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_count": "count"}
  built = []

  def __init__(self, mode, init_rng=None, fail=False):
    super().__init__(mode=mode, init_rng=init_rng)
    _Experiment.built.append(mode)
    self._fail = fail
    self._params = None  # Created lazily by the first step.
    self._count = 0

  def step(self, *, global_step, rng, writer):
    if self._fail:
      raise ValueError("bad shapes in step")
    if self._params is None:
      self._params = utils.bcast_local_devices(
          {"w": jnp.zeros([2, 3]), "b": jnp.zeros([3], jnp.bfloat16)})
    self._count += 1
    return {"loss": jnp.float32(1.0), "acc": np.zeros([2])}

  def evaluate(self, *, global_step, rng, writer):
    assert int(utils.get_first(global_step)) == 1
    return {"eval_loss": float(jnp.sum(utils.get_first(self._params)["w"]))}


def _config(**kwargs):
  config = base_config.get_base_config()
  config.experiment_kwargs = config_dict.ConfigDict(kwargs)
  return config


def test_one_step_one_evaluate_and_the_report():
  _Experiment.built.clear()
  lines = []
  dry_run.dry_run(_Experiment, _config(), print_fn=lines.append)
  (report,) = lines
  assert _Experiment.built == ["train", "eval"]
  assert "['params']['b']: (3,) bfloat16" in report
  assert "['params']['w']: (2, 3) float32" in report
  assert "['count']: int 1" in report
  assert "step() scalars: loss (), acc (2,)" in report
  assert "evaluate() scalars: eval_loss ()" in report


def test_a_failing_step_raises():
  with pytest.raises(ValueError, match="bad shapes in step"):
    dry_run.dry_run(_Experiment, _config(fail=True), print_fn=print)


def test_runs_one_step_whatever_training_steps_says():
  config = _config()
  config.training_steps = 0
  dry_run.dry_run(_Experiment, config, print_fn=lambda line: None)
  assert config.training_steps == 0


class _NeverRuns(_Experiment):

  def should_run_step(self, global_step, config):
    return False


def test_no_step_to_run_is_an_error():
  with pytest.raises(RuntimeError, match="ran no step"):
    dry_run.dry_run(_NeverRuns, _config(), print_fn=print)


def test_describe_lists_leaves_in_order():
  tree = {"a": jax.ShapeDtypeStruct((4,), jnp.int32), "b": [np.ones(2), 3]}
  assert dry_run.describe(tree) == [
      "['a']: (4,) int32", "['b'][0]: (2,) float64", "['b'][1]: int 3"]
