"""Checkpoints on disk with Orbax, behind the same protocol as in memory.

Layout: `<checkpoint_dir>/checkpoints/<series>/<step>/{arrays,meta,host}`,
one Orbax `CheckpointManager` per series and one step directory per save,
which Orbax commits atomically (written aside, then renamed), so a reader
never sees half a checkpoint. `checkpoint_format` says what each item holds.

Every process of a job takes part in every save (`every_process_saves`),
writing its own shards and its own host state; saves are asynchronous, and
the loop waits only for the device-to-host copy. The chief of a training job
claims the directory (`claim`), so a second trainer fails at start-up.

A training job resumes from the newest readable checkpoint, skipping damaged
ones with a warning. An eval job (any other mode) follows the "latest"
series: `restore_path` picks a step, and `restore` loads exactly that step
or raises `CheckpointUnavailableError` if it is gone, so no state is ever
evaluated under another step's name.
"""

import collections
import concurrent.futures
import os
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Dict, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_dict
import numpy as np
import orbax.checkpoint as ocp

from jaxline import checkpoint_format
from jaxline import claim as claim_lib
from jaxline import experiment as experiment_lib
from jaxline import restore_checks
from jaxline import run_config
from jaxline import serialization
from jaxline import utils

# Orbax names the barrier keys of a save after one process-wide "current
# operation id" (`synchronization.OperationIdGenerator`), so two saves in
# flight in one process (train_eval_multithreaded: the train thread's
# "latest" and the eval thread's "best") would take each other's signals.
# Every save therefore waits for all others to finish, under this lock.
_SAVE_LOCK = threading.Lock()
_LIVE_CHECKPOINTERS = weakref.WeakSet()
# Checkpoint roots this process trained into: resuming one in the same
# process is where 0.0.8-era code (fresh runs in one test process, sharing
# a checkpoint_dir) would have started afresh.
_TRAINED_HERE = set()
# Orbax lists a series with exists() then is_dir() on each step; a step that
# a writer deletes in between makes the listing raise. Readers retry.
_LIST_ATTEMPTS = 5
_REFUSALS = (serialization.RestoreRefusedError,
             restore_checks.CheckpointMismatchError)


CheckpointUnavailableError = restore_checks.CheckpointUnavailableError


class _QuietOrbax(logging.logging.Filter):
  """Drops Orbax's INFO lines (dozens per save); warnings still show."""

  def filter(self, record) -> bool:
    return not (record.levelno < logging.logging.WARNING and
                f"{os.sep}orbax{os.sep}" in record.pathname)


_QUIET_ORBAX = _QuietOrbax()


def quiet_orbax_info_logs() -> None:
  logger = logging.get_absl_logger()
  if _QUIET_ORBAX not in logger.filters:
    logger.addFilter(_QUIET_ORBAX)


def _ensure_writable(directory: str) -> None:
  """Fails now, before training, if checkpoints could not be written."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"checkpoint_dir {directory!r} exists and is not a "
                     "directory; point config.checkpoint_dir elsewhere.")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test"):
      pass
  except OSError as e:
    raise ValueError(
        f"Cannot write checkpoints to {directory!r} ({e.strerror}). Make it "
        "writable or set config.checkpoint_dir to a writable directory."
    ) from e


class DiskCheckpointer(utils.Checkpointer):
  """Keeps the "latest" and "best" series on disk with Orbax.

  `platform.create_checkpointer` picks it whenever `config.checkpoint_dir`
  is set. Each series keeps `config.max_checkpoints_to_keep` checkpoints.
  """

  # Saves are collective: `train` and `evaluate` call `save` on every process.
  every_process_saves = True

  def __init__(self, config, mode: str, *, async_save: bool = True):
    # Absolute, as Orbax requires: example configs use relative run dirs.
    self._root = os.path.abspath(os.path.join(
        os.path.expanduser(config.checkpoint_dir), "checkpoints"))
    self._max_to_keep = config.max_checkpoints_to_keep or None
    self._allow_pickle = bool(config.get("checkpoint_allow_pickle", False))
    self._kwargs = run_config.flatten(
        config.get("experiment_kwargs"))
    self._async = async_save
    # Single-process asynchronous saves run Orbax's whole save call here,
    # device-to-host copy included, on arrays copied on the device first, so
    # the loop only dispatches the copies. With several processes the call
    # stays in the loop's thread: Orbax synchronises processes with device
    # computations, which must keep their order relative to the steps'.
    self._writer = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="jaxline-checkpoint-save")
    self._pending: Optional[concurrent.futures.Future] = None
    self._follow = mode != "train"  # Readers look for new steps each time.
    self._every = bool(config.get("eval_every_checkpoint", False))
    self._states: Dict[str, Any] = {}
    self._managers: Dict[str, ocp.CheckpointManager] = {}
    self._bad = collections.defaultdict(set)  # Unreadable steps per series.
    self._picked: Dict[str, int] = {}  # The step restore_path reported.
    self._done: Dict[str, int] = {}  # The last step a reader restored.
    self._lock = threading.RLock()
    self._fixed_latest: Optional[tuple[str, int]] = None
    self._latest_dir: Optional[str] = None
    eval_dir = config.get("eval_specific_checkpoint_dir", "")
    if mode != "train" and eval_dir:
      self._resolve_eval_dir(eval_dir)
    _ensure_writable(self._root)
    self._claim = None
    if mode == "train" and jax.process_index() == 0:
      self._claim = claim_lib.acquire(self._root)
    _LIVE_CHECKPOINTERS.add(self)
    if not config.get("checkpoint_verbose_logs", False):
      quiet_orbax_info_logs()

  def _resolve_eval_dir(self, path: str) -> None:
    """`eval_specific_checkpoint_dir` may name a step, a series or a root."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "meta")):
      self._fixed_latest = (os.path.dirname(path),
                            int(os.path.basename(path)))
    elif os.path.isdir(os.path.join(path, "checkpoints", "latest")):
      self._latest_dir = os.path.join(path, "checkpoints", "latest")
    elif os.path.isdir(path):
      self._latest_dir = path
    else:
      raise ValueError(f"eval_specific_checkpoint_dir {path!r} does not "
                       "exist; point it at a checkpoint step directory, a "
                       "series directory or a checkpoint_dir.")

  def _series_dir(self, series: str) -> str:
    if series == "latest" and self._fixed_latest:
      return self._fixed_latest[0]
    if series == "latest" and self._latest_dir:
      return self._latest_dir
    return os.path.join(self._root, series)

  def _manager(self, series: str, *,
               create: bool) -> Optional[ocp.CheckpointManager]:
    directory = self._series_dir(series)
    with self._lock:
      if directory in self._managers:
        return self._managers[directory]
      read_only = self._follow and series == "latest"
      if create and not read_only:
        os.makedirs(directory, exist_ok=True)
      elif not os.path.isdir(directory):
        return None
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self._max_to_keep, read_only=read_only, create=False,
          enable_async_checkpointing=self._async)
      host = ocp.JsonCheckpointHandler(
          filename=checkpoint_format.host_filename(jax.process_index()),
          # Every process writes its own file into the item.
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=None))
      handlers = {"arrays": ocp.StandardCheckpointHandler(),
                  "meta": ocp.JsonCheckpointHandler(), "host": host}
      manager = _retrying_listing(
          directory, lambda: ocp.CheckpointManager(
              directory, options=options, item_handlers=handlers),
          fallback=None if create else "no checkpoint there yet")
      if manager is not None:
        self._managers[directory] = manager
        if not read_only:
          self._drop_linked_steps(manager, directory)
      return manager

  def _drop_linked_steps(self, manager, directory: str) -> None:
    """Unlinks step entries that are symbolic links (never their targets).

    Jaxline never writes a link there; Orbax's rotation would call rmtree
    on one and fail, and a restore would read outside `checkpoint_dir`.
    """
    links = [n for n in os.listdir(directory)
             if os.path.islink(os.path.join(directory, n))]
    for name in links:
      logging.warning("%s is a symbolic link, which no checkpoint is; "
                      "removing the link (its target is left alone).",
                      os.path.join(directory, name))
      if jax.process_index() == 0:
        try:
          os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
          pass
    if links:
      manager.reload()

  def _steps(self, series: str) -> list[int]:
    if series == "latest" and self._fixed_latest:
      return [self._fixed_latest[1]]
    manager = self._manager(series, create=False)
    if manager is None:
      return []
    if self._follow:
      # Still changing after the retries: go on with the last listing (a step
      # gone since is skipped when read), not end the job.
      _retrying_listing(self._series_dir(series), manager.reload,
                        fallback="using the last listing")
    directory = self._series_dir(series)
    return sorted(s for s in manager.all_steps()
                  if s not in self._bad[series] and
                  not os.path.islink(os.path.join(directory, str(s))))

  def get_experiment_state(self, ckpt_series: str):
    with self._lock:
      if ckpt_series not in self._states:
        self._states[ckpt_series] = config_dict.ConfigDict()
      return self._states[ckpt_series]

  def save(self, ckpt_series: str) -> None:
    state = self._states[ckpt_series]  # KeyError: a series never created.
    step = int(state.global_step)
    manager = self._manager(ckpt_series, create=True)
    with _SAVE_LOCK:
      for checkpointer in list(_LIVE_CHECKPOINTERS):
        checkpointer._wait_for_saves()  # pylint: disable=protected-access
      with self._lock:
        self._drop_linked_steps(manager, self._series_dir(ckpt_series))
        if step in manager.all_steps():
          # "latest" at a saved step holds the same state (the final save
          # right after a periodic one). "best" re-evaluated with a better
          # value and unreadable checkpoints are replaced.
          if ckpt_series == "latest" and step not in self._bad[ckpt_series]:
            logging.info("Checkpoint %s at step %d already saved.",
                         ckpt_series, step)
            return
          manager.delete(step)
          self._bad[ckpt_series].discard(step)
        background = self._async and jax.process_count() == 1
        args = ocp.args.Composite(**checkpoint_format.encode_state(
            state, series=ckpt_series, allow_pickle=self._allow_pickle,
            experiment_kwargs=self._kwargs, detach=background,
            previous_step=max((s for s in manager.all_steps() if s < step),
                              default=None)))
        # force: Orbax would skip a step below its newest (after a fallback).
        if background:
          self._pending = self._writer.submit(manager.save, step, args=args,
                                              force=True)
        else:
          manager.save(step, args=args, force=True)
        _TRAINED_HERE.add(self._root)
        if not self._async:
          manager.wait_until_finished()
    logging.info("Saved checkpoint %s with id %s.", ckpt_series, step)

  def _read(self, series: str, step: int, live) -> Dict[str, Any]:
    return checkpoint_format.read_step(
        self._manager(series, create=False), step,
        os.path.join(self._series_dir(series), str(step)), live,
        allow_pickle=self._allow_pickle, experiment_kwargs=self._kwargs)

  def restore(self, ckpt_series: str) -> None:
    live = self.get_experiment_state(ckpt_series)
    if self._follow and ckpt_series in self._picked:
      step = self._picked.pop(ckpt_series)
      try:
        nest = self._read(ckpt_series, step, live)
      except _REFUSALS:
        raise
      except Exception as e:  # pylint: disable=broad-except
        self._bad[ckpt_series].add(step)
        raise CheckpointUnavailableError(
            f"Checkpoint {ckpt_series} step {step} in "
            f"{self._series_dir(ckpt_series)} can no longer be read "
            f"({type(e).__name__}: {e}); training's rotation probably deleted "
            "it (max_checkpoints_to_keep).") from e
      self._warn_if_skipped(ckpt_series, nest)
      self._apply(live, nest)
      self._done[ckpt_series] = step
      logging.info("Returned checkpoint %s with id %s.", ckpt_series, step)
      return
    for step in reversed(self._steps(ckpt_series)):
      try:
        nest = self._read(ckpt_series, step, live)
      except _REFUSALS:
        raise  # Not damage: falling back would silently lose this run.
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
            "Checkpoint %s step %d in %s cannot be read (%s: %s); falling "
            "back to the one before it.", ckpt_series, step,
            self._series_dir(ckpt_series), type(e).__name__, e)
        self._bad[ckpt_series].add(step)
        continue
      self._apply(live, nest)
      logging.info("Returned checkpoint %s with id %s.", ckpt_series, step)
      if not self._follow and self._root in _TRAINED_HERE:
        logging.warning(
            "Resuming from step %d, which this process saved earlier in %s: "
            "jaxline resumes from checkpoint_dir (jaxline 0.0.8 kept "
            "checkpoints in memory, so rebinding utils.GLOBAL_CHECKPOINT_DICT "
            "started afresh). For a fresh run use a new checkpoint_dir, or "
            "config.checkpoint_backend='memory'.", step, self._root)
      return
    logging.warning("No readable checkpoint in %s; starting fresh.",
                    self._series_dir(ckpt_series))

  def _apply(self, live, nest: Dict[str, Any]) -> None:
    for key in list(live.keys()):
      if key not in nest:
        continue
      if key == checkpoint_format.ENTRIES:
        live.experiment_module.restore_from_snapshot(nest[key])
      elif (key == "train_step_rng" and nest[key] is not None and
            not experiment_lib.is_sharded(live.get("experiment_module"))):
        live.train_step_rng = _per_device_keys(nest[key])
      else:
        setattr(live, key, utils._with_live_type(live[key], nest[key]))  # pylint: disable=protected-access

  def can_be_restored(self, ckpt_series: str) -> bool:
    if self._follow and ckpt_series in self._picked:
      return True  # The step restore_path picked (the same on every process).
    return bool(self._steps(ckpt_series))

  def restore_path(self, ckpt_series: str) -> Optional[str]:
    steps = self._steps(ckpt_series)
    step = self._pick(ckpt_series, steps) if self._follow else (
        steps[-1] if steps else None)
    if self._follow and jax.process_count() > 1:
      # Every process must evaluate the same step: the chief's pick.
      step = int(multihost_utils.broadcast_one_to_all(
          np.int64(-1 if step is None else step)))
      step = None if step < 0 else step
    if step is None:
      return None
    if self._follow:
      self._picked[ckpt_series] = step
    return os.path.join(self._series_dir(ckpt_series), str(step))

  def _pick(self, series: str, steps: list[int]) -> Optional[int]:
    """The newest step; with eval_every_checkpoint the next one in order."""
    done = self._done.get(series)
    if not self._every:
      return steps[-1] if steps else None
    newer = [s for s in steps if done is None or s > done]
    return newer[0] if newer else done

  def _warn_if_skipped(self, series: str, nest: Dict[str, Any]) -> None:
    """With eval_every_checkpoint: the step saved before this one is gone."""
    previous = nest.get(checkpoint_format.PREVIOUS_STEP)
    done = self._done.get(series)
    if self._every and previous is not None and (done is None or
                                                 previous > done):
      logging.warning(
          "Checkpoint %s step %d was deleted before this eval job reached it "
          "(eval_every_checkpoint), with any step before it%s. Keep more "
          "with config.max_checkpoints_to_keep, or evaluate faster.", series,
          previous, "" if done is None else f" after step {done}")

  def _wait_for_saves(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()  # A failed background save raises here.
    for manager in list(self._managers.values()):
      manager.wait_until_finished()

  def wait_for_checkpointing_to_finish(self) -> None:
    self._wait_for_saves()
    for manager in list(self._managers.values()):
      manager.check_for_errors()

  def close(self) -> None:
    try:
      self.wait_for_checkpointing_to_finish()
      for manager in self._managers.values():
        manager.close()
    finally:
      self._writer.shutdown(wait=True)
      self._managers.clear()
      if self._claim is not None:
        self._claim.release()
        self._claim = None


def _per_device_keys(value: Any) -> Any:
  """Saved per-device key state, on this process's devices.

  On another device count device 0's row goes to every device: exact for
  the default `initialize_train_step_rng`, whose rows are all equal.
  """
  if (value.ndim and value.shape[0] == jax.local_device_count() and
      value.sharding.device_set == set(jax.local_devices())):
    return value
  return utils.bcast_local_devices(value[0])


def _retrying_listing(directory: str, list_steps: Callable[[], Any], *,
                      fallback: Optional[str]) -> Any:
  """Lists steps, retrying while a writer deletes one under the listing.

  When every attempt failed: with no `fallback` the last error is raised;
  otherwise a warning names the directory and the fallback, what the caller
  does instead, and None is returned.
  """
  for attempt in range(_LIST_ATTEMPTS):
    try:
      return list_steps()
    except OSError as e:
      if attempt == _LIST_ATTEMPTS - 1:
        if fallback is None:
          raise
        logging.warning("Cannot list %s (%s); %s.", directory, e, fallback)
        return None
      time.sleep(0.1 * (attempt + 1))
