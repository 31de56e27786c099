"""`--jaxline_dry_run`: one training step and one evaluation, then stop.

It catches the slow-to-find errors (a wrong shape, a key `evaluate` does not
return, a checkpoint entry that is not an array) in the time of one step,
writes nothing (in-memory state, no writer) and prints what a checkpoint
would hold and which scalars `step` and `evaluate` return.
"""

from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np

from jaxline import experiment as experiment_lib
from jaxline import rng as rng_lib
from jaxline import sharding
from jaxline import train
from jaxline import utils
from jaxline import writers


class _StopAfterFirstStep(Exception):
  pass


class _CaptureFirstStep:
  """A periodic action that keeps step 1's scalars and ends the loop."""

  def __init__(self):
    self.scalars = None

  def update_time(self, t: float, step: int) -> None:
    del t, step

  def __call__(self, t: float, step: int, scalar_outputs: Any) -> None:
    del t, step
    if self.scalars is not None:  # A custom should_run_step ran on.
      raise _StopAfterFirstStep()
    self.scalars = scalar_outputs

  def wait_to_finish(self) -> None:
    pass


def describe(tree: Any) -> list[str]:
  """`path: shape dtype` for every leaf of a snapshot, in order."""
  lines = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path) or "<root>"
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None:
      lines.append(f"{name}: {type(leaf).__name__} {leaf!r:.60}")
    else:
      lines.append(f"{name}: {tuple(shape)} {dtype}")
  return lines


def _keys(scalars: Mapping[str, Any]) -> str:
  return ", ".join(f"{k} {np.shape(v)}" for k, v in scalars.items()) or "(none)"


def dry_run(experiment_class: Callable[..., Any], config,
            print_fn: Callable[[str], None] = print) -> None:
  """Builds the experiment, runs one step and one evaluate; prints a report.

  Raises whatever the experiment raises, so a failing step fails the run.
  """
  writer = writers.NullWriter()
  train_key, init_key = rng_lib.train_and_init_keys(config)
  with utils.log_activity("dry run: experiment init"):
    experiment = train.build_experiment(experiment_class, "train", init_key,
                                        config)
  state = utils.InMemoryCheckpointer(config, "train").get_experiment_state(
      "dry_run")
  state.global_step = 0
  state.train_step_rng = experiment.initialize_train_step_rng(train_key)
  capture = _CaptureFirstStep()
  # The default should_run_step stops after one step; the capture action
  # stops a custom one.
  training_steps = config.training_steps
  config.training_steps = 1
  try:
    with utils.log_activity("dry run: one training step"):
      experiment.train_loop(config, state, (capture,), writer)
  except _StopAfterFirstStep:
    pass
  finally:
    config.training_steps = training_steps
  if capture.scalars is None:
    raise RuntimeError(
        "Dry run: train_loop ran no step (should_run_step(0, config) is "
        "False; is config.training_steps 0?).")
  step_scalars = {k: jax.device_get(v) for k, v in capture.scalars.items()}
  snapshot = experiment.snapshot_state()

  with utils.log_activity("dry run: evaluate"):
    eval_experiment = train.build_experiment(
        experiment_class, "eval", jax.random.PRNGKey(config.random_seed),
        config)
    eval_experiment.restore_from_snapshot(snapshot)
    sharded = experiment_lib.is_sharded(eval_experiment)
    step_value = np.asarray(1, np.int32)
    global_step = (sharding.replicate(step_value) if sharded else
                   utils.bcast_local_devices(step_value))
    eval_rng = (sharding.replicate(jax.random.PRNGKey(config.random_seed))
                if sharded else rng_lib.eval_keys(config))
    evaluate = utils.evaluate_should_return_dict(eval_experiment.evaluate)
    eval_scalars = {k: jax.device_get(v) for k, v in evaluate(
        global_step=global_step, rng=eval_rng, writer=writer).items()}

  lines = ["Dry run passed: one training step and one evaluate ran; nothing "
           "was written.", "Checkpoint entries (device 0's slice):"]
  lines += ["  " + line for line in describe(snapshot)] or ["  (none)"]
  lines.append(f"step() scalars: {_keys(step_scalars)}")
  lines.append(f"evaluate() scalars: {_keys(eval_scalars)}")
  logging.info("\n".join(lines))
  print_fn("\n".join(lines))
