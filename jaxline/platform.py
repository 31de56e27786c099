"""The entry point: flags, config validation and the choice of mode.

A user's experiment file ends with

    if __name__ == "__main__":
      flags.mark_flag_as_required("config")
      app.run(functools.partial(platform.main, Experiment))

and runs as `python experiment.py --config=experiment.py`.
"""

import importlib
import os
import shlex
import sys
import threading
from typing import Any, Callable, Optional, Sequence

from absl import flags
from absl import logging
import jax
from ml_collections import config_dict
from ml_collections import config_flags

from jaxline import base_config
from jaxline import config_code
from jaxline import distributed
from jaxline import dry_run
from jaxline import nonfinite
from jaxline import preemption
from jaxline import run_config
from jaxline import train
from jaxline import utils
from jaxline import writers

TensorBoardLogger = writers.TensorBoardLogger

FLAGS = flags.FLAGS

# Modules this one used to import at the top, still reachable as attributes
# (`platform.chex` as in 0.0.8), but imported on first use: Orbax and chex
# add start-up time that most runs never need (issue 12).
_LAZY_MODULES = {"checkpointing": "jaxline.checkpointing", "chex": "chex"}


def __getattr__(name: str) -> Any:
  if name in _LAZY_MODULES:
    return importlib.import_module(_LAZY_MODULES[name])
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CONFIG = config_flags.DEFINE_config_file(
    "config", help_string="Training configuration file.")
_MODE = flags.DEFINE_string(
    "jaxline_mode", "train",
    "'train', 'eval' (or any mode starting with 'eval'), or "
    "'train_eval_multithreaded'.")
_TPU_DRIVER = flags.DEFINE_string(
    "jaxline_tpu_driver", "", "Unsupported: tpu_driver no longer exists.")
_ENSURE_TPU = flags.DEFINE_bool(
    "jaxline_ensure_tpu", False, "Fail unless a TPU is available.")
_DRY_RUN = flags.DEFINE_bool(
    "jaxline_dry_run", False,
    "Build the experiment, run one training step and one evaluate, print the "
    "checkpoint entries and scalar keys, and exit; writes nothing.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "jaxline_print_config", False,
    "Print the resolved config (defaults filled in, overrides applied) as a "
    "config file whose get_config() rebuilds it, and exit.")
_COORDINATOR = flags.DEFINE_string(
    "jaxline_coordinator_address", None,
    "host:port of process 0, for multi-process runs (jax.distributed). "
    "Without it, JAX's cluster auto-detection is used if a cluster is found.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "jaxline_num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer(
    "jaxline_process_id", None, "This process's index, in [0, processes).")

VALID_MODES = ("train", "eval", "eval_*", "train_eval_multithreaded")


# Marks an error raised while the config file itself loads (in the user's
# get_config), which must not be reported as a bad override.
_FROM_CONFIG_FILE = "_jaxline_raised_by_config_file"


def _short_override_errors(flag: flags.Flag) -> None:
  """Makes a bad `--config.<key>=...` a two-line error, not a traceback.

  ml_collections raises AttributeError/KeyError for an unknown key (with a
  "Did you mean" suggestion); absl prints its own flag errors in two lines.
  """
  parse = flag._parse  # pylint: disable=protected-access

  def short_parse(argument):
    try:
      return parse(argument)
    except (AttributeError, KeyError) as e:
      if getattr(e, _FROM_CONFIG_FILE, False):
        raise  # The user's get_config failed: keep its traceback.
      text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
      text = " ".join(line.strip(" '\"") for line in text.splitlines())
      raise flags.IllegalFlagValueError(
          f"a --config override names a key the config does not have: "
          f"{text}") from None

  flag._parse = short_parse  # pylint: disable=protected-access


def _accept_optional_key_overrides(flag: flags.Flag) -> None:
  """Lets `--config.<optional key>=...` work on configs that lack the key.

  Optional keys (`base_config.OPTIONAL_KEYS`, such as `terminate_on_nan`) are
  not in 0.0.8-era configs, and ml_collections only overrides keys that
  exist. Each one named by an override is added, with its default and type,
  after the config file is loaded and before the overrides are applied.
  """
  parser = flag.parser
  parse = parser.parse

  def parse_and_add_keys(argument):
    try:
      config = parse(argument)
    except Exception as e:  # pylint: disable=broad-except
      setattr(e, _FROM_CONFIG_FILE, True)
      raise
    try:
      overrides = flag._GetOverrides(flag._GetArgv())  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except  # Reported by _parse.
      return config
    if isinstance(config, config_dict.ConfigDict):
      base_config.add_optional_keys(
          config, [o.split(".")[0] for o in overrides])
    return config

  parser.parse = parse_and_add_keys


_short_override_errors(FLAGS["config"])
_accept_optional_key_overrides(FLAGS["config"])


def _command() -> str:
  """The command line, as a user would retype it."""
  argv = list(sys.argv)
  program = argv[0] if argv else ""
  if os.path.basename(program) == "__main__.py":
    package = os.path.basename(os.path.dirname(os.path.abspath(program)))
    head = ["python", "-m", package]
  else:
    if os.path.isabs(program) and os.path.abspath(program).startswith(
        os.getcwd() + os.sep):
      program = os.path.relpath(program)
    head = ["python", program]
  rest = [a for a in argv[1:] if not a.startswith(
      ("--jaxline_print_config", "--nojaxline_print_config"))]
  return shlex.join(head + rest)


def config_as_python(config: config_dict.ConfigDict) -> str:
  """The resolved `config` of this command line as a config file.

  Keys set with `--config.<key>=` and keys jaxline fills in are marked.
  """
  flag = FLAGS["config"]
  source = config_flags.get_config_filename(flag) if flag.present else None
  command_line = (list(config_flags.get_override_values(flag))
                  if flag.present else [])
  if config.get("experiment_class", None):
    run = "python -m jaxline --config=<this file>"
  else:
    run = "python <your experiment>.py --config=<this file>"
  notes = [f"From: {_command()}", f"Run it again with: {run}"]
  return config_code.as_python(
      config, command_line=command_line,
      defaults=base_config.missing_defaults(config),
      title=(f"The resolved config of {source}." if source else
             "A resolved jaxline config."), notes=notes)


def _record_config(config: config_dict.ConfigDict, mode: str) -> None:
  """The chief keeps the run's config in its checkpoint_dir."""
  if jax.process_index() != 0 or not config.get("checkpoint_dir", ""):
    return
  try:
    run_config.record(config, mode=mode, python_text=config_as_python(config),
                      defaults=base_config.missing_defaults(config))
  except Exception:  # pylint: disable=broad-except
    # A record is for people; a config it cannot write must not cost a run.
    logging.exception("Could not record the config of this run; going on.")


def create_checkpointer(config, mode: str) -> utils.Checkpointer:
  """The default checkpointer factory.

  On disk (Orbax) when `config.checkpoint_dir` is set, so runs resume and a
  separate eval job can follow training; in memory otherwise, as in 0.0.8,
  or when `config.checkpoint_backend = "memory"`. A "latest" snapshot that
  the user put into `utils.GLOBAL_CHECKPOINT_DICT` before `main` (0.0.8's
  way to start from given weights, as ogb_lsc does) also means in memory:
  it is what they asked to restore, and they read the history afterwards.
  """
  if not config.get("checkpoint_dir", ""):
    return utils.InMemoryCheckpointer(config, mode)
  if config.get("checkpoint_backend", "disk") == "memory":
    return utils.InMemoryCheckpointer(config, mode)
  seeded = utils.GLOBAL_CHECKPOINT_DICT.get("latest")
  if seeded is not None and getattr(seeded, "history", None):
    logging.warning(
        "utils.GLOBAL_CHECKPOINT_DICT['latest'] holds a snapshot set before "
        "platform.main: restoring it and keeping checkpoints in memory, as "
        "jaxline 0.0.8 did (checkpoint_dir %s gets the logs only). Set "
        "config.checkpoint_backend='memory' to say so and silence this.",
        config.checkpoint_dir)
    return utils.InMemoryCheckpointer(config, mode)
  # Orbax is imported only now (see `__getattr__`).
  from jaxline import checkpointing  # pylint: disable=g-import-not-at-top
  return checkpointing.DiskCheckpointer(config, mode)


def create_writer(config, mode: str) -> Any:
  """The default writer factory: TensorBoard under `checkpoint_dir/mode`."""
  if not config.get("checkpoint_dir", ""):
    logging.warning("config.checkpoint_dir is not set, so no TensorBoard logs "
                    "will be written. Set it to keep them.")
    return writers.NullWriter()
  if jax.process_index() != 0 and not config.log_all_hosts:
    return writers.NullWriter()  # The chief writes the logs.
  return TensorBoardLogger(config, mode)


class _StopWhenSet:
  """An action that ends training at the next step once `event` is set."""

  def __init__(self, event: threading.Event):
    self._event = event

  def update_time(self, t: float, step: int) -> None:
    del t, step

  def __call__(self, t: float, step: int, scalar_outputs: Any) -> None:
    if self._event.is_set():
      raise RuntimeError(f"Training stopped at step {step}: evaluation failed.")

  def wait_to_finish(self) -> None:
    pass


def _close(writer: Any) -> None:
  close = getattr(writer, "close", None)
  if callable(close):
    close()


def _run_train(experiment_class, config, checkpointer_factory, writer_factory,
               periodic_actions=(), stop_event=None) -> None:
  """Trains with the factories' checkpointer and writer, closing both."""
  checkpointer = checkpointer_factory(config, "train")
  writer = writer_factory(config, "train")
  try:
    # Recorded once the checkpoint is restored: a second trainer started by
    # mistake (refused by the directory's claim) or a run whose checkpoint
    # does not fit must not replace the record of the run that trained.
    train.train(experiment_class, config, checkpointer, writer,
                periodic_actions=periodic_actions, stop_event=stop_event,
                on_start=lambda: _record_config(config, "train"))
  finally:
    _close(writer)
    _close(checkpointer)


def _run_eval(experiment_class, config, checkpointer_factory, writer_factory,
              mode: str, jaxline_mode: Optional[str], stop_event=None,
              record: bool = True) -> None:
  checkpointer = checkpointer_factory(config, mode)
  if record:
    _record_config(config, mode)
  writer = writer_factory(config, mode)
  try:
    train.evaluate(experiment_class, config, checkpointer, writer,
                   jaxline_mode, stop_event=stop_event)
  finally:
    _close(writer)
    _close(checkpointer)


def _train_eval_multithreaded(experiment_class, config, checkpointer_factory,
                              writer_factory, periodic_actions=()) -> None:
  """Trains in a thread and evaluates here; a failure in either stops both.

  A preemption signal, caught here in the main thread, stops training with a
  save and then ends evaluation.
  """
  preempted = threading.Event()
  train_stopped = threading.Event()  # Failed or preempted: eval stops too.
  eval_failed = threading.Event()
  train_errors = []

  def train_thread():
    try:
      _run_train(experiment_class, config, checkpointer_factory,
                 writer_factory, periodic_actions=tuple(periodic_actions) + (
                     _StopWhenSet(eval_failed),),
                 stop_event=preempted)
    except BaseException as e:  # pylint: disable=broad-except
      train_errors.append(e)
    finally:
      if train_errors or preempted.is_set():
        train_stopped.set()

  thread = threading.Thread(target=train_thread, name="jaxline_train")
  thread.start()
  try:
    # jaxline_mode is not passed on: the eval experiment's mode is
    # "train_eval_multithreaded", as in 0.0.8.
    with preemption.catch_signals(preempted):
      _run_eval(experiment_class, config, checkpointer_factory,
                writer_factory, "eval", None, stop_event=train_stopped,
                record=False)  # Training's record is this job's.
  except BaseException:
    eval_failed.set()
    thread.join()
    raise
  thread.join()
  if train_errors:
    raise train_errors[0]


def main(experiment_class: Callable[..., Any],
         argv: Any,
         checkpointer_factory: Callable[..., utils.Checkpointer] = (
             create_checkpointer),
         writer_factory: Optional[Callable[..., Any]] = None,
         *,
         periodic_actions: Sequence[Any] = ()) -> None:
  """Runs `experiment_class` in the mode given by --jaxline_mode.

  `periodic_actions` (for example `utils.PeriodicAction`s, which may raise
  `utils.StopTraining` to stop early) run after each training step, before
  jaxline's own logging and saving.
  """
  try:
    _main(experiment_class, argv, checkpointer_factory, writer_factory,
          tuple(periodic_actions))
  except Exception as e:  # pylint: disable=broad-except
    distributed.exit_on_error_if_multiprocess(e)
    if isinstance(e, nonfinite.NonFiniteError):
      # Already logged once, with its traceback, where training stopped.
      logging.flush()
      raise SystemExit(1) from None
    raise
  distributed.mark_finished()


@utils.debugger_fallback
def _main(experiment_class: Callable[..., Any],
          argv: Any,
          checkpointer_factory: Callable[..., utils.Checkpointer],
          writer_factory: Optional[Callable[..., Any]],
          periodic_actions: Sequence[Any]) -> None:
  del argv
  if not FLAGS.is_parsed():
    FLAGS(sys.argv)
  config = FLAGS.config
  if config is None:
    raise ValueError("No config given: pass --config=path/to/config.py "
                     "(a file defining get_config()).")
  base_config.validate_config(config)
  if FLAGS.jaxline_print_config:
    print(config_as_python(config), end="")
    return
  if FLAGS.jaxline_tpu_driver:
    raise ValueError(
        "--jaxline_tpu_driver is no longer supported: JAX removed the "
        "tpu_driver backend. Run on the TPU VM itself and drop the flag.")
  distributed.initialize(FLAGS.jaxline_coordinator_address,
                         FLAGS.jaxline_num_processes, FLAGS.jaxline_process_id)
  if FLAGS.jaxline_ensure_tpu:
    import chex  # pylint: disable=g-import-not-at-top  # See __getattr__.
    chex.assert_tpu_available()
  if FLAGS.jaxline_dry_run:
    dry_run.dry_run(experiment_class, config)
    return
  if writer_factory is None:
    writer_factory = create_writer

  mode = FLAGS.jaxline_mode
  if mode == "train":
    _run_train(experiment_class, config, checkpointer_factory, writer_factory,
               periodic_actions=periodic_actions)
  elif mode.startswith("eval"):
    _run_eval(experiment_class, config, checkpointer_factory, writer_factory,
              mode, mode)
  elif mode == "train_eval_multithreaded":
    _train_eval_multithreaded(experiment_class, config, checkpointer_factory,
                              writer_factory, periodic_actions)
  else:
    raise ValueError(f"Mode {mode} not recognized. Valid modes: "
                     f"{', '.join(VALID_MODES)}.")
