"""Tests for jaxline.utils: the names experiments written for 0.0.8 import.

Downstream code reaches into `utils` directly (helpers, protocols, the global
checkpoint dict, flags), so every name must keep its 0.0.8 meaning; the
in-memory checkpointer must also keep snapshots frozen and restores typed.
"""

import collections.abc
import os
import subprocess
import sys
import tempfile
import threading
import types
import typing
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np

from conftest import subprocess_env
from jaxline import base_config
from jaxline import concurrency
from jaxline import devices
from jaxline import periodic
from jaxline import rng
from jaxline import utils

FLAGS = flags.FLAGS
_WAIT_SECS = 30  # Generous: only reached if something is broken.
_SUBPROCESS_TIMEOUT_SECS = 120
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MARKED_PARSED = []


def setUpModule():
  # Flags are read at call time through FLAGS, which needs them parsed. Under
  # pytest nothing parses them, so mark them parsed here, and undo that after
  # this module so other test modules see the state they expect.
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
    _MARKED_PARSED.append(True)


def tearDownModule():
  if _MARKED_PARSED:
    FLAGS.unparse_flags()


def _n():
  return jax.local_device_count()


class NamesTest(parameterized.TestCase):

  def test_module_attributes_patched_by_tests(self):
    # Tests and users patch these module attributes; calls go through them.
    from absl import logging  # pylint: disable=g-import-not-at-top
    self.assertIs(utils.jax, jax)
    self.assertIs(utils.chex, chex)
    self.assertIs(utils.logging, logging)

  @parameterized.parameters(
      ("make_async", concurrency.make_async),
      ("py_prefetch", concurrency.py_prefetch),
      ("bcast_local_devices", devices.bcast_local_devices),
      ("get_first", devices.get_first),
      ("maybe_device_get", devices.maybe_device_get),
      ("DistributedRNGMode", rng.DistributedRNGMode),
      ("host_id_devices_for_rng", rng.host_id_devices_for_rng),
      ("specialize_rng_host_device", rng.specialize_rng_host_device),
      ("PeriodicAction", periodic.PeriodicAction),
  )
  def test_reexports_are_the_same_objects(self, name, obj):
    self.assertIs(getattr(utils, name), obj)

  def test_every_contract_name_exists(self):
    names = [
        "SnapshotNT", "CheckpointNT", "GLOBAL_CHECKPOINT_DICT", "T", "F",
        "Writer", "Checkpointer", "py_prefetch", "tree_psum", "double_buffer",
        "double_buffer_on_gpu", "get_first", "bcast_local_devices",
        "make_async", "maybe_device_get", "kwargs_only", "log_activity",
        "DistributedRNGMode", "host_id_devices_for_rng",
        "specialize_rng_host_device", "rendezvous", "PeriodicAction",
        "debugger_fallback", "evaluate_should_return_dict",
        "InMemoryCheckpointer", "disable_pmap_jit", "get_checkpoint_dir"]
    for name in names:
      self.assertTrue(hasattr(utils, name), msg=name)

  def test_tree_psum_is_psum(self):
    self.assertIs(utils.tree_psum, jax.lax.psum)

  def test_tree_psum_sums_a_tree_over_devices(self):
    tree = {"a": devices.bcast_local_devices(np.float32(1.0)),
            "b": devices.bcast_local_devices(np.arange(2, dtype=np.int32))}
    out = jax.pmap(lambda t: utils.tree_psum(t, "d"), axis_name="d")(tree)
    np.testing.assert_array_equal(out["a"], np.full((_n(),), _n()))
    np.testing.assert_array_equal(out["b"], np.tile([0, _n()], (_n(), 1)))

  def test_type_vars(self):
    self.assertIsInstance(utils.T, typing.TypeVar)
    self.assertIsInstance(utils.F, typing.TypeVar)
    self.assertIsNone(utils.T.__bound__)
    self.assertIs(typing.get_origin(utils.F.__bound__),
                  collections.abc.Callable)

  def test_snapshot_and_checkpoint_named_tuples(self):
    self.assertEqual(utils.SnapshotNT._fields, ("id", "pickle_nest"))
    self.assertEqual(utils.CheckpointNT._fields, ("active", "history"))
    self.assertEqual(utils.SnapshotNT.__name__, "SnapshotNT")
    self.assertEqual(utils.CheckpointNT.__name__, "CheckpointNT")
    snapshot = utils.SnapshotNT(3, {"global_step": 1})
    self.assertEqual(snapshot.id, 3)
    self.assertEqual(snapshot[1], {"global_step": 1})
    self.assertIsInstance(snapshot, tuple)
    entry = utils.CheckpointNT(threading.local(), [snapshot])
    self.assertEqual(entry.history, [snapshot])

  def test_global_checkpoint_dict_is_a_module_level_dict(self):
    self.assertIsInstance(utils.GLOBAL_CHECKPOINT_DICT, dict)

  def test_flags_are_registered_with_false_defaults(self):
    for name in ("jaxline_post_mortem", "jaxline_disable_pmap_jit"):
      self.assertIn(name, FLAGS)
      self.assertIs(FLAGS[name].default, False)
      self.assertEqual(FLAGS[name].flag_type(), "bool")


class ProtocolTest(absltest.TestCase):

  def test_writer_is_a_protocol_users_can_subclass(self):
    self.assertTrue(issubclass(utils.Writer, typing.Protocol))

    class ListWriter(utils.Writer):

      def __init__(self):
        self.rows = []

      def write_scalars(self, global_step, scalars):
        self.rows.append((global_step, dict(scalars)))

    writer = ListWriter()
    writer.write_scalars(3, {"loss": 1.0})
    self.assertEqual(writer.rows, [(3, {"loss": 1.0})])

  def test_checkpointer_subclass_inherits_no_op_methods(self):
    # D7: tapnet and functa subclass Checkpointer, define __init__ and only
    # some methods, and rely on the inherited no-ops for the rest.
    self.assertTrue(issubclass(utils.Checkpointer, typing.Protocol))

    class LatestOnly(utils.Checkpointer):

      def __init__(self, config, mode):
        self.config = config
        self.mode = mode
        self.saved = []

      def save(self, ckpt_series):
        if ckpt_series != "latest":
          raise ValueError(ckpt_series)
        self.saved.append(ckpt_series)

      @classmethod
      def create(cls, config, mode):
        return cls(config, mode)

    checkpointer = LatestOnly.create("config", "train")
    self.assertEqual(checkpointer.mode, "train")
    checkpointer.save("latest")
    self.assertEqual(checkpointer.saved, ["latest"])
    self.assertIsNone(checkpointer.wait_for_checkpointing_to_finish())
    self.assertIsNone(checkpointer.restore("latest"))
    self.assertIsNone(checkpointer.get_experiment_state("latest"))
    self.assertIsNone(checkpointer.restore_path("latest"))
    self.assertIsNone(checkpointer.can_be_restored("latest"))

  def test_checkpointer_has_the_six_methods(self):
    for name in ("save", "restore", "get_experiment_state", "restore_path",
                 "can_be_restored", "wait_for_checkpointing_to_finish"):
      self.assertTrue(callable(getattr(utils.Checkpointer, name)), msg=name)


class KwargsOnlyTest(absltest.TestCase):

  def test_forwards_keywords_and_refuses_positionals(self):

    def add(a, b=2):
      """Adds."""
      return a + b

    wrapped = utils.kwargs_only(add)
    self.assertEqual(wrapped(a=1), 3)
    self.assertEqual(wrapped(a=1, b=5), 6)
    with self.assertRaises(TypeError):
      wrapped(1)
    with self.assertRaises(TypeError):
      wrapped(1, b=2)
    self.assertEqual(wrapped.__name__, "add")
    self.assertEqual(wrapped.__doc__, "Adds.")
    self.assertIs(wrapped.__wrapped__, add)


class LogActivityTest(absltest.TestCase):

  def test_logs_start_and_finish(self):
    with mock.patch.object(utils.logging, "info") as info, \
        mock.patch.object(utils.logging, "exception") as exception:
      with utils.log_activity("training loop"):
        info.assert_called_once_with("[jaxline] %s starting...",
                                     "training loop")
    self.assertEqual(info.call_args_list, [
        mock.call("[jaxline] %s starting...", "training loop"),
        mock.call("[jaxline] %s finished.", "training loop")])
    exception.assert_not_called()

  def test_logs_failure_and_reraises(self):
    error = RuntimeError("nan loss")
    with mock.patch.object(utils.logging, "info") as info, \
        mock.patch.object(utils.logging, "exception") as exception:
      with self.assertRaises(RuntimeError) as cm:
        with utils.log_activity("checkpoint restore"):
          raise error
    self.assertIs(cm.exception, error)
    exception.assert_called_once_with("[jaxline] %s failed with error.",
                                      "checkpoint restore")
    self.assertEqual(info.call_args_list, [
        mock.call("[jaxline] %s starting...", "checkpoint restore")])


class DoubleBufferTest(absltest.TestCase):

  def _source(self, num_items, pulled):
    for i in range(num_items):
      pulled.append(i)
      yield {"x": np.full((_n(), 2), i, np.float32),
             "y": (np.arange(_n(), dtype=np.int32) + i,)}

  def test_items_arrive_in_order_as_per_device_arrays(self):
    pulled = []
    items = list(utils.double_buffer(self._source(5, pulled)))
    self.assertLen(items, 5)
    for i, item in enumerate(items):
      self.assertIsInstance(item["x"], jax.Array)
      self.assertTrue(item["x"].sharding.is_equivalent_to(
          devices.per_device_sharding(), 2))
      self.assertEqual([s.device for s in sorted(
          item["x"].addressable_shards, key=lambda s: s.index[0].start or 0)],
                       jax.local_devices())
      np.testing.assert_array_equal(item["x"], np.full((_n(), 2), i))
      np.testing.assert_array_equal(item["y"][0], np.arange(_n()) + i)

  def test_next_transfer_is_issued_before_an_item_is_yielded(self):
    pulled = []
    for i, _ in enumerate(utils.double_buffer(self._source(4, pulled))):
      if i < 3:
        self.assertGreaterEqual(len(pulled), i + 2)
      else:
        self.assertLen(pulled, 4)

  def test_items_feed_a_pmapped_function(self):
    pulled = []
    fn = jax.pmap(lambda item: item["x"].sum())
    sums = [np.asarray(fn(item))
            for item in utils.double_buffer(self._source(3, pulled))]
    for i, total in enumerate(sums):
      np.testing.assert_array_equal(total, np.full((_n(),), 2.0 * i))

  def test_none_item_is_an_error(self):
    with self.assertRaises(ValueError):
      list(utils.double_buffer(iter([None])))
    first = {"x": np.zeros((_n(),), np.float32)}
    with self.assertRaises(ValueError):
      list(utils.double_buffer(iter([first, None])))

  def test_empty_dataset(self):
    self.assertEqual(list(utils.double_buffer(iter([]))), [])

  def test_reused_host_buffer_is_copied(self):
    # Before the fix the background copy of item i+1 could run after the
    # dataset had refilled its buffer with item i+2.
    buffer = np.zeros((_n(), 1000), np.float32)

    def source():
      for i in range(30):
        buffer[...] = i
        yield {"x": buffer}

    items = []
    for i, item in enumerate(utils.double_buffer(source())):
      np.testing.assert_array_equal(item["x"], np.full(buffer.shape, i))
      items.append(item)
    for i, item in enumerate(items):  # Nothing aliases the buffer.
      np.testing.assert_array_equal(item["x"], np.full(buffer.shape, i))

  def test_dataset_error_comes_after_the_items_before_it(self):
    failure = IOError("disk gone")
    pulled = []

    def source():
      yield from self._source(2, pulled)
      raise failure

    received = []
    with self.assertRaises(IOError) as cm:
      for item in utils.double_buffer(source()):
        received.append(item)
    self.assertIs(cm.exception, failure)
    self.assertLen(received, 2)
    np.testing.assert_array_equal(received[1]["x"], np.ones((_n(), 2)))

  def test_none_item_comes_after_the_items_before_it(self):
    first = {"x": np.zeros((_n(),), np.float32)}
    received = []
    with self.assertRaisesRegex(ValueError, "double_buffer got a None item"):
      for item in utils.double_buffer(iter([first, first, None, first])):
        received.append(item)
    self.assertLen(received, 2)

  def test_next_transfer_runs_while_the_step_on_this_item_runs(self):
    # Overlap, with no clock: the "step" on item i waits until item i+1's
    # transfer has started in another thread.
    num = 4
    started = [threading.Event() for _ in range(num)]
    threads = []
    device_put = jax.device_put

    def recording_put(item, *args, **kwargs):
      threads.append(threading.current_thread())
      started[int(np.asarray(item["x"]).flat[0])].set()
      return device_put(item, *args, **kwargs)

    with mock.patch.object(jax, "device_put", side_effect=recording_put):
      for i, item in enumerate(utils.double_buffer(self._source(num, []))):
        if i + 1 < num:
          self.assertTrue(started[i + 1].wait(_WAIT_SECS),
                          f"item {i + 1} was not transferred during step {i}")
        np.testing.assert_array_equal(item["x"], np.full((_n(), 2), i))
    self.assertLen(threads, num)
    self.assertNotIn(threading.current_thread(), threads)

  def test_closing_early_stops_the_transfer_thread(self):
    items = utils.double_buffer(self._source(10, []))
    next(items)
    items.close()
    for thread in threading.enumerate():
      if thread.name.startswith("double_buffer"):
        thread.join(_WAIT_SECS)
    self.assertFalse([t for t in threading.enumerate()
                      if t.name.startswith("double_buffer")])

  def test_on_gpu_passes_items_through_elsewhere(self):
    items = [object(), object()]
    if jax.default_backend() == "gpu":
      self.skipTest("checks the non-GPU path")
    out = list(utils.double_buffer_on_gpu(iter(items)))
    self.assertLen(out, 2)
    self.assertIs(out[0], items[0])
    self.assertIs(out[1], items[1])

  def test_on_gpu_uses_double_buffer_there(self):
    pulled = []
    with mock.patch.object(utils.jax, "default_backend", return_value="gpu"):
      out = list(utils.double_buffer_on_gpu(self._source(2, pulled)))
    self.assertLen(out, 2)
    self.assertIsInstance(out[1]["x"], jax.Array)
    np.testing.assert_array_equal(out[1]["x"], np.ones((_n(), 2)))


class RendezvousTest(absltest.TestCase):

  def test_completes_inside_log_activity(self):
    with mock.patch.object(utils.logging, "info") as info:
      utils.rendezvous()
    info.assert_any_call("[jaxline] %s starting...", "rendezvous")
    info.assert_any_call("[jaxline] %s finished.", "rendezvous")


class DebuggerFallbackTest(parameterized.TestCase):

  def _failing(self):

    def raises_here(x, *, y):
      raise ValueError(f"{x} {y}")

    return raises_here

  def test_passes_arguments_and_results_through(self):
    wrapped = utils.debugger_fallback(lambda x, y=1: x + y)
    self.assertEqual(wrapped(2, y=3), 5)

  def test_keeps_the_wrapped_name(self):
    wrapped = utils.debugger_fallback(self._failing())
    self.assertEqual(wrapped.__name__, "raises_here")

  @flagsaver.flagsaver(jaxline_post_mortem=False)
  def test_reraises_without_pdb_by_default(self):
    wrapped = utils.debugger_fallback(self._failing())
    with mock.patch.object(utils.pdb, "post_mortem") as post_mortem:
      with self.assertRaisesRegex(ValueError, "1 2"):
        wrapped(1, y=2)
    post_mortem.assert_not_called()

  @flagsaver.flagsaver(jaxline_post_mortem=True)
  def test_post_mortem_on_the_failing_frame(self):
    wrapped = utils.debugger_fallback(self._failing())
    with mock.patch.object(utils.pdb, "post_mortem") as post_mortem:
      with self.assertRaisesRegex(ValueError, "1 2"):
        wrapped(1, y=2)
    post_mortem.assert_called_once()
    tb = post_mortem.call_args.args[0]
    self.assertIsInstance(tb, types.TracebackType)
    while tb.tb_next is not None:
      tb = tb.tb_next
    self.assertEqual(tb.tb_frame.f_code.co_name, "raises_here")

  def test_flag_is_read_at_call_time(self):
    wrapped = utils.debugger_fallback(self._failing())
    with mock.patch.object(utils.pdb, "post_mortem") as post_mortem:
      with flagsaver.flagsaver(jaxline_post_mortem=True):
        with self.assertRaises(ValueError):
          wrapped(1, y=2)
      with flagsaver.flagsaver(jaxline_post_mortem=False):
        with self.assertRaises(ValueError):
          wrapped(1, y=2)
    self.assertEqual(post_mortem.call_count, 1)

  @parameterized.parameters(KeyboardInterrupt, SystemExit)
  @flagsaver.flagsaver(jaxline_post_mortem=True)
  def test_interrupts_skip_pdb(self, error_type):

    def interrupted():
      raise error_type()

    wrapped = utils.debugger_fallback(interrupted)
    with mock.patch.object(utils.pdb, "post_mortem") as post_mortem:
      with self.assertRaises(error_type):
        wrapped()
    post_mortem.assert_not_called()


class EvaluateShouldReturnDictTest(absltest.TestCase):

  def test_passes_all_arguments_and_dicts_through(self):
    seen = []

    def evaluate(global_step, rng, mode=None, **kwargs):
      seen.append((global_step, rng, mode, kwargs))
      return {"acc": 1.0}

    wrapped = utils.evaluate_should_return_dict(evaluate)
    result = wrapped(1, 2, mode="eval_test", writer=None)
    self.assertEqual(result, {"acc": 1.0})
    self.assertEqual(seen, [(1, 2, "eval_test", {"writer": None})])
    self.assertEqual(wrapped.__name__, "evaluate")

  def test_none_becomes_an_empty_dict(self):
    wrapped = utils.evaluate_should_return_dict(lambda **kw: None)
    with mock.patch.object(utils.logging, "warning"):
      first = wrapped(global_step=0)
      second = wrapped(global_step=1)
    self.assertEqual(first, {})
    self.assertEqual(second, {})
    self.assertIsNot(first, second)

  def test_warns_once_per_process(self):
    # A fresh process, since any earlier None in this one used up the warning.
    script = "\n".join([
        "from unittest import mock",
        "from jaxline import utils",
        "with mock.patch.object(utils.logging, 'warning') as warning:",
        "  none_eval = utils.evaluate_should_return_dict(lambda: None)",
        "  other_eval = utils.evaluate_should_return_dict(lambda: None)",
        "  for fn in (none_eval, none_eval, other_eval):",
        "    assert fn() == {}",
        "print('WARNINGS', warning.call_count)",
    ])
    result = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(1),
        cwd=_REPO_ROOT, capture_output=True, text=True,
        timeout=_SUBPROCESS_TIMEOUT_SECS, check=False)
    self.assertEqual(result.returncode, 0, msg=result.stderr)
    self.assertIn("WARNINGS 1", result.stdout)


class DisablePmapJitTest(absltest.TestCase):

  def _traced_twice_counter(self):
    """Calls a fresh jitted function twice; returns how often it traced."""
    traces = []

    @jax.jit
    def double(x):
      traces.append(True)
      return x * 2

    def run():
      double(jnp.ones(3))
      double(jnp.ones(3))
      return len(traces)

    return run

  def test_flag_set_runs_fn_under_fake_pmap_and_jit(self):
    fake = mock.Mock(wraps=chex.fake_pmap_and_jit)
    with mock.patch.object(utils.chex, "fake_pmap_and_jit", fake):
      with flagsaver.flagsaver(jaxline_disable_pmap_jit=True):
        traces = utils.disable_pmap_jit(self._traced_twice_counter())()
    fake.assert_called_once()
    # Faked jit runs the Python body on every call.
    self.assertEqual(traces, 2)

  def test_flag_unset_calls_fn_directly(self):
    fake = mock.Mock(wraps=chex.fake_pmap_and_jit)
    with mock.patch.object(utils.chex, "fake_pmap_and_jit", fake):
      with flagsaver.flagsaver(jaxline_disable_pmap_jit=False):
        traces = utils.disable_pmap_jit(self._traced_twice_counter())()
    fake.assert_not_called()
    self.assertEqual(traces, 1)

  def test_passes_arguments_and_keeps_the_name(self):

    def train(a, *, b):
      return a - b

    wrapped = utils.disable_pmap_jit(train)
    with flagsaver.flagsaver(jaxline_disable_pmap_jit=True):
      self.assertEqual(wrapped(5, b=2), 3)
    self.assertEqual(wrapped(5, b=2), 3)
    self.assertEqual(wrapped.__name__, "train")

  def test_rng_values_are_identical_either_way(self):

    def step_keys():
      config = base_config.get_base_config()
      train_key, _ = rng.train_and_init_keys(config)
      state = utils.bcast_local_devices(train_key)
      step = utils.bcast_local_devices(np.int32(-1))
      host_ids = utils.bcast_local_devices(np.int32(0))
      advance = rng.make_step_key_fn(config.random_mode_train)
      keys = []
      for _ in range(2):
        step, key, state = advance(step, state, host_ids)
        keys.append(np.asarray(key))
      return keys

    wrapped = utils.disable_pmap_jit(step_keys)
    with flagsaver.flagsaver(jaxline_disable_pmap_jit=False):
      real = wrapped()
    with flagsaver.flagsaver(jaxline_disable_pmap_jit=True):
      faked = wrapped()
    for want, got in zip(real, faked):
      np.testing.assert_array_equal(want, got)


class GetCheckpointDirTest(absltest.TestCase):

  def test_returns_and_creates_the_directory_for_every_host(self):
    with tempfile.TemporaryDirectory() as root:
      config = config_dict.ConfigDict(
          {"checkpoint_dir": os.path.join(root, "a", "b")})
      path = utils.get_checkpoint_dir(config)
      self.assertEqual(path, config.checkpoint_dir)
      self.assertTrue(os.path.isdir(path))
      self.assertEqual(utils.get_checkpoint_dir(config, host_id=3), path)
      self.assertEqual(utils.get_checkpoint_dir(config, 0), path)

  def test_missing_or_empty_key_names_checkpoint_dir(self):
    with self.assertRaisesRegex(ValueError, "checkpoint_dir"):
      utils.get_checkpoint_dir(base_config.get_base_config())
    config = base_config.get_base_config()
    config.checkpoint_dir = ""
    with self.assertRaisesRegex(ValueError, "checkpoint_dir"):
      utils.get_checkpoint_dir(config)


class MaybeDeviceGetTest(absltest.TestCase):

  def test_fetches_jax_arrays_only(self):
    fetched = utils.maybe_device_get(jnp.arange(3))
    self.assertIsInstance(fetched, np.ndarray)
    np.testing.assert_array_equal(fetched, [0, 1, 2])
    host = np.ones(2)
    self.assertIs(utils.maybe_device_get(host), host)
    marker = object()
    self.assertIs(utils.maybe_device_get(marker), marker)


class _Module:
  """Stands in for an experiment: the two methods the checkpointer calls.

  It follows AbstractExperiment's convention: per-device `params` are saved
  as device 0's slice and broadcast again on restore; `extra` is saved whole.
  """

  def __init__(self, value=0.0):
    self.params = devices.bcast_local_devices(
        np.full((3,), value, np.float32))
    self.extra = {"counter": int(value), "table": np.arange(2) + value,
                  "history": [value]}
    self.received = []

  def snapshot_state(self):
    return {"params": devices.get_first(self.params), "extra": self.extra}

  def restore_from_snapshot(self, snapshot):
    self.received.append(snapshot)
    self.params = devices.bcast_local_devices(snapshot["params"])
    self.extra = snapshot["extra"]


class InMemoryCheckpointerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # Tests rebind the global dict, as the contract allows.
    self._saved_dict = utils.GLOBAL_CHECKPOINT_DICT
    utils.GLOBAL_CHECKPOINT_DICT = {}
    self.addCleanup(self._restore_global_dict)
    self.config = base_config.get_base_config()

  def _restore_global_dict(self):
    utils.GLOBAL_CHECKPOINT_DICT = self._saved_dict

  def _checkpointer(self, keep=5):
    self.config.max_checkpoints_to_keep = keep
    return utils.InMemoryCheckpointer(self.config, "train")

  def _live(self, checkpointer, step=0, value=0.0, series="latest"):
    state = checkpointer.get_experiment_state(series)
    state.global_step = step
    state.experiment_module = _Module(value)
    state.train_step_rng = devices.bcast_local_devices(
        jax.random.PRNGKey(int(value)))
    return state

  def _in_thread(self, fn):
    """Runs `fn` in another thread (with its own live state); returns it."""
    results, errors = [], []

    def target():
      try:
        results.append(fn())
      except BaseException as e:  # pylint: disable=broad-except
        errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(_WAIT_SECS)
    self.assertFalse(thread.is_alive())
    if errors:
      raise errors[0]
    return results[0]

  def test_mode_is_ignored_and_max_to_keep_read(self):
    for mode in ("train", "eval", "eval_test", "train_eval_multithreaded"):
      checkpointer = utils.InMemoryCheckpointer(self.config, mode)
      self.assertIsNone(checkpointer.wait_for_checkpointing_to_finish())
    # Only max_checkpoints_to_keep is needed.
    utils.InMemoryCheckpointer(
        config_dict.ConfigDict({"max_checkpoints_to_keep": 1}), "train")

  def test_get_experiment_state_creates_the_series(self):
    checkpointer = self._checkpointer()
    self.assertNotIn("latest", utils.GLOBAL_CHECKPOINT_DICT)
    state = checkpointer.get_experiment_state("latest")
    self.assertIsInstance(state, config_dict.ConfigDict)
    self.assertEmpty(state.keys())
    entry = utils.GLOBAL_CHECKPOINT_DICT["latest"]
    self.assertIsInstance(entry, utils.CheckpointNT)
    self.assertIsInstance(entry.active, threading.local)
    self.assertEqual(entry.history, [])
    self.assertIs(entry.active.state, state)
    self.assertIs(checkpointer.get_experiment_state("latest"), state)
    # Another checkpointer in the same thread sees the same live state.
    self.assertIs(self._checkpointer().get_experiment_state("latest"), state)
    self.assertIsNot(checkpointer.get_experiment_state("best"), state)

  def test_ids_rise_and_history_is_trimmed(self):
    checkpointer = self._checkpointer(keep=2)
    state = self._live(checkpointer)
    for step in range(5):
      state.global_step = step
      checkpointer.save("latest")
    history = utils.GLOBAL_CHECKPOINT_DICT["latest"].history
    self.assertEqual([entry.id for entry in history], [3, 4])
    self.assertEqual([entry.pickle_nest["global_step"] for entry in history],
                     [3, 4])
    self.assertIsInstance(history[0], utils.SnapshotNT)
    self.assertEqual(checkpointer.restore_path("latest"), "4")

  def test_first_id_is_zero_and_logged(self):
    checkpointer = self._checkpointer()
    self._live(checkpointer)
    with mock.patch.object(utils.logging, "info") as info:
      checkpointer.save("latest")
      checkpointer.save("latest")
      checkpointer.restore("latest")
    info.assert_any_call("Saved checkpoint %s with id %s.", "latest", 0)
    info.assert_any_call("Saved checkpoint %s with id %s.", "latest", 1)
    info.assert_any_call("Returned checkpoint %s with id %s.", "latest", 1)

  def test_restore_path_and_can_be_restored_types(self):
    # F9: 0.0.8 returned an int id and the history list.
    checkpointer = self._checkpointer()
    self.assertIsNone(checkpointer.restore_path("latest"))
    self.assertIs(checkpointer.can_be_restored("latest"), False)
    self._live(checkpointer)
    self.assertIsNone(checkpointer.restore_path("latest"))
    self.assertIs(checkpointer.can_be_restored("latest"), False)
    checkpointer.save("latest")
    self.assertEqual(checkpointer.restore_path("latest"), "0")
    self.assertIsInstance(checkpointer.restore_path("latest"), str)
    self.assertIs(checkpointer.can_be_restored("latest"), True)
    self.assertIs(checkpointer.can_be_restored("best"), False)

  def test_saving_a_series_never_created_raises_key_error(self):
    checkpointer = self._checkpointer()
    with self.assertRaises(KeyError):
      checkpointer.save("latest")

  def test_rebinding_the_global_dict_is_honoured(self):
    checkpointer = self._checkpointer()
    self._live(checkpointer)
    checkpointer.save("latest")
    old = utils.GLOBAL_CHECKPOINT_DICT
    utils.GLOBAL_CHECKPOINT_DICT = {}
    self.assertIs(checkpointer.can_be_restored("latest"), False)
    self.assertIsNone(checkpointer.restore_path("latest"))
    with self.assertRaises(KeyError):
      checkpointer.save("latest")
    state = checkpointer.get_experiment_state("latest")
    self.assertIn("latest", utils.GLOBAL_CHECKPOINT_DICT)
    self.assertNotIn("global_step", state)
    self.assertLen(old["latest"].history, 1)

  def test_pickle_nest_layout_and_access(self):
    checkpointer = self._checkpointer()
    state = self._live(checkpointer, step=6, value=2.0)
    checkpointer.save("latest")
    nest = utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1].pickle_nest
    self.assertEqual(nest["global_step"], 6)
    self.assertEqual(nest.global_step, 6)
    self.assertCountEqual(
        [key for key, _ in nest.items()],
        ["global_step", "experiment_module", "train_step_rng"])
    plain = nest.to_dict()
    self.assertIs(type(plain), dict)
    self.assertIs(type(plain["experiment_module"]), dict)
    self.assertCountEqual(plain["experiment_module"], ["params", "extra"])
    self.assertEqual(plain["global_step"], 6)
    # The module entry is snapshot_state(), keyed by checkpoint name, with
    # device 0's slice of the per-device params on the host.
    params = nest["experiment_module"]["params"]
    self.assertIsInstance(params, np.ndarray)
    np.testing.assert_array_equal(params, np.full((3,), 2.0))
    self.assertEqual(nest["experiment_module"]["extra"]["counter"], 2)
    rng_copy = nest["train_step_rng"]
    self.assertIsInstance(rng_copy, np.ndarray)
    np.testing.assert_array_equal(rng_copy, np.asarray(state.train_step_rng))

  def test_snapshot_keys_may_be_dotted_or_not_strings(self):
    checkpointer = self._checkpointer()
    state = self._live(checkpointer)
    module = state.experiment_module
    module.snapshot_state = lambda: {"params": np.zeros(3, np.float32),
                                     "extra": {}, "a.b": 1, 7: np.ones(2),
                                     ("t", 1): "tuple key"}
    checkpointer.save("latest")
    nest = utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1].pickle_nest
    self.assertEqual(nest["experiment_module"]["a.b"], 1)
    checkpointer.restore("latest")
    received = module.received[-1]
    self.assertEqual(received["a.b"], 1)
    np.testing.assert_array_equal(received[7], [1, 1])
    self.assertEqual(received[("t", 1)], "tuple key")

  def test_snapshots_are_frozen(self):
    # F8: later donation or mutation of live values must not reach history.
    checkpointer = self._checkpointer()
    state = self._live(checkpointer, step=1, value=1.0)
    module = state.experiment_module
    checkpointer.save("latest")
    module.extra["table"][:] = -7
    module.extra["history"].append("later")
    module.extra["counter"] = 99
    jax.jit(lambda p: p * 0, donate_argnums=0)(module.params)
    rng_before = np.asarray(state.train_step_rng).copy()
    jax.jit(lambda r: r, donate_argnums=0)(state.train_step_rng)
    nest = utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1].pickle_nest
    extra = nest["experiment_module"]["extra"]
    np.testing.assert_array_equal(extra["table"], [1, 2])
    self.assertEqual(extra["history"], [1.0])
    self.assertEqual(extra["counter"], 1)
    np.testing.assert_array_equal(nest["experiment_module"]["params"],
                                  np.ones(3))
    np.testing.assert_array_equal(nest["train_step_rng"], rng_before)

    state.train_step_rng = devices.bcast_local_devices(jax.random.PRNGKey(5))
    checkpointer.restore("latest")
    np.testing.assert_array_equal(module.params, np.ones((_n(), 3)))
    np.testing.assert_array_equal(module.extra["table"], [1, 2])
    self.assertEqual(module.extra["history"], [1.0])
    np.testing.assert_array_equal(state.train_step_rng, rng_before)
    # Restoring hands out copies: mutating them leaves history intact.
    module.extra["table"][:] = 0
    module.extra["history"].append("again")
    checkpointer.restore("latest")
    np.testing.assert_array_equal(module.extra["table"], [1, 2])
    self.assertEqual(module.extra["history"], [1.0])

  def test_restore_keeps_live_types(self):
    checkpointer = self._checkpointer()
    state = self._live(checkpointer, step=4, value=3.0)
    live_rng_sharding = state.train_step_rng.sharding
    checkpointer.save("latest")
    state.global_step = 10
    state.train_step_rng = devices.bcast_local_devices(jax.random.PRNGKey(8))
    checkpointer.restore("latest")
    self.assertIs(type(state.global_step), int)
    self.assertEqual(state.global_step, 4)
    self.assertIsInstance(state.train_step_rng, jax.Array)
    self.assertTrue(state.train_step_rng.sharding.is_equivalent_to(
        live_rng_sharding, 2))
    np.testing.assert_array_equal(
        state.train_step_rng,
        np.tile(np.asarray(jax.random.PRNGKey(3)), (_n(), 1)))
    # The ConfigDict's type checks accept the next step's updates.
    state.global_step += 1
    state.train_step_rng = devices.bcast_local_devices(jax.random.PRNGKey(1))

  def test_restore_from_snapshot_receives_jax_arrays(self):
    checkpointer = self._checkpointer()
    state = self._live(checkpointer, value=2.0)
    module = state.experiment_module
    per_device = devices.bcast_local_devices(np.arange(2, dtype=np.int32))
    module.extra = {"whole": per_device, "host": np.zeros(2)}
    checkpointer.save("latest")
    checkpointer.restore("latest")
    received = module.received[-1]
    self.assertIsInstance(received["params"], jax.Array)
    # Saved whole per-device arrays (eigengame) come back per-device.
    whole = received["extra"]["whole"]
    self.assertIsInstance(whole, jax.Array)
    self.assertTrue(whole.sharding.is_equivalent_to(
        devices.per_device_sharding(), 2))
    np.testing.assert_array_equal(whole, np.asarray(per_device))
    self.assertIsInstance(received["extra"]["host"], np.ndarray)

  def test_typed_keys_round_trip(self):
    checkpointer = self._checkpointer()
    state = checkpointer.get_experiment_state("latest")
    state.global_step = 0
    state.experiment_module = _Module()
    key = devices.bcast_local_devices(jax.random.key(21))
    state.train_step_rng = key
    checkpointer.save("latest")
    state.train_step_rng = devices.bcast_local_devices(jax.random.key(0))
    checkpointer.restore("latest")
    restored = state.train_step_rng
    self.assertTrue(jax.dtypes.issubdtype(restored.dtype, jax.dtypes.prng_key))
    self.assertEqual(restored.shape, (_n(),))
    self.assertTrue(restored.sharding.is_equivalent_to(key.sharding, 1))
    np.testing.assert_array_equal(jax.random.key_data(restored),
                                  jax.random.key_data(key))

  def test_missing_fields_keep_their_value_and_extra_fields_are_ignored(self):
    checkpointer = self._checkpointer()

    def save_in_other_thread():
      state = checkpointer.get_experiment_state("latest")
      state.global_step = 9
      state.experiment_module = _Module(4.0)
      state.only_in_snapshot = "ignored"
      checkpointer.save("latest")

    self._in_thread(save_in_other_thread)
    state = self._live(checkpointer, step=0, value=1.0)
    kept_rng = np.asarray(state.train_step_rng)
    state.only_live = 123
    checkpointer.restore("latest")
    self.assertEqual(state.global_step, 9)
    np.testing.assert_array_equal(state.train_step_rng, kept_rng)
    self.assertEqual(state.only_live, 123)
    self.assertNotIn("only_in_snapshot", state)
    np.testing.assert_array_equal(state.experiment_module.params,
                                  np.full((_n(), 3), 4.0))

  def test_threads_have_their_own_live_state_and_share_history(self):
    # train_eval_multithreaded: training saves in one thread, eval restores
    # in another.
    checkpointer = self._checkpointer()
    eval_state = self._live(checkpointer, step=0, value=0.0)

    def train_thread():
      state = checkpointer.get_experiment_state("latest")
      self.assertEmpty(state.keys())
      state.global_step = 17
      state.experiment_module = _Module(5.0)
      state.train_step_rng = None
      checkpointer.save("latest")
      return state

    train_state = self._in_thread(train_thread)
    self.assertIsNot(train_state, eval_state)
    self.assertEqual(eval_state.global_step, 0)
    self.assertIs(checkpointer.can_be_restored("latest"), True)
    checkpointer.restore("latest")
    self.assertEqual(eval_state.global_step, 17)
    np.testing.assert_array_equal(eval_state.experiment_module.params,
                                  np.full((_n(), 3), 5.0))
    self.assertIs(checkpointer.get_experiment_state("latest"), eval_state)

  def test_concurrent_saves_keep_unique_rising_ids(self):
    checkpointer = self._checkpointer(keep=100)

    def saver():
      self._live(checkpointer, step=1)
      for _ in range(10):
        checkpointer.save("latest")

    threads = [threading.Thread(target=saver) for _ in range(4)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(_WAIT_SECS)
    ids = [entry.id for entry in utils.GLOBAL_CHECKPOINT_DICT["latest"].history]
    self.assertEqual(ids, list(range(40)))

  def test_subclass_reads_history_after_super_save(self):
    # eigengame reads the newest pickle_nest right after saving.

    class Inspecting(utils.InMemoryCheckpointer):

      def save(self, ckpt_series):
        super().save(ckpt_series)
        nest = utils.GLOBAL_CHECKPOINT_DICT[ckpt_series].history[-1].pickle_nest
        self.last_step = nest["global_step"]

    checkpointer = Inspecting(self.config, "train")
    self._live(checkpointer, step=12)
    checkpointer.save("latest")
    self.assertEqual(checkpointer.last_step, 12)

  def test_restore_accepts_a_plain_mapping(self):
    checkpointer = self._checkpointer()
    utils.GLOBAL_CHECKPOINT_DICT["latest"] = utils.CheckpointNT(
        threading.local(), [utils.SnapshotNT(0, types.MappingProxyType({
            "global_step": np.int64(8),
            "experiment_module": {"params": np.full((3,), 6.0, np.float32),
                                  "extra": {"counter": 6}},
        }))])
    state = self._live(checkpointer)
    checkpointer.restore("latest")
    self.assertIs(type(state.global_step), int)
    self.assertEqual(state.global_step, 8)
    np.testing.assert_array_equal(state.experiment_module.params,
                                  np.full((_n(), 3), 6.0))

  def test_restore_hand_built_0_0_8_config_dict(self):
    checkpointer = self._checkpointer()
    old_rng = np.tile(np.array([1, 2], np.uint32), (_n(), 1))
    nest = config_dict.ConfigDict({
        "global_step": 3,
        "experiment_module": {"params": np.full((3,), 2.0, np.float32),
                              "extra": {"counter": 2}},
        "train_step_rng": old_rng,
    })
    utils.GLOBAL_CHECKPOINT_DICT["latest"] = utils.CheckpointNT(
        threading.local(), [utils.SnapshotNT(0, nest)])
    state = self._live(checkpointer)
    live_sharding = state.train_step_rng.sharding
    checkpointer.restore("latest")
    self.assertEqual(state.global_step, 3)
    self.assertIsInstance(state.train_step_rng, jax.Array)
    self.assertTrue(state.train_step_rng.sharding.is_equivalent_to(
        live_sharding, 2))
    np.testing.assert_array_equal(state.train_step_rng, old_rng)
    np.testing.assert_array_equal(state.experiment_module.params,
                                  np.full((_n(), 3), 2.0))

  def test_restore_old_layout_with_an_experiment_instance(self):
    # D1 (ogb_lsc, deeprte): pickle_nest is a plain dict whose
    # experiment_module is an experiment *instance* holding per-device values.

    class OldExperiment:
      CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt"}
      NON_BROADCAST_CHECKPOINT_ATTRS = {"_python_step": "python_step"}

    class LiveExperiment:
      CHECKPOINT_ATTRS = {"_params": "params"}
      NON_BROADCAST_CHECKPOINT_ATTRS = {"_python_step": "python_step"}

      def __init__(self):
        self._params = None
        self._python_step = 0

      def restore_from_snapshot(self, snapshot):
        raise AssertionError("the old layout restores by attribute name")

    saved = OldExperiment()
    saved._params = devices.bcast_local_devices(np.arange(3.0))
    saved._opt_state = {"mu": devices.bcast_local_devices(np.zeros(2))}
    saved._python_step = 40
    utils.GLOBAL_CHECKPOINT_DICT["latest"] = utils.CheckpointNT(
        threading.local(), [utils.SnapshotNT(0, {
            "global_step": np.int64(40), "experiment_module": saved})])

    checkpointer = self._checkpointer()
    self.assertIs(checkpointer.can_be_restored("latest"), True)
    self.assertEqual(checkpointer.restore_path("latest"), "0")
    state = checkpointer.get_experiment_state("latest")
    state.global_step = 0
    state.experiment_module = LiveExperiment()
    checkpointer.restore("latest")
    live = state.experiment_module
    self.assertIs(type(state.global_step), int)
    self.assertEqual(state.global_step, 40)
    # Per-device values are taken as they are, not broadcast again.
    self.assertEqual(live._params.shape, (_n(), 3))
    np.testing.assert_array_equal(live._params, np.asarray(saved._params))
    # Attributes in the saved object's maps are copied, even ones the live
    # class does not list.
    self.assertEqual(live._opt_state["mu"].shape, (_n(), 2))
    self.assertEqual(live._python_step, 40)
    # Users read the step back after training.
    self.assertEqual(
        utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1].pickle_nest[
            "global_step"], 40)

  def test_best_series_fields(self):
    checkpointer = self._checkpointer()
    best = self._live(checkpointer, step=2, value=1.0, series="best")
    best.best_eval_metric_value = 0.75
    best.best_model_eval_metric = "accuracy"
    checkpointer.save("best")
    best.best_eval_metric_value = 0.1
    best.best_model_eval_metric = "loss"
    checkpointer.restore("best")
    self.assertEqual(best.best_eval_metric_value, 0.75)
    self.assertIs(type(best.best_eval_metric_value), float)
    self.assertEqual(best.best_model_eval_metric, "accuracy")
    self.assertIs(checkpointer.can_be_restored("latest"), False)

  def test_restore_leaves_other_threads_live_state_alone(self):
    checkpointer = self._checkpointer()
    state = self._live(checkpointer, step=3, value=3.0)
    checkpointer.save("latest")

    def other_thread():
      other = self._live(checkpointer, step=50, value=9.0)
      checkpointer.restore("latest")
      return other.global_step

    self.assertEqual(self._in_thread(other_thread), 3)
    self.assertEqual(state.global_step, 3)
    np.testing.assert_array_equal(state.experiment_module.params,
                                  np.full((_n(), 3), 3.0))
    state.global_step = 4
    self.assertEqual(
        utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1].pickle_nest[
            "global_step"], 3)


if __name__ == "__main__":
  absltest.main()
