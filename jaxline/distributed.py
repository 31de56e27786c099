"""Starting several processes with `jax.distributed`.

Explicit flags win; without them, JAX's own cluster detection (SLURM, Open
MPI, Kubernetes, TPU pods) is used when such a cluster is present; otherwise
the run is a single process, as before. Time-outs are short so that a dead or
missing process fails the others with a clear error instead of a hang.
"""

import atexit
import os
import sys
import threading
from typing import Optional

from absl import logging
import jax

# Seconds before peers notice a dead process, and before start-up gives up on
# processes that never connect. JAX's defaults (100 s, 300 s) are longer.
HEARTBEAT_TIMEOUT_SECS = 30
INITIALIZATION_TIMEOUT_SECS = 50  # JAX adds ~5 s; the whole stays < 60 s.
WATCHDOG_INTERVAL_SECS = 5.0
EXIT_CODE_PEER_LOST = 3
_DONE_KEY = "jaxline/finished/{}"
_finished = threading.Event()
_watchdog: Optional[threading.Thread] = None


def _cluster_detected() -> bool:
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
  except ImportError:  # Moved: let JAX decide, failing loudly if it cannot.
    return False
  # Opt-in detectors (mpi4py) report True whenever their module imports.
  return any(env.is_env_present()
             for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
             if not getattr(env, "opt_in_only_method", None))


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Joins the multi-process job if there is one; returns whether it did."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None and v != "" for v in explicit):
    missing = [name for name, v in zip(
        ["--jaxline_coordinator_address", "--jaxline_num_processes",
         "--jaxline_process_id"], explicit) if v is None or v == ""]
    if missing:
      raise ValueError(
          f"Multi-process runs need all three flags; missing {missing}. "
          "Example: --jaxline_coordinator_address=10.0.0.1:1234 "
          "--jaxline_num_processes=2 --jaxline_process_id=0.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--jaxline_process_id={process_id} must be in "
                       f"[0, {num_processes}).")
  elif not _cluster_detected():
    return False
  if jax.distributed.is_initialized():  # A second platform.main call.
    if _finished.is_set() and _client() is not None:
      _finished.clear()
      _client().key_value_delete(_DONE_KEY.format(jax.process_index()))
      _start_watchdog()
    return True
  logging.info("Initializing jax.distributed: waiting up to %d s for %s "
               "processes to connect to %s (this is process %s).",
               INITIALIZATION_TIMEOUT_SECS, num_processes or "all",
               coordinator_address or "the auto-detected coordinator",
               process_id if process_id is not None else "auto")
  jax.distributed.initialize(
      coordinator_address=coordinator_address or None,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=INITIALIZATION_TIMEOUT_SECS,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECS)
  logging.info("Process %d of %d; %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  _start_watchdog()
  # Runs before JAX's own atexit hook (registered when jax was imported), so
  # the watchdog is stopped before JAX clears its backends.
  atexit.register(shutdown)
  return True


def exit_on_error_if_multiprocess(error: BaseException) -> None:
  """Ends this process at once when it fails in a multi-process job.

  Raising normally would reach `jax.distributed.shutdown()`, which waits for
  peers that are themselves waiting for this process inside a collective:
  the whole job would hang. Exiting lets their watchdogs stop them.
  """
  if not jax.distributed.is_initialized() or jax.process_count() <= 1:
    return
  logging.exception("Process %d failed; exiting so the other processes stop "
                    "too: %s", jax.process_index(), error)
  logging.flush()
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def mark_finished() -> None:
  """Tells the peers' watchdogs that this process ends normally.

  A process that reaches JAX's shutdown no longer counts as live, while a
  slower peer may still be finishing (a last eval, a flush): without this
  mark its watchdog would take the normal exit for a death.
  """
  if not jax.distributed.is_initialized():
    return  # Single process: no watchdog, no peers to tell.
  _finished.set()
  try:
    _client().key_value_set(_DONE_KEY.format(jax.process_index()), "1")
  except Exception:  # pylint: disable=broad-except
    logging.warning("Could not tell the other processes this one finished.")


def shutdown() -> None:
  """Leaves the job in order at exit: watchdog released, then joined.

  Left to JAX's atexit hook alone, the backends are cleared first and the
  watchdog, blocked in `get_live_nodes` (a barrier that peers which already
  finished no longer join), wakes when the shutdown barrier releases it and
  runs on into interpreter finalization: the process aborts with
  "terminate called after throwing an instance of ''". Here the barrier
  releases it while Python still runs, and it is joined before exit.
  """
  global _watchdog
  if not jax.distributed.is_initialized():
    return
  _finished.set()
  try:
    jax.distributed.shutdown()  # A barrier: waits for every process.
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("jax.distributed.shutdown failed: %s", e)
  if _watchdog is not None:
    _watchdog.join(timeout=WATCHDOG_INTERVAL_SECS + 5)
    if _watchdog.is_alive():
      logging.warning("The jax.distributed watchdog did not stop.")
    _watchdog = None


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _is_finished(client, process: int) -> bool:
  try:
    return client.key_value_try_get(_DONE_KEY.format(process)) == "1"
  except Exception:  # pylint: disable=broad-except  # Not set (NOT_FOUND).
    return False


def _fail(message: str, *args) -> None:
  logging.error(message, *args)
  logging.flush()
  sys.stderr.flush()
  os._exit(EXIT_CODE_PEER_LOST)  # pylint: disable=protected-access


def _start_watchdog() -> None:
  """Ends this process when a peer is gone, instead of hanging.

  A process waiting in a collective for a dead peer never returns, and JAX
  only notices at shutdown. This daemon thread asks the coordination service
  which processes are alive and exits with a clear error when one is not (or
  when the coordinator itself is unreachable), within about
  HEARTBEAT_TIMEOUT_SECS + WATCHDOG_INTERVAL_SECS.
  """
  client = _client()
  if client is None or not hasattr(client, "get_live_nodes"):
    logging.warning("Cannot watch for dead processes on this JAX version.")
    return
  everyone = list(range(jax.process_count()))
  me = jax.process_index()  # Not in the thread: it may (re)create backends.

  def watch():
    while not _finished.wait(WATCHDOG_INTERVAL_SECS):
      try:
        live = set(client.get_live_nodes(everyone))
      except Exception as e:  # pylint: disable=broad-except
        if _finished.is_set() or _is_finished(client, 0):
          return
        _fail("Lost contact with the jax.distributed coordinator (process 0) "
              "(%s). Exiting instead of waiting forever; restart the job.", e)
        return
      missing = [i for i in sorted(set(everyone) - live)
                 if i != me and not _is_finished(client, i)]
      if missing and not _finished.is_set():
        _fail("Process(es) %s of %d stopped responding (died or hung). "
              "Exiting instead of waiting forever in a collective; restart "
              "the job to resume from the last checkpoint.", missing,
              len(everyone))
        return

  global _watchdog
  _watchdog = threading.Thread(target=watch, name="jaxline_watchdog",
                               daemon=True)
  _watchdog.start()
