"""Checkpoints on disk, with Orbax, behind the same protocol as in memory.

Layout: `<checkpoint_dir>/checkpoints/<series>/<step>/{arrays,meta}`, one
Orbax step directory per save, committed atomically (written to a temporary
directory, then renamed), so a reader never sees half a checkpoint. `arrays`
holds the numpy leaves; `meta` is JSON with the pytree skeleton
(`serialization`), so lazily created state restores with its exact types.

Saves are asynchronous: the loop waits only for the device-to-host copy. A
newest checkpoint that cannot be read is skipped with a warning in favour of
the one before it.
"""

from concurrent import futures
import os
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Dict, Optional, Set

from absl import logging
import jax
from ml_collections import config_dict
import numpy as np
import orbax.checkpoint as ocp

from jaxline import experiment as experiment_lib
from jaxline import host_copy
from jaxline import serialization
from jaxline import utils

FORMAT_VERSION = 1

# Orbax keeps one process-wide "current operation" for async saves, so two
# saves in flight at once (the train thread's "latest" and the eval thread's
# "best" in train_eval_multithreaded) corrupt each other. Every save in the
# process therefore waits for all others to finish, under this lock.
_SAVE_LOCK = threading.Lock()
_PLACEHOLDER = "_no_arrays"
# Attempts at listing a series that a writer is changing.
_LIST_ATTEMPTS = 5
_LIVE_CHECKPOINTERS = weakref.WeakSet()


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

  Use it through `platform.create_checkpointer`, which picks it whenever
  `config.checkpoint_dir` is set. Each series keeps
  `config.max_checkpoints_to_keep` checkpoints.
  """

  def __init__(self, config, mode: str, *, async_save: bool = True):
    self._root = os.path.join(config.checkpoint_dir, "checkpoints")
    self._mode = mode
    self._max_to_keep = config.max_checkpoints_to_keep or None
    self._allow_pickle = bool(config.get("checkpoint_allow_pickle", False))
    self._async = async_save
    self._follow = mode != "train"  # Readers look for new steps each time.
    self._states: Dict[str, Any] = {}
    self._managers: Dict[str, ocp.CheckpointManager] = {}
    self._bad_steps: Dict[str, Set[int]] = {}
    self._lock = threading.RLock()
    self._fixed_latest: Optional[tuple[str, int]] = None
    self._reported_step: Dict[str, int] = {}
    self._latest_dir: Optional[str] = None
    self._host_copy_pool = futures.ThreadPoolExecutor(
        1, thread_name_prefix="jaxline_host_copy")
    self._host_copy: Optional[futures.Future] = None
    eval_dir = config.get("eval_specific_checkpoint_dir", "")
    if mode != "train" and eval_dir:
      self._resolve_eval_dir(eval_dir)
    _ensure_writable(self._root)
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
      manager = self._managers.get(directory)
      if manager is not None:
        return manager
      if create:
        os.makedirs(directory, exist_ok=True)
      elif not os.path.isdir(directory):
        return None
      me = jax.process_index()
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self._max_to_keep,
          enable_async_checkpointing=self._async,
          create=False,
          # Only the processes that save do so; no barriers with the others.
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=me, active_processes={me}))
      # Orbax lists the steps as it starts, so it races with a writer too.
      manager = _retrying_listing(
          directory, lambda: ocp.CheckpointManager(
              directory, options=options, item_names=("arrays", "meta")),
          fallback=None if create else "no checkpoint there yet")
      if manager is not None:
        self._managers[directory] = manager
      return manager

  def _steps(self, series: str) -> list[int]:
    if series == "latest" and self._fixed_latest:
      return [self._fixed_latest[1]]
    manager = self._manager(series, create=False)
    if manager is None:
      return []
    if self._follow:
      # Still changing after the retries: go on with the last listing (a step
      # gone since fails to restore and is skipped), not end the job.
      _retrying_listing(self._series_dir(series), manager.reload,
                        fallback="using the last listing")
    bad = self._bad_steps.get(series, set())
    return sorted(s for s in manager.all_steps() if s not in bad)

  def get_experiment_state(self, ckpt_series: str):
    with self._lock:
      if ckpt_series not in self._states:
        self._states[ckpt_series] = config_dict.ConfigDict()
      return self._states[ckpt_series]

  def _snapshot(self, state) -> Dict[str, Any]:
    nest = {}
    for key, value in state.items():
      if key == "experiment_module":
        value = value.snapshot_state()
      nest[key] = value
    return nest

  def _encode(self, state, series: str):
    nest = self._snapshot(state)
    attrs = {}
    if "experiment_module" in state:
      attrs = serialization.entry_attributes(state.experiment_module)
    skeleton, arrays = {}, {}
    for key, value in nest.items():
      entries = value if key == "experiment_module" else {key: value}
      for name, entry in entries.items():
        where = (f"checkpoint entry {name!r} (attribute "
                 f"{attrs.get(name, name)})" if key == "experiment_module"
                 else f"state field {name!r}")
        sk, arr = serialization.encode(entry, allow_pickle=self._allow_pickle,
                                       path=where)
        prefix = f"{key}/{name}/"
        skeleton.setdefault(key, {})[name] = _prefix(sk, prefix)
        arrays.update({prefix + k: v for k, v in arr.items()})
    meta = {"format": FORMAT_VERSION, "series": series, "skeleton": skeleton}
    return meta, arrays

  def save(self, ckpt_series: str) -> None:
    state = self._states[ckpt_series]  # KeyError: a series never created.
    step = int(state.global_step)
    meta, arrays = self._encode(state, ckpt_series)
    if jax.process_index() != 0:
      self._save_host_copy(ckpt_series, step, meta, arrays)
      return
    manager = self._manager(ckpt_series, create=True)
    with _SAVE_LOCK, self._lock:
      for checkpointer in list(_LIVE_CHECKPOINTERS):
        checkpointer._wait_for_saves()  # pylint: disable=protected-access
      bad = self._bad_steps.setdefault(ckpt_series, set())
      if step in manager.all_steps():
        # "latest" at a saved step holds the same state (e.g. the final save
        # right after a periodic one). Other series ("best" re-evaluated
        # with a better value) and unreadable checkpoints are replaced.
        if ckpt_series == "latest" and step not in bad:
          logging.info("Checkpoint %s at step %d already saved.", ckpt_series,
                       step)
          return
        manager.wait_until_finished()
        manager.delete(step)
        bad.discard(step)
      if not arrays:  # Orbax refuses an empty item.
        arrays = {_PLACEHOLDER: np.zeros([1], np.uint8)}
      manager.save(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(arrays),
          meta=ocp.args.JsonSave(meta)))
    logging.info("Saved checkpoint %s with id %s.", ckpt_series, step)

  def _save_host_copy(self, series: str, step: int, meta: Dict[str, Any],
                      arrays: Dict[str, np.ndarray]) -> None:
    """Saves this process's own copy; see `host_copy` for why not Orbax.

    Every process restores the chief's checkpoints, so that all resume at
    the same step; these copies are each process's record of its state.
    """
    directory = os.path.join(self._root, f"process_{jax.process_index()}",
                             series)
    with self._lock:
      self._wait_for_host_copy()
      self._host_copy = self._host_copy_pool.submit(
          host_copy.save, directory, step, meta, arrays,
          replace=series != "latest", max_to_keep=self._max_to_keep)
      if not self._async:
        self._wait_for_host_copy()
    logging.info("Saved checkpoint %s with id %s (this process's copy).",
                 series, step)

  def _wait_for_host_copy(self) -> None:
    if self._host_copy is not None:
      self._host_copy.result()  # Raises what the save raised.
      self._host_copy = None

  def _read(self, series: str, step: int) -> Dict[str, Any]:
    manager = self._manager(series, create=False)
    restored = manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
    arrays = dict(restored["arrays"] or {})
    nest = {}
    for key, entries in meta["skeleton"].items():
      values = {name: serialization.decode(sk, arrays,
                                           allow_pickle=self._allow_pickle)
                for name, sk in entries.items()}
      nest[key] = values if key == "experiment_module" else values[key]
    return nest

  def restore(self, ckpt_series: str) -> None:
    live = self.get_experiment_state(ckpt_series)
    steps = self._steps(ckpt_series)
    # The eval loop asks restore_path first and records that path as
    # evaluated: restore that step, not one committed since.
    reported = self._reported_step.pop(ckpt_series, None)
    if reported is not None:
      steps = [s for s in steps if s <= reported]
    for step in reversed(steps):
      try:
        nest = self._read(ckpt_series, step)
      except serialization.RestoreRefusedError:
        raise  # Not damage: falling back would silently lose this run.
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
            "Checkpoint %s step %d in %s cannot be read (%s: %s); falling "
            "back to the one before it.", ckpt_series, step,
            self._series_dir(ckpt_series), type(e).__name__, e)
        self._bad_steps.setdefault(ckpt_series, set()).add(step)
        continue
      self._apply(live, nest)
      logging.info("Returned checkpoint %s with id %s.", ckpt_series, step)
      return
    logging.warning("No readable checkpoint in %s; starting fresh.",
                    self._series_dir(ckpt_series))

  def _apply(self, live, nest: Dict[str, Any]) -> None:
    if "experiment_module" in live and "experiment_module" in nest:
      serialization.check_snapshot_matches(live.experiment_module,
                                           nest["experiment_module"])
    for key in list(live.keys()):
      if key not in nest:
        continue
      value = nest[key]
      if key == "experiment_module":
        live.experiment_module.restore_from_snapshot(value)
      elif (key == "train_step_rng" and value is not None and
            not experiment_lib.is_sharded(live.get("experiment_module"))):
        setattr(live, key, _per_device_keys(value))
      else:
        setattr(live, key, utils._with_live_type(live[key], value))  # pylint: disable=protected-access

  def can_be_restored(self, ckpt_series: str) -> bool:
    return bool(self._steps(ckpt_series))

  def restore_path(self, ckpt_series: str) -> Optional[str]:
    steps = self._steps(ckpt_series)
    if not steps:
      return None
    if self._follow:
      self._reported_step[ckpt_series] = steps[-1]
    return os.path.join(self._series_dir(ckpt_series), str(steps[-1]))

  def _wait_for_saves(self) -> None:
    for manager in list(self._managers.values()):
      manager.wait_until_finished()

  def wait_for_checkpointing_to_finish(self) -> None:
    for manager in list(self._managers.values()):
      manager.wait_until_finished()
      manager.check_for_errors()
    with self._lock:
      self._wait_for_host_copy()

  def close(self) -> None:
    self.wait_for_checkpointing_to_finish()
    for manager in self._managers.values():
      manager.close()
    self._managers.clear()


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


def _prefix(skeleton: Any, prefix: str) -> Any:
  """Namespaces array ids so that all entries share one flat array dict."""
  if isinstance(skeleton, dict):
    out = {k: _prefix(v, prefix) for k, v in skeleton.items()}
    if "i" in skeleton and isinstance(skeleton["i"], str):
      out["i"] = prefix + skeleton["i"]
    return out
  if isinstance(skeleton, list):
    return [_prefix(v, prefix) for v in skeleton]
  return skeleton


def _per_device_keys(value: Any) -> Any:
  """Saved per-device key state, on this process's devices.

  On another device count, device 0's row is given to every device: exact
  for the default `initialize_train_step_rng`, where all rows are equal.
  """
  if value.shape[0] == jax.local_device_count() and len(
      value.sharding.device_set) == jax.local_device_count():
    return value
  return utils.bcast_local_devices(value[0])
