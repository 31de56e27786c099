"""The training and evaluation loops.

`train` builds the experiment, restores the newest checkpoint, attaches the
periodic actions and runs `experiment.train_loop`. `evaluate` follows the
"latest" checkpoint series, evaluating each new checkpoint and keeping the
"best" series. Both read top to bottom; helpers sit below them.
"""

import datetime
import functools
import inspect
import math
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_dict
import numpy as np

from jaxline import checkpointing
from jaxline import experiment as experiment_lib
from jaxline import preemption
from jaxline import rng as rng_lib
from jaxline import sharding
from jaxline import utils
from jaxline import writers

FLAGS = flags.FLAGS


@utils.disable_pmap_jit
def train(experiment_class: Callable[..., Any],
          config,
          checkpointer: utils.Checkpointer,
          writer: Optional[utils.Writer],
          periodic_actions: Sequence[utils.PeriodicAction] = (),
          *,
          stop_event: Optional[threading.Event] = None) -> None:
  """Trains `experiment_class` until `should_run_step` is False.

  SIGTERM/SIGINT (caught here when this is the main thread) or `stop_event`
  end training at the next step boundary with a save of "latest".
  """
  logging.info("Training with config:\n%s", config)
  is_chief = jax.process_index() == 0
  collective = _every_process_saves(checkpointer)
  is_checkpointer = config.train_checkpoint_all_hosts or is_chief or collective
  if collective and jax.process_count() > 1:
    _check_save_steps_agree(config)

  train_key, init_key = rng_lib.train_and_init_keys(config)
  with utils.log_activity("experiment init"):
    experiment = _build_experiment(experiment_class, "train", init_key, config)

  state = checkpointer.get_experiment_state("latest")
  state.global_step = 0
  _assign(state, "experiment_module", experiment)
  state.train_step_rng = experiment.initialize_train_step_rng(train_key)

  restored = checkpointer.can_be_restored("latest")
  if restored:
    with utils.log_activity("checkpoint restore"):
      checkpointer.restore("latest")

  stop_event = stop_event or threading.Event()
  actions = tuple(periodic_actions) + _default_actions(
      config, checkpointer, writer, is_chief, is_checkpointer) + (
          preemption.StopOnSignal(stop_event),)
  for action in actions:
    action.update_time(time.time(), state.global_step)

  if is_checkpointer and config.save_initial_train_checkpoint and not restored:
    with utils.log_activity("first checkpoint"):
      checkpointer.save("latest")

  try:
    with preemption.catch_signals(stop_event):
      experiment.train_loop(config, state, actions, writer)
  except preemption.Preempted as e:
    logging.warning("Preempted at step %d; saving and exiting.", e.step)
  except BaseException:
    # Keep what was logged; skip the final save of a state that failed.
    _finish_actions(actions, raise_errors=False)
    writers.flush_writer(writer)
    raise

  if is_checkpointer:
    with utils.log_activity("final checkpoint"):
      checkpointer.save("latest")
      checkpointer.wait_for_checkpointing_to_finish()
  _finish_actions(actions, raise_errors=True)
  writers.flush_writer(writer, raise_errors=True)
  utils.rendezvous()


@utils.disable_pmap_jit
def evaluate(experiment_class: Callable[..., Any],
             config,
             checkpointer: utils.Checkpointer,
             writer: Optional[utils.Writer],
             jaxline_mode: Optional[str] = None,
             *,
             stop_event: Optional[threading.Event] = None) -> None:
  """Evaluates each new "latest" checkpoint until training is done.

  `stop_event`, when set, ends the poll loop at its next wait: the
  multithreaded mode uses it when the training thread fails.
  """
  if jaxline_mode is None:
    jaxline_mode = FLAGS.jaxline_mode
  logging.info("Evaluating with config:\n%s", config)
  eval_key = jax.random.PRNGKey(config.random_seed)
  experiment = _build_experiment(experiment_class, jaxline_mode, eval_key,
                                 config)
  poll_secs = float(config.get("eval_poll_interval_secs", 10.0))
  evaluate_fn = utils.evaluate_should_return_dict(experiment.evaluate)

  track_best = bool(config.best_model_eval_metric) and bool(
      config.best_checkpoint_all_hosts or jax.process_index() == 0 or
      _every_process_saves(checkpointer))
  higher_is_better = config.best_model_eval_metric_higher_is_better
  if track_best:
    best_state = checkpointer.get_experiment_state("best")
    best_state.best_eval_metric_value = (-math.inf if higher_is_better
                                         else math.inf)
    best_state.best_model_eval_metric = config.best_model_eval_metric
    _assign(best_state, "experiment_module", experiment)
    if checkpointer.can_be_restored("best"):
      with utils.log_activity("best checkpoint restore"):
        checkpointer.restore("best")

  state = checkpointer.get_experiment_state("latest")
  state.global_step = 0
  _assign(state, "experiment_module", experiment)
  state.train_step_rng = None
  sharded = experiment_lib.is_sharded(experiment)
  if sharded:  # One replicated key, no device axis.
    eval_rng = sharding.replicate(eval_key)
  else:
    eval_rng = rng_lib.eval_keys(config)

  prev_path = None
  initial_weights_done = False
  try:
    while True:
      path = checkpointer.restore_path("latest")
      if config.one_off_evaluate:
        if checkpointer.can_be_restored("latest"):
          with utils.log_activity("one off evaluate checkpoint restore"):
            checkpointer.restore("latest")
        elif config.eval_initial_weights:
          logging.info("Evaluating initial weights (no checkpoint yet).")
        else:
          raise ValueError(
              "Checkpoint invalid and eval_initial_weights set to False")
      elif (path is None and config.eval_initial_weights and
            not initial_weights_done):
        initial_weights_done = True
        logging.info("Evaluating initial weights (no checkpoint yet).")
      elif (path is None or path == prev_path or
            not checkpointer.can_be_restored("latest")):
        logging.info("Checkpoint %s invalid or already evaluated, waiting %ss.",
                     path, poll_secs)
        if _wait(stop_event, poll_secs):
          logging.info("Evaluation stopped: training ended early.")
          return
        continue
      else:
        try:
          checkpointer.restore("latest")
        except checkpointing.CheckpointUnavailableError as e:
          logging.warning("%s Skipping it; looking for the next one.", e)
          continue

      step_value = np.asarray(state.global_step, np.int32)
      global_step = (sharding.replicate(step_value) if sharded else
                     utils.bcast_local_devices(step_value))
      scalars = evaluate_fn(global_step=global_step, rng=eval_rng,
                            writer=writer)
      logging.info("Evaluated step %d: %s", state.global_step,
                   jax.tree.map(_as_python, jax.device_get(dict(scalars))))
      if writer is not None:
        writer.write_scalars(state.global_step, scalars)
      prev_path = path

      if track_best:
        _maybe_save_best(config, checkpointer, experiment, state, best_state,
                         scalars)
      if config.one_off_evaluate or not experiment.should_run_step(
          state.global_step, config):
        logging.info("Last checkpoint (iteration %d) evaluated, exiting.",
                     state.global_step)
        break
  finally:
    checkpointer.wait_for_checkpointing_to_finish()
    writers.flush_writer(writer)


def _every_process_saves(checkpointer: Any) -> bool:
  """Whether saves are collective (the disk checkpointer's are)."""
  return bool(getattr(checkpointer, "every_process_saves", False))


def _check_save_steps_agree(config) -> None:
  """Collective saves need every process to save at the same step."""
  interval_type = config.checkpoint_interval_type or config.interval_type
  interval = config.save_checkpoint_interval
  if interval is not None and interval > 0 and interval_type != "steps":
    raise ValueError(
        "In a job of several processes every process takes part in each "
        "checkpoint save, so all must save at the same step; a time interval "
        f"(interval_type {interval_type!r}) fires at different steps on each. "
        "Set config.checkpoint_interval_type = 'steps' and "
        "config.save_checkpoint_interval to a number of steps.")


def _assign(state, name: str, value: Any) -> None:
  """Sets a live-state field even if it held another type before.

  ConfigDict fields are type-safe, so a second experiment class run in the
  same thread (in-memory state persists) would otherwise be rejected.
  """
  try:
    setattr(state, name, value)
  except TypeError:
    if not isinstance(state, config_dict.ConfigDict):
      raise
    with state.unlocked():
      del state[name]
      state[name] = value


def _build_experiment(experiment_class, mode: str, init_rng, config):
  """Calls the constructor as 0.0.8 did: `init_rng` only if it is accepted.

  Then marks the instance with `config.experiment_style`, which the base
  class's loop, key and snapshot methods follow.
  """
  style = config.get("experiment_style", "pmap")
  if style not in ("pmap", "sharded"):
    raise ValueError(f"config.experiment_style={style!r}; use 'pmap' (the "
                     "default) or 'sharded'.")
  kwargs = config.experiment_kwargs
  if "init_rng" in inspect.signature(experiment_class).parameters:
    experiment = experiment_class(mode, init_rng=init_rng, **kwargs)
  else:
    logging.warning(
        "%s does not take an init_rng argument; this is deprecated. Accept "
        "init_rng in __init__ to get a reproducible initialisation key.",
        getattr(experiment_class, "__name__", experiment_class))
    experiment = experiment_class(mode, **kwargs)
  if style != "pmap":
    setattr(experiment, experiment_lib.STYLE_ATTR, style)
  return experiment


def _default_actions(config, checkpointer, writer, is_chief: bool,
                     is_checkpointer: bool) -> tuple[utils.PeriodicAction, ...]:
  """The stdout log, the periodic save and the writer, as 0.0.8 made them."""
  ratios = config.periodic_action_growth_ratios
  logging_type = config.logging_interval_type or config.interval_type
  checkpoint_type = config.checkpoint_interval_type or config.interval_type
  actions = []
  if config.log_tensors_interval is not None:
    actions.append(utils.PeriodicAction(
        functools.partial(_log_outputs, training_steps=config.training_steps),
        interval_type=logging_type,
        interval=config.log_tensors_interval,
        run_async=config.log_async,
        logging_growth_ratios=ratios))
  interval = config.save_checkpoint_interval
  if is_checkpointer and interval is not None and interval > 0:
    actions.append(utils.PeriodicAction(
        lambda step, scalars: checkpointer.save("latest"),
        interval_type=checkpoint_type,
        interval=interval,
        run_async=False,
        logging_growth_ratios=ratios))
  if ((is_chief or config.log_all_hosts) and writer is not None and
      config.log_train_data_interval is not None):
    actions.append(utils.PeriodicAction(
        writer.write_scalars,
        interval_type=logging_type,
        interval=config.log_train_data_interval,
        run_async=True,
        log_all_data=config.log_all_train_data,
        logging_growth_ratios=ratios,
        end_step_to_action=config.training_steps))
  return tuple(actions)


def _log_outputs(step: int, scalar_values: Mapping[str, Any], *,
                 training_steps: Optional[int]) -> None:
  """The progress line: 0.0.8's text, then steps/sec and an ETA."""
  scalars = jax.tree.map(
      lambda x: x.tolist() if isinstance(x, np.ndarray) else x,
      scalar_values)
  rate = scalar_values.get("steps_per_sec")
  if training_steps and rate:
    eta = datetime.timedelta(seconds=round(
        max(training_steps - step, 0) / float(rate)))
    logging.info("global_step: %d, %s [%.2f steps/sec, ETA %s]", step,
                 scalars, float(rate), eta)
  else:
    logging.info("global_step: %d, %s", step, scalars)


def _as_python(x: Any) -> Any:
  return x.tolist() if isinstance(x, np.ndarray) else x


def _finish_actions(actions, *, raise_errors: bool) -> None:
  first_error = None
  for action in actions:
    try:
      action.wait_to_finish()
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("A periodic action failed.")
      first_error = first_error or e
  if raise_errors and first_error is not None:
    raise first_error


def _wait(stop_event: Optional[threading.Event], secs: float) -> bool:
  """Sleeps `secs`; returns True at once if `stop_event` is set."""
  if stop_event is None:
    time.sleep(secs)
    return False
  return stop_event.wait(secs)


def _maybe_save_best(config, checkpointer, experiment, state, best_state,
                     scalars: Mapping[str, Any]) -> None:
  """Saves "best" when the tracked metric strictly improves."""
  key = config.best_model_eval_metric
  if key not in scalars:
    raise ValueError(
        f"best_model_eval_metric {key!r} is not among the scalars evaluate() "
        f"returned: {sorted(scalars)}. Fix the key in the config.")
  value = np.asarray(jax.device_get(scalars[key]))
  if value.size != 1:
    raise ValueError(f"best_model_eval_metric {key!r} must be a scalar, got "
                     f"shape {value.shape}.")
  value = float(value.reshape(()))
  if jax.process_count() > 1 and _every_process_saves(checkpointer):
    # The save is collective: every process must take the same decision.
    value = float(multihost_utils.broadcast_one_to_all(np.float64(value)))
  previous = best_state.best_eval_metric_value
  if config.best_model_eval_metric_higher_is_better:
    better = value > previous
  else:
    better = value < previous
  if not better:  # NaN compares False both ways.
    return
  logging.info("%s: %s %s %s, saving new best checkpoint.", key, value,
               ">" if config.best_model_eval_metric_higher_is_better else "<",
               previous)
  best_state.global_step = state.global_step
  best_state.experiment_module = experiment
  best_state.best_eval_metric_value = value
  best_state.train_step_rng = state.train_step_rng
  experiment.on_new_best_model(best_state)
  checkpointer.save("best")
