"""Tests for jaxline.distributed: the flags, cluster fallback and watchdog.

`jax.distributed.initialize` is replaced by a recorder here, so nothing joins
a real job; tests/multihost_test.py runs real processes.
"""

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax._src import distributed as jax_distributed

from conftest import subprocess_env
from jaxline import distributed

_ADDRESS = "127.0.0.1:12345"

# Variables through which JAX detects a cluster (SLURM, Open MPI,
# Kubernetes, Cloud TPU).
_CLUSTER_ENV_VARS = (
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
    "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
    "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "JAX_COORDINATOR_ADDRESS",
)


class _Case(parameterized.TestCase):
  """Records calls to jax.distributed.initialize instead of making them."""

  def setUp(self):
    super().setUp()
    self.jax_initialize = self.enter_context(
        mock.patch.object(jax.distributed, "initialize", autospec=True))
    self.enter_context(mock.patch.dict(os.environ))
    for name in _CLUSTER_ENV_VARS:
      os.environ.pop(name, None)


class FlagValidationTest(_Case):

  @parameterized.named_parameters(
      ("no_address", None, 2, 0, ["--jaxline_coordinator_address"]),
      ("empty_address", "", 2, 0, ["--jaxline_coordinator_address"]),
      ("no_count", _ADDRESS, None, 0, ["--jaxline_num_processes"]),
      ("no_id", _ADDRESS, 2, None, ["--jaxline_process_id"]),
      ("only_id", None, None, 1,
       ["--jaxline_coordinator_address", "--jaxline_num_processes"]),
      ("only_address", _ADDRESS, None, None,
       ["--jaxline_num_processes", "--jaxline_process_id"]),
  )
  def test_missing_flags_are_named(self, address, count, process_id, missing):
    with self.assertRaises(ValueError) as raised:
      distributed.initialize(address, count, process_id)
    message = str(raised.exception)
    for flag in missing:
      self.assertIn(flag, message)
    for flag in {"--jaxline_coordinator_address", "--jaxline_num_processes",
                 "--jaxline_process_id"} - set(missing):
      self.assertNotIn(f"'{flag}'", message)
    self.jax_initialize.assert_not_called()
    self.assertFalse(jax.distributed.is_initialized())

  @parameterized.named_parameters(
      ("negative", 2, -1),
      ("equal_to_count", 2, 2),
      ("above_count", 4, 7),
      ("single_process", 1, 1),
  )
  def test_process_id_out_of_range(self, count, process_id):
    with self.assertRaisesRegex(ValueError,
                                f"--jaxline_process_id={process_id}"):
      distributed.initialize(_ADDRESS, count, process_id)
    self.jax_initialize.assert_not_called()

  def test_valid_flags_join_with_short_timeouts(self):
    with mock.patch.object(distributed, "_start_watchdog") as watchdog:
      self.assertTrue(distributed.initialize(_ADDRESS, 2, 1))
    self.jax_initialize.assert_called_once()
    kwargs = self.jax_initialize.call_args.kwargs
    self.assertEqual(kwargs["coordinator_address"], _ADDRESS)
    self.assertEqual(kwargs["num_processes"], 2)
    self.assertEqual(kwargs["process_id"], 1)
    self.assertEqual(kwargs["initialization_timeout"],
                     distributed.INITIALIZATION_TIMEOUT_SECS)
    # JAX adds a few seconds of its own; the whole must stay within 60 s.
    self.assertLessEqual(kwargs["initialization_timeout"], 55)
    self.assertEqual(kwargs["heartbeat_timeout_seconds"],
                     distributed.HEARTBEAT_TIMEOUT_SECS)
    watchdog.assert_called_once_with()

  def test_dead_peers_are_noticed_within_a_minute(self):
    # The watchdog exits at most one poll after JAX's heartbeat timeout.
    self.assertLess(distributed.HEARTBEAT_TIMEOUT_SECS +
                    distributed.WATCHDOG_INTERVAL_SECS, 60)

  def test_already_initialized_is_not_initialized_again(self):
    with mock.patch.object(jax.distributed, "is_initialized",
                           return_value=True):
      self.assertTrue(distributed.initialize(_ADDRESS, 2, 0))
    self.jax_initialize.assert_not_called()


class ClusterFallbackTest(_Case):

  def test_no_flags_and_no_cluster_runs_as_one_process(self):
    self.assertFalse(distributed.initialize())
    self.assertFalse(distributed.initialize(None, None, None))
    self.assertFalse(distributed.initialize("", None, None))
    self.jax_initialize.assert_not_called()
    self.assertFalse(jax.distributed.is_initialized())
    self.assertEqual(jax.process_count(), 1)

  def test_no_flags_in_a_slurm_job_uses_auto_detection(self):
    os.environ.update(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]",
                      SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0")
    with mock.patch.object(distributed, "_start_watchdog"):
      self.assertTrue(distributed.initialize())
    self.jax_initialize.assert_called_once()
    kwargs = self.jax_initialize.call_args.kwargs
    # Nothing explicit: JAX reads the allocation itself.
    self.assertIsNone(kwargs["coordinator_address"])
    self.assertIsNone(kwargs["num_processes"])
    self.assertIsNone(kwargs["process_id"])
    self.assertEqual(kwargs["initialization_timeout"],
                     distributed.INITIALIZATION_TIMEOUT_SECS)
    # JAX adds a few seconds of its own; the whole must stay within 60 s.
    self.assertLessEqual(kwargs["initialization_timeout"], 55)

  def test_mpi4py_installed_without_a_cluster_runs_as_one_process(self):
    # JAX's mpi4py detection is opt-in (it says "present" whenever mpi4py is
    # importable, and jax.distributed.initialize() skips it unless asked),
    # so an installed mpi4py must not turn a plain run into a cluster run.
    if importlib.util.find_spec("mpi4py") is not None:
      self.skipTest("mpi4py is really installed here.")
    fake = self.enter_context(tempfile.TemporaryDirectory())
    os.mkdir(os.path.join(fake, "mpi4py"))
    with open(os.path.join(fake, "mpi4py", "__init__.py"), "w"):
      pass
    self.enter_context(mock.patch.object(sys, "path", [fake] + sys.path))
    importlib.invalidate_caches()
    self.assertIsNotNone(importlib.util.find_spec("mpi4py"))
    self.assertFalse(distributed.initialize())
    self.jax_initialize.assert_not_called()


class PrivateApiMissingTest(_Case):
  """JAX renamed or moved the private modules jaxline looks into."""

  def hide_cluster_detectors(self, how):
    if how == "module_moved":
      self.enter_context(mock.patch.dict(sys.modules,
                                         {"jax._src.clusters": None}))
    else:  # The attribute was renamed.
      from jax._src import clusters  # pylint: disable=g-import-not-at-top
      self.enter_context(mock.patch.object(clusters, "ClusterEnv",
                                           type("ClusterEnv", (), {})))
    self.assertIsNone(distributed._cluster_detected())  # pylint: disable=protected-access

  @parameterized.parameters("module_moved", "attribute_renamed")
  def test_no_cluster_asks_jax_publicly_then_runs_as_one_process(self, how):
    self.hide_cluster_detectors(how)
    self.jax_initialize.side_effect = ValueError(
        "coordinator_address should be defined.")
    with self.assertLogs(level="INFO") as logs:
      self.assertFalse(distributed.initialize())
    self.jax_initialize.assert_called_once()
    self.assertIsNone(self.jax_initialize.call_args.kwargs[
        "coordinator_address"])
    self.assertTrue(any("found no cluster" in m for m in logs.output))
    self.assertFalse(jax.distributed.is_initialized())

  def test_jax_that_already_ran_computations_runs_as_one_process(self):
    self.hide_cluster_detectors("module_moved")
    self.jax_initialize.side_effect = RuntimeError(
        "jax.distributed.initialize() must be called before any JAX "
        "computations are executed.")
    with self.assertLogs(level="WARNING") as logs:
      self.assertFalse(distributed.initialize())
    self.assertIn("Running as a single process", logs.output[0])

  def test_other_errors_from_jax_are_not_hidden(self):
    self.hide_cluster_detectors("module_moved")
    self.jax_initialize.side_effect = ValueError(
        "Number of processes must be defined.")
    with self.assertRaisesRegex(ValueError, "Number of processes"):
      distributed.initialize()

  def test_a_cluster_found_publicly_is_joined(self):
    self.hide_cluster_detectors("attribute_renamed")
    with mock.patch.object(distributed, "_start_watchdog") as watchdog:
      self.assertTrue(distributed.initialize())
    watchdog.assert_called_once()
    kwargs = self.jax_initialize.call_args.kwargs
    self.assertEqual(kwargs["heartbeat_timeout_seconds"],
                     distributed.HEARTBEAT_TIMEOUT_SECS)

  def test_explicit_flags_do_not_need_the_detectors(self):
    self.hide_cluster_detectors("module_moved")
    with mock.patch.object(distributed, "_start_watchdog"):
      self.assertTrue(distributed.initialize(_ADDRESS, 2, 1))
    self.assertEqual(self.jax_initialize.call_args.kwargs["process_id"], 1)

  def test_without_the_client_the_watchdog_is_off_with_a_clear_line(self):
    self.enter_context(mock.patch.dict(sys.modules,
                                       {"jax._src.distributed": None}))
    self.assertIsNone(distributed._client())  # pylint: disable=protected-access
    before = {t.ident for t in threading.enumerate()
              if t.name == "jaxline_watchdog"}
    with self.assertLogs(level="WARNING") as logs:
      distributed._start_watchdog()  # pylint: disable=protected-access
    self.assertIn("watchdog for dead or hung processes is off",
                  logs.output[0])
    self.assertIn("JAX's own heartbeat", logs.output[0])
    self.assertEqual(before, {t.ident for t in threading.enumerate()
                              if t.name == "jaxline_watchdog"})
    with mock.patch.object(jax.distributed, "is_initialized",
                           return_value=True):
      distributed.mark_finished()  # No client to tell: nothing raised.
    distributed._finished.clear()  # pylint: disable=protected-access


class _FakeClient:
  """Answers get_live_nodes from a list of answers, then stops the test."""

  def __init__(self, answers):
    self._answers = list(answers)
    self.calls = 0

  def get_live_nodes(self, everyone):
    self.calls += 1
    answer = self._answers[min(self.calls, len(self._answers)) - 1]
    if isinstance(answer, Exception):
      raise answer
    return [p for p in everyone if p in answer]


class WatchdogTest(parameterized.TestCase):

  def start_watchdog(self, client, process_count=2):
    """Starts the watchdog; returns (event set on exit, recorded messages)."""
    failed = threading.Event()
    messages = []

    def fake_fail(message, *args):
      messages.append(message % args)
      failed.set()

    self.enter_context(mock.patch.object(jax_distributed.global_state,
                                         "client", client))
    self.enter_context(mock.patch.object(distributed, "_fail", fake_fail))
    self.enter_context(mock.patch.object(distributed,
                                         "WATCHDOG_INTERVAL_SECS", 0.01))
    with mock.patch.object(jax, "process_count", return_value=process_count):
      distributed._start_watchdog()  # pylint: disable=protected-access
    return failed, messages

  def test_dead_peer_ends_the_process_with_its_id(self):
    client = _FakeClient([{0, 1}, {0, 1}, {0}])
    failed, messages = self.start_watchdog(client)
    self.assertTrue(failed.wait(30))
    self.assertLen(messages, 1)
    self.assertIn("Process(es) [1] of 2 stopped responding", messages[0])
    self.assertGreaterEqual(client.calls, 3)
    time.sleep(0.1)
    self.assertLen(messages, 1)  # The thread stops after failing.

  def test_lost_coordinator_ends_the_process(self):
    client = _FakeClient([{0, 1}, RuntimeError("UNAVAILABLE: socket closed")])
    failed, messages = self.start_watchdog(client)
    self.assertTrue(failed.wait(30))
    self.assertIn("Lost contact with the jax.distributed coordinator",
                  messages[0])
    self.assertIn("UNAVAILABLE: socket closed", messages[0])

  def test_all_alive_keeps_running(self):
    client = _FakeClient([{0, 1, 2}] * 20 + [{0, 2}])
    failed, messages = self.start_watchdog(client, process_count=3)
    self.assertTrue(failed.wait(30))
    self.assertGreaterEqual(client.calls, 21)
    self.assertEqual(len(messages), 1)
    self.assertIn("Process(es) [1] of 3", messages[0])

  def test_no_client_starts_no_thread(self):
    before = {t.ident for t in threading.enumerate()
              if t.name == "jaxline_watchdog"}
    with mock.patch.object(jax_distributed.global_state, "client", None):
      distributed._start_watchdog()  # pylint: disable=protected-access
    after = {t.ident for t in threading.enumerate()
             if t.name == "jaxline_watchdog"}
    self.assertEqual(before, after)


class FailTest(absltest.TestCase):

  def test_fail_logs_and_exits_with_code_3(self):
    code = ("from jaxline import distributed\n"
            "distributed._fail('Process(es) %s of %d stopped responding', "
            "[1], 2)\n"
            "print('not reached')\n")
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=subprocess_env(1),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
      stdout, stderr = process.communicate(timeout=120)
    finally:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    self.assertEqual(process.returncode, distributed.EXIT_CODE_PEER_LOST)
    self.assertEqual(distributed.EXIT_CODE_PEER_LOST, 3)
    self.assertIn("Process(es) [1] of 2 stopped responding", stderr)
    self.assertNotIn("not reached", stdout)


if __name__ == "__main__":
  absltest.main()
