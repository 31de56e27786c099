"""The periodic actions `train` attaches around the user's own.

Before them: the non-finite guard, the hang watchdog and the profiler, which
must see every step first. After them, as 0.0.8 made them: the progress
line, the periodic save and the writer.
"""

from typing import Any, Mapping, Optional

from jaxline import nonfinite
from jaxline import profiling
from jaxline import progress
from jaxline import utils
from jaxline import watchdog
from jaxline import writers


def harness_actions(config, writer, guard) -> tuple[Any, ...]:
  """Actions called before the user's: the guard, watchdog and profiler."""
  actions = []
  if guard is not None:
    actions.append(guard)
  timeout = config.get("step_timeout_secs", None)
  if timeout is not None:
    actions.append(watchdog.StepWatchdog(timeout, writer=writer))
  start = config.get("profile_start_step", None)
  if start is not None:
    actions.append(profiling.ProfileSteps(
        start_step=start, num_steps=config.get("profile_num_steps", 5),
        logdir=profiling.profile_dir(config)))
  return tuple(actions)


def default_actions(config, checkpointer, writer, is_chief: bool,
                     is_checkpointer: bool,
                     guard: Optional[nonfinite.NonFiniteGuard] = None,
                     ) -> tuple[utils.PeriodicAction, ...]:
  """The stdout log, the periodic save and the writer, as 0.0.8 made them.

  With a non-finite guard, the log and writer check the scalars they fetch,
  and a save first waits for those checks and checks its own step.
  """
  ratios = config.periodic_action_growth_ratios
  logging_type = config.logging_interval_type or config.interval_type
  checkpoint_type = config.checkpoint_interval_type or config.interval_type
  checked = guard.checked if guard is not None else (lambda fn: fn)
  stdout = writes = save_action = None
  if config.log_tensors_interval is not None:
    stdout = progress.ProgressLogger(
        training_steps=config.training_steps,
        interval_type=logging_type,
        interval=config.log_tensors_interval,
        run_async=config.log_async,
        logging_growth_ratios=ratios,
        fn_wrapper=checked)
  if ((is_chief or config.log_all_hosts) and writer is not None and
      config.log_train_data_interval is not None):
    def write(step: int, scalars: Mapping[str, Any]) -> None:
      # Any writer from a writer_factory, not only jaxline's own.
      writer.write_scalars(step, writers.writable_scalars(scalars))

    writes = utils.PeriodicAction(
        checked(write),
        interval_type=logging_type,
        interval=config.log_train_data_interval,
        run_async=True,
        log_all_data=config.log_all_train_data,
        logging_growth_ratios=ratios,
        end_step_to_action=config.training_steps)

  def save(step: int, scalars: Mapping[str, Any]) -> None:
    if guard is not None:
      for log in (stdout, writes):  # Their checks of earlier steps first.
        if log is not None:
          log.wait_to_finish()
      guard.check(step, scalars)
    checkpointer.save("latest")

  interval = config.save_checkpoint_interval
  if is_checkpointer and interval is not None and interval > 0:
    save_action = utils.PeriodicAction(
        save,
        interval_type=checkpoint_type,
        interval=interval,
        run_async=False,
        logging_growth_ratios=ratios)
  return tuple(a for a in (stdout, save_action, writes) if a is not None)
