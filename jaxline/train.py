"""The training and evaluation loops.

`train` builds the experiment, restores the newest checkpoint, attaches the
periodic actions and runs `experiment.train_loop`. `evaluate` follows the
"latest" checkpoint series, evaluating each new checkpoint and keeping the
"best" series. Both read top to bottom; helpers sit below them.
"""

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

from jaxline import actions as actions_lib
from jaxline import experiment as experiment_lib
from jaxline import nonfinite
from jaxline import periodic
from jaxline import preemption
from jaxline import restore_checks
from jaxline import rng as rng_lib
from jaxline import sharding
from jaxline import utils
from jaxline import watchdog
from jaxline import writers

FLAGS = flags.FLAGS


@utils.disable_pmap_jit
def train(experiment_class: Callable[..., Any],
          config,
          checkpointer: utils.Checkpointer,
          writer: Optional[utils.Writer],
          periodic_actions: Sequence[utils.PeriodicAction] = (),
          *,
          stop_event: Optional[threading.Event] = None,
          on_start: Optional[Callable[[], None]] = None) -> None:
  """Trains `experiment_class` until `should_run_step` is False.

  SIGTERM/SIGINT (caught here when this is the main thread) or `stop_event`
  end training at the next step boundary with a save of "latest".
  `on_start` runs once the checkpoint (if any) is restored, before the first
  step: a run refused by its checkpoint never counts as started.
  """
  logging.info("Training with config:\n%s", config)
  is_chief = jax.process_index() == 0
  collective = _every_process_saves(checkpointer)
  is_checkpointer = config.train_checkpoint_all_hosts or is_chief or collective
  if collective and jax.process_count() > 1:
    _check_save_steps_agree(config)

  keys_compiled = experiment_lib.StepKeys.compile_ahead(experiment_class,
                                                        config)
  train_key, init_key = rng_lib.train_and_init_keys(config)
  with utils.log_activity("experiment init"):
    experiment = build_experiment(experiment_class, "train", init_key, config)

  state = checkpointer.get_experiment_state("latest")
  state.global_step = 0
  _assign(state, "experiment_module", experiment)
  state.train_step_rng = experiment.initialize_train_step_rng(train_key)

  restored = checkpointer.can_be_restored("latest")
  if restored:
    path = checkpointer.restore_path("latest")
    with utils.log_activity("checkpoint restore"):
      checkpointer.restore("latest")
    logging.info("Resuming training at global_step %d from checkpoint %s.",
                 state.global_step, path)
  if on_start is not None:
    on_start()
  if not experiment.should_run_step(state.global_step, config):
    logging.info("Nothing to train: global_step %d of training_steps %s is "
                 "done.", state.global_step, config.training_steps)

  stop_event = stop_event or threading.Event()
  guard = (nonfinite.NonFiniteGuard()
           if config.get("terminate_on_nan", True) else None)
  actions = actions_lib.harness_actions(config, writer, guard) + (
      tuple(periodic_actions) + actions_lib.default_actions(
          config, checkpointer, writer, is_chief, is_checkpointer, guard) +
      (preemption.StopOnSignal(stop_event),))
  for action in actions:
    action.update_time(time.time(), state.global_step)

  if is_checkpointer and config.save_initial_train_checkpoint and not restored:
    with utils.log_activity("first checkpoint"):
      checkpointer.save("latest")

  grace = watchdog.SignalGrace(config.get("preemption_grace_secs", 60.0),
                               writer=writer, step=lambda: state.global_step)
  keys_compiled()  # Not two compiles of one function at once.
  try:
    with preemption.catch_signals(stop_event, on_signal=grace.start):
      experiment.train_loop(config, state, actions, writer)
  except preemption.Preempted as e:
    logging.warning("Preempted at step %d; saving and exiting.", e.step)
  except periodic.StopTraining as e:
    logging.info("Training stopped at global_step %d by a periodic action%s; "
                 "saving and exiting.", state.global_step,
                 f" ({e})" if str(e) else "")
  except BaseException:
    # Keep what was logged; skip the final save of a state that failed.
    _finish_actions(actions, raise_errors=False)
    writers.flush_writer(writer)
    raise
  finally:
    grace.cancel()

  try:
    if guard is not None:
      try:
        guard.check_before_save()
      except nonfinite.NonFiniteError as e:
        logging.error("%s", e)  # Found here, outside any logged activity.
        raise
    if is_checkpointer:
      with utils.log_activity("final checkpoint"):
        checkpointer.save("latest")
        checkpointer.wait_for_checkpointing_to_finish()
  except BaseException:
    _finish_actions(actions, raise_errors=False)
    writers.flush_writer(writer)
    raise
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
  experiment = build_experiment(experiment_class, jaxline_mode, eval_key,
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
        except restore_checks.CheckpointUnavailableError as e:
          logging.warning("%s Skipping it; looking for the next one.", e)
          continue

      step_value = np.asarray(state.global_step, np.int32)
      global_step = (sharding.replicate(step_value) if sharded else
                     utils.bcast_local_devices(step_value))
      scalars = writers.writable_scalars(evaluate_fn(
          global_step=global_step, rng=eval_rng, writer=writer))
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


def build_experiment(experiment_class, mode: str, init_rng, config):
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
        f"returned: {sorted(scalars)} (None values are left out). Fix the "
        "key in the config, or return a number for it.")
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
