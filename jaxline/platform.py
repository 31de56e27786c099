"""The entry point: flags, config validation and the choice of mode.

A user's experiment file ends with

    if __name__ == "__main__":
      flags.mark_flag_as_required("config")
      app.run(functools.partial(platform.main, Experiment))

and runs as `python experiment.py --config=experiment.py`.
"""

import copy
import sys
import threading
from typing import Any, Callable, Optional

from absl import flags
from absl import logging
import chex
import jax
from ml_collections import config_flags

from jaxline import base_config
from jaxline import checkpointing
from jaxline import distributed
from jaxline import preemption
from jaxline import train
from jaxline import utils
from jaxline import writers

TensorBoardLogger = writers.TensorBoardLogger

FLAGS = flags.FLAGS

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
_PRINT_CONFIG = flags.DEFINE_bool(
    "jaxline_print_config", False,
    "Print the fully resolved config (defaults filled in) and exit.")
_COORDINATOR = flags.DEFINE_string(
    "jaxline_coordinator_address", None,
    "host:port of process 0, for multi-process runs (jax.distributed). "
    "Without it, JAX's cluster auto-detection is used if a cluster is found.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "jaxline_num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer(
    "jaxline_process_id", None, "This process's index, in [0, processes).")

VALID_MODES = ("train", "eval", "eval_*", "train_eval_multithreaded")


def create_checkpointer(config, mode: str) -> utils.Checkpointer:
  """The default checkpointer factory.

  On disk (Orbax) when `config.checkpoint_dir` is set, so runs resume and a
  separate eval job can follow training; in memory otherwise, as in 0.0.8.
  """
  if config.get("checkpoint_dir", ""):
    return checkpointing.DiskCheckpointer(config, mode)
  return utils.InMemoryCheckpointer(config, mode)


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
  checkpointer = checkpointer_factory(config, "train")
  writer = writer_factory(config, "train")
  try:
    train.train(experiment_class, config, checkpointer, writer,
                periodic_actions=periodic_actions, stop_event=stop_event)
  finally:
    _close(writer)
    _close(checkpointer)


def _run_eval(experiment_class, config, checkpointer_factory, writer_factory,
              mode: str, jaxline_mode: Optional[str], stop_event=None) -> None:
  checkpointer = checkpointer_factory(config, mode)
  writer = writer_factory(config, mode)
  try:
    train.evaluate(experiment_class, config, checkpointer, writer,
                   jaxline_mode, stop_event=stop_event)
  finally:
    _close(writer)
    _close(checkpointer)


def _train_eval_multithreaded(experiment_class, config, checkpointer_factory,
                              writer_factory) -> None:
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
                 writer_factory, periodic_actions=(_StopWhenSet(eval_failed),),
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
                writer_factory, "eval", None, stop_event=train_stopped)
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
         writer_factory: Optional[Callable[..., Any]] = None) -> None:
  """Runs `experiment_class` in the mode given by --jaxline_mode."""
  try:
    _main(experiment_class, argv, checkpointer_factory, writer_factory)
  except Exception as e:  # pylint: disable=broad-except
    distributed.exit_on_error_if_multiprocess(e)
    raise
  distributed.mark_finished()


@utils.debugger_fallback
def _main(experiment_class: Callable[..., Any],
         argv: Any,
         checkpointer_factory: Callable[..., utils.Checkpointer] = (
             create_checkpointer),
         writer_factory: Optional[Callable[..., Any]] = None) -> None:
  del argv
  if not FLAGS.is_parsed():
    FLAGS(sys.argv)
  config = FLAGS.config
  if config is None:
    raise ValueError("No config given: pass --config=path/to/config.py "
                     "(a file defining get_config()).")
  base_config.validate_config(config)
  if FLAGS.jaxline_print_config:
    print(base_config.resolve(copy.deepcopy(config)))
    return
  if FLAGS.jaxline_tpu_driver:
    raise ValueError(
        "--jaxline_tpu_driver is no longer supported: JAX removed the "
        "tpu_driver backend. Run on the TPU VM itself and drop the flag.")
  distributed.initialize(FLAGS.jaxline_coordinator_address,
                         FLAGS.jaxline_num_processes, FLAGS.jaxline_process_id)
  if FLAGS.jaxline_ensure_tpu:
    chex.assert_tpu_available()
  if writer_factory is None:
    writer_factory = create_writer

  mode = FLAGS.jaxline_mode
  if mode == "train":
    _run_train(experiment_class, config, checkpointer_factory, writer_factory)
  elif mode.startswith("eval"):
    _run_eval(experiment_class, config, checkpointer_factory, writer_factory,
              mode, mode)
  elif mode == "train_eval_multithreaded":
    _train_eval_multithreaded(experiment_class, config, checkpointer_factory,
                              writer_factory)
  else:
    raise ValueError(f"Mode {mode} not recognized. Valid modes: "
                     f"{', '.join(VALID_MODES)}.")
