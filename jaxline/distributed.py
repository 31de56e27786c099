"""Starting several processes with `jax.distributed`.

Explicit flags win; without them, JAX's own cluster detection (SLURM, Open
MPI, Kubernetes, TPU pods) is used when such a cluster is present; otherwise
the run is a single process, as before. Time-outs are short so that a dead or
missing process fails the others with a clear error instead of a hang.
"""

import atexit
import importlib
import os
import sys
import threading
from typing import Any, Optional

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


def _jax_private(module: str, *attrs: str) -> Any:
  """`jax._src.<module>.<attrs>`, or None where this JAX release lacks it.

  JAX's private modules change without notice. Every use here goes through
  this lookup, so a rename costs jaxline a feature, with a log line, and
  never stops a run from starting.
  """
  try:
    value = importlib.import_module(f"jax._src.{module}")
    for attr in attrs:
      value = getattr(value, attr)
  except (ImportError, AttributeError):
    return None
  return value


def _cluster_detected() -> Optional[bool]:
  """Whether JAX sees a cluster; None if this JAX cannot be asked privately.

  JAX's public API has no "is there a cluster?" question: its only public
  detection is `jax.distributed.initialize()` itself, used as the fallback.
  """
  cluster_types = _jax_private("clusters", "ClusterEnv", "_cluster_types")
  if cluster_types is None:
    return None
  try:
    # Opt-in detectors (mpi4py) report True whenever their module imports.
    return any(env.is_env_present() for env in cluster_types
               if not getattr(env, "opt_in_only_method", None))
  except Exception:  # pylint: disable=broad-except  # Changed shape.
    return None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Joins the multi-process job if there is one; returns whether it did."""
  explicit = [coordinator_address, num_processes, process_id]
  detected = True
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
  else:
    detected = _cluster_detected()
    if detected is False:
      return False
  if jax.distributed.is_initialized():  # A second platform.main call.
    if _finished.is_set() and _client() is not None:
      _finished.clear()
      _client().key_value_delete(_DONE_KEY.format(jax.process_index()))
      _start_watchdog()
    return True
  if detected is None:  # Unknown: JAX's public initialize() looks.
    return _initialize_if_jax_finds_a_cluster()
  _join(coordinator_address, num_processes, process_id)
  return True


def _join(coordinator_address: Optional[str], num_processes: Optional[int],
          process_id: Optional[int]) -> None:
  logging.info("Initializing jax.distributed: waiting up to %d s for %s "
               "processes to connect to %s (this is process %s).",
               INITIALIZATION_TIMEOUT_SECS, num_processes or "all",
               coordinator_address or "the auto-detected coordinator",
               process_id if process_id is not None else "auto")
  _initialize_jax(coordinator_address, num_processes, process_id)
  _joined()


def _initialize_jax(coordinator_address: Optional[str],
                    num_processes: Optional[int],
                    process_id: Optional[int]) -> None:
  jax.distributed.initialize(
      coordinator_address=coordinator_address or None,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=INITIALIZATION_TIMEOUT_SECS,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECS)


def _joined() -> None:
  logging.info("Process %d of %d; %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  _start_watchdog()
  # Runs before JAX's own atexit hook (registered when jax was imported), so
  # the watchdog is stopped before JAX clears its backends.
  atexit.register(shutdown)


def _initialize_if_jax_finds_a_cluster() -> bool:
  """Lets `jax.distributed.initialize()` look for a cluster, publicly.

  Used when JAX's private cluster detectors could not be reached. Without a
  cluster JAX raises before it starts anything, naming the missing
  coordinator address; that means a single-process run, as before.
  """
  logging.info("Cannot ask JAX privately whether this is a cluster job "
               "(jax._src.clusters changed); letting jax.distributed."
               "initialize() look for one (up to %d s if it finds one).",
               INITIALIZATION_TIMEOUT_SECS)
  try:
    _initialize_jax(None, None, None)
  except ValueError as e:
    if "coordinator" not in str(e).lower():
      raise
    logging.info("jax.distributed.initialize() found no cluster (%s): "
                 "running as a single process.", e)
    return False
  except RuntimeError as e:  # JAX already ran computations: cannot join.
    logging.warning("Running as a single process: jax.distributed could not "
                    "look for a cluster (%s).", e)
    return False
  _joined()
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
  client = _client()
  if client is None:
    return  # No watchdog either (see _start_watchdog).
  try:
    client.key_value_set(_DONE_KEY.format(jax.process_index()), "1")
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
  """JAX's coordination-service client, or None (no job, or JAX changed)."""
  return _jax_private("distributed", "global_state", "client")


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
    logging.warning(
        "jaxline's watchdog for dead or hung processes is off: this JAX "
        "release has no jax._src.distributed.global_state.client with "
        "get_live_nodes (a private API). JAX's own heartbeat (%d s) still "
        "stops the job when a process dies; a process hung inside a "
        "collective is not detected.", HEARTBEAT_TIMEOUT_SECS)
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
