"""Tests for jaxline.sharding, the sharded style's helpers.

They run in-process on whatever devices the process has: 1 CPU device in a
plain run, 8 under XLA_FLAGS=--xla_force_host_platform_device_count=8 (the
second CI pass). In a 1-device run, `SeveralDevicesTest` runs this file again
in a subprocess with 4 forced devices, so the multi-device paths are always
covered. tests/multihost_test.py covers arrays that span processes.
"""

import collections
import os
import signal
import subprocess
import sys
import threading
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from conftest import subprocess_env
from jaxline import concurrency
from jaxline import sharding

P = jax.sharding.PartitionSpec

_Pair = collections.namedtuple("_Pair", ["a", "b"])

_WAIT_SECS = 30  # Generous: only reached if something is broken.


def _n():
  return jax.device_count()


def _shards_in_mesh_order(x, mesh):
  """(device, index, data) of each shard, in the mesh's device order."""
  by_device = {s.device: s for s in x.addressable_shards}
  return [by_device[d] for d in mesh.devices.ravel()]


def _assert_split(test, result, value, mesh=None):
  """`result` is `value` with its leading axis split over `mesh` in order."""
  mesh = mesh or sharding.data_parallel_mesh()
  n = mesh.devices.size
  rows = value.shape[0] // n
  test.assertEqual(result.sharding, jax.sharding.NamedSharding(
      mesh, P(mesh.axis_names[0])))
  test.assertEqual(result.shape, value.shape)
  for i, shard in enumerate(_shards_in_mesh_order(result, mesh)):
    test.assertEqual(shard.device, mesh.devices.ravel()[i])
    test.assertEqual(shard.data.shape, (rows,) + value.shape[1:])
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  value[i * rows:(i + 1) * rows])


class MeshTest(absltest.TestCase):

  def test_mesh_spans_every_device_in_order(self):
    mesh = sharding.data_parallel_mesh()
    self.assertEqual(mesh.axis_names, ("data",))
    self.assertEqual(sharding.DATA_AXIS, "data")
    self.assertEqual(list(mesh.devices.ravel()), jax.devices())
    self.assertEqual(dict(mesh.shape), {"data": _n()})

  def test_mesh_axes_are_auto(self):
    mesh = sharding.data_parallel_mesh()
    self.assertEqual(tuple(mesh.axis_types),
                     (jax.sharding.AxisType.Auto,))

  def test_same_mesh_every_call(self):
    self.assertIs(sharding.data_parallel_mesh(), sharding.data_parallel_mesh())
    self.assertEqual(sharding.data_parallel_mesh(),
                     jax.sharding.Mesh(np.array(jax.devices()), ("data",)))

  def test_custom_axis_name(self):
    mesh = sharding.data_parallel_mesh("batch")
    self.assertEqual(mesh.axis_names, ("batch",))
    self.assertEqual(sharding.batch_sharded(mesh).spec, P("batch"))
    self.assertIsNot(mesh, sharding.data_parallel_mesh())

  def test_shardings(self):
    mesh = sharding.data_parallel_mesh()
    self.assertEqual(sharding.replicated(), jax.sharding.NamedSharding(
        mesh, P()))
    self.assertEqual(sharding.batch_sharded(), jax.sharding.NamedSharding(
        mesh, P("data")))
    other = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ("x",))
    self.assertEqual(sharding.replicated(other).mesh, other)
    self.assertEqual(sharding.batch_sharded(other).spec, P("x"))


class ReplicateTest(parameterized.TestCase):

  def assert_replicated(self, result, value, mesh=None):
    mesh = mesh or sharding.data_parallel_mesh()
    self.assertIsInstance(result, jax.Array)
    self.assertEqual(result.sharding,
                     jax.sharding.NamedSharding(mesh, P()))
    self.assertTrue(result.is_fully_replicated)
    self.assertEqual(result.sharding.device_set, set(mesh.devices.ravel()))
    self.assertEqual(result.shape, np.shape(value))
    for shard in result.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), value)

  @parameterized.named_parameters(
      ("int", 3, np.int32),
      ("float", 1.5, np.float32),
      ("bool", True, np.bool_),
      ("int32_vector", np.arange(5, dtype=np.int32), np.int32),
      ("float_matrix", np.ones([2, 3], np.float32), np.float32),
      ("uint32_key", np.array([0, 42], np.uint32), np.uint32),
      ("int8_scalar", np.int8(-4), np.int8),
  )
  def test_values(self, value, dtype):
    result = sharding.replicate(value)
    self.assert_replicated(result, value)
    self.assertEqual(result.dtype, dtype)

  def test_jax_array_on_one_device(self):
    value = jax.device_put(jnp.arange(4.0), jax.devices()[-1])
    self.assert_replicated(sharding.replicate(value), np.arange(4.0))

  def test_array_already_sharded(self):
    sharded = sharding.shard(np.arange(2 * _n(), dtype=np.float32))
    self.assert_replicated(sharding.replicate(sharded),
                           np.arange(2 * _n(), dtype=np.float32))

  def test_pytree(self):
    tree = {"w": np.ones([2], np.float32), "nested": [np.int32(1), None],
            "pair": _Pair(a=2.0, b=np.zeros([3], np.int32))}
    result = sharding.replicate(tree)
    self.assertEqual(jax.tree.structure(result), jax.tree.structure(tree))
    self.assertIsNone(result["nested"][1])
    self.assertIsInstance(result["pair"], _Pair)
    self.assert_replicated(result["w"], tree["w"])
    self.assert_replicated(result["nested"][0], 1)
    self.assert_replicated(result["pair"].a, 2.0)
    self.assert_replicated(result["pair"].b, tree["pair"].b)

  def test_empty_tree(self):
    self.assertEqual(sharding.replicate({}), {})
    self.assertIsNone(sharding.replicate(None))

  def test_explicit_mesh(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ("other",))
    value = np.arange(3, dtype=np.float32)
    self.assert_replicated(sharding.replicate(value, mesh), value, mesh)

  @parameterized.named_parameters(("threefry", "threefry2x32"),
                                  ("rbg", "rbg"))
  def test_typed_key(self, impl):
    key = jax.random.key(7, impl=impl)
    result = sharding.replicate(key)
    self.assertTrue(jax.dtypes.issubdtype(result.dtype, jax.dtypes.prng_key))
    self.assertEqual(str(jax.random.key_impl(result)), str(
        jax.random.key_impl(key)))
    self.assertEqual(result.sharding, sharding.replicated())
    self.assertTrue(result.is_fully_replicated)
    np.testing.assert_array_equal(jax.random.key_data(result),
                                  jax.random.key_data(key))
    # Usable as a key, with the same draws.
    np.testing.assert_array_equal(jax.random.uniform(result, [3]),
                                  jax.random.uniform(key, [3]))

  def test_jit_keeps_replicated_values_replicated(self):
    params = sharding.replicate(np.arange(3, dtype=np.float32))
    out = jax.jit(lambda p: p * 2)(params)
    self.assertTrue(out.is_fully_replicated)
    self.assertEqual(out.sharding.device_set, set(jax.devices()))
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])


class ShardTest(parameterized.TestCase):

  @parameterized.parameters(1, 3)
  def test_leading_axis_split_in_mesh_order(self, rows_per_device):
    value = np.arange(_n() * rows_per_device * 2,
                      dtype=np.float32).reshape(-1, 2)
    _assert_split(self, sharding.shard(value), value)

  def test_pytree(self):
    n = _n()
    tree = {"x": np.arange(4 * n * 3, dtype=np.float32).reshape(4 * n, 3),
            "y": np.arange(4 * n, dtype=np.int32)}
    result = sharding.shard(tree)
    self.assertEqual(set(result), {"x", "y"})
    _assert_split(self, result["x"], tree["x"])
    _assert_split(self, result["y"], tree["y"])
    self.assertEqual(result["y"].dtype, np.int32)

  def test_explicit_mesh(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ("rows",))
    value = np.arange(2 * _n(), dtype=np.int32)
    _assert_split(self, sharding.shard(value, mesh), value, mesh)

  def test_indivisible_leading_axis_fails(self):
    if _n() == 1:
      self.skipTest("Every size divides over one device.")
    with self.assertRaises(ValueError):
      sharding.shard(np.arange(_n() + 1))

  def test_typed_keys(self):
    keys = jax.random.split(jax.random.key(0), 2 * _n())
    result = sharding.shard(keys)
    self.assertTrue(jax.dtypes.issubdtype(result.dtype, jax.dtypes.prng_key))
    self.assertEqual(result.sharding, sharding.batch_sharded())
    np.testing.assert_array_equal(jax.random.key_data(result),
                                  jax.random.key_data(keys))

  def test_jit_over_a_sharded_batch(self):
    x = np.arange(4 * _n(), dtype=np.float32)
    params = sharding.replicate(np.float32(2.0))
    loss = jax.jit(lambda p, b: jnp.mean((p * b) ** 2),
                   out_shardings=sharding.replicated())(
                       params, sharding.shard(x))
    self.assertTrue(loss.is_fully_replicated)
    np.testing.assert_allclose(loss, np.mean((2 * x) ** 2), rtol=1e-6)


class HostBatchToGlobalTest(parameterized.TestCase):

  def test_single_process_batch_is_the_global_batch(self):
    self.assertEqual(jax.process_count(), 1)
    value = np.arange(2 * _n() * 3, dtype=np.float32).reshape(2 * _n(), 3)
    result = sharding.host_batch_to_global(value)
    self.assertEqual(result.shape, value.shape)
    self.assertEqual(result.sharding, sharding.batch_sharded())
    _assert_split(self, result, value)

  def test_pytree_and_dtypes(self):
    n = _n()
    batch = {"image": np.ones([2 * n, 4, 4, 1], np.uint8),
             "label": np.arange(2 * n, dtype=np.int32)}
    result = sharding.host_batch_to_global(batch)
    self.assertEqual(result["image"].dtype, np.uint8)
    self.assertEqual(result["label"].dtype, np.int32)
    self.assertEqual(result["image"].shape, (2 * n, 4, 4, 1))
    np.testing.assert_array_equal(result["label"], batch["label"])
    for leaf in jax.tree.leaves(result):
      self.assertEqual(leaf.sharding, sharding.batch_sharded())

  def test_explicit_mesh(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ("b",))
    value = np.arange(_n() * 2, dtype=np.float32)
    result = sharding.host_batch_to_global(value, mesh)
    _assert_split(self, result, value, mesh)


class ToHostTest(parameterized.TestCase):

  def test_arrays_become_numpy(self):
    n = _n()
    tree = {"replicated": sharding.replicate(np.float32(1.5)),
            "sharded": sharding.shard(np.arange(2 * n, dtype=np.int32)),
            "plain": jnp.arange(3.0)}
    result = sharding.to_host(tree)
    for name, leaf in result.items():
      self.assertIsInstance(leaf, np.ndarray, name)
    np.testing.assert_array_equal(result["replicated"], np.float32(1.5))
    self.assertEqual(result["replicated"].shape, ())
    np.testing.assert_array_equal(result["sharded"], np.arange(2 * n))
    self.assertEqual(result["sharded"].dtype, np.int32)
    np.testing.assert_array_equal(result["plain"], [0.0, 1.0, 2.0])

  def test_other_leaves_pass_through(self):
    array = np.arange(3)
    tree = {"n": 3, "s": "text", "none": None, "np": array,
            "list": [1.0, _Pair(a=2, b=None)]}
    result = sharding.to_host(tree)
    self.assertEqual(result["n"], 3)
    self.assertEqual(result["s"], "text")
    self.assertIsNone(result["none"])
    self.assertIs(result["np"], array)
    self.assertEqual(result["list"], [1.0, _Pair(a=2, b=None)])

  def test_jit_output(self):
    loss = jax.jit(jnp.sum, out_shardings=sharding.replicated())(
        sharding.shard(np.ones([_n()], np.float32)))
    self.assertEqual(float(sharding.to_host(loss)), float(_n()))


class PlaceTest(parameterized.TestCase):

  def test_numpy_to_each_kind_of_sharding(self):
    value = np.arange(2 * _n(), dtype=np.float32)
    for target in (sharding.replicated(), sharding.batch_sharded(),
                   jax.sharding.SingleDeviceSharding(jax.devices()[-1])):
      result = sharding.place(value, target)
      self.assertEqual(result.sharding, target)
      np.testing.assert_array_equal(result, value)

  def test_python_values(self):
    result = sharding.place([[1, 2], [3, 4]], sharding.replicated())
    self.assertEqual(result.shape, (2, 2))
    self.assertEqual(result.dtype, np.int32)
    np.testing.assert_array_equal(result, [[1, 2], [3, 4]])

  def test_moves_a_jax_array(self):
    value = jax.device_put(jnp.arange(2.0 * _n()), jax.devices()[0])
    result = sharding.place(value, sharding.batch_sharded())
    self.assertEqual(result.sharding, sharding.batch_sharded())
    np.testing.assert_array_equal(result, np.arange(2.0 * _n()))

  @parameterized.named_parameters(("threefry", "threefry2x32"),
                                  ("rbg", "rbg"))
  def test_typed_keys(self, impl):
    keys = jax.random.split(jax.random.key(3, impl=impl), _n())
    for target in (sharding.replicated(), sharding.batch_sharded()):
      result = sharding.place(keys, target)
      self.assertTrue(
          jax.dtypes.issubdtype(result.dtype, jax.dtypes.prng_key))
      self.assertEqual(str(jax.random.key_impl(result)), impl)
      self.assertEqual(result.shape, (_n(),))
      # A key's sharding may spell "replicated" as P(None) rather than P().
      self.assertTrue(result.sharding.is_equivalent_to(target, result.ndim),
                      (result.sharding, target))
      np.testing.assert_array_equal(jax.random.key_data(result),
                                    jax.random.key_data(keys))

  def test_scalar_typed_key(self):
    key = jax.random.key(11)
    result = sharding.place(key, sharding.replicated())
    self.assertEqual(result.shape, ())
    np.testing.assert_array_equal(jax.random.key_data(result),
                                  jax.random.key_data(key))

  def test_raw_key(self):
    key = jax.random.PRNGKey(42)
    result = sharding.place(key, sharding.replicated())
    self.assertEqual(result.dtype, np.uint32)
    np.testing.assert_array_equal(result, [0, 42])
    self.assertTrue(result.is_fully_replicated)


def _host_batch(i):
  """This process's share of batch i, told apart from the others by i."""
  rows = 2 * _n()
  return {"x": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) +
               100 * i,
          "y": np.full((rows,), i, np.int32)}


def _host_batches(num, pulled=None):
  for i in range(num):
    if pulled is not None:
      pulled.append(i)
    yield _host_batch(i)


class DoubleBufferGlobalTest(parameterized.TestCase):

  def _consume(self, ds):
    """The batches `ds` gave before it raised, and the error."""
    received = []
    try:
      for batch in ds:
        received.append(batch)
    except Exception as e:  # pylint: disable=broad-except
      return received, e
    self.fail(f"No error after {len(received)} batches.")

  def test_values_order_and_shardings(self):
    batches = list(sharding.double_buffer_global(_host_batches(5)))
    self.assertLen(batches, 5)
    for batch, expected in zip(batches, _host_batches(5)):
      self.assertEqual(set(batch), {"x", "y"})
      self.assertIsInstance(batch["x"], jax.Array)
      self.assertEqual(batch["y"].dtype, np.int32)
      _assert_split(self, batch["x"], expected["x"])
      _assert_split(self, batch["y"], expected["y"])

  def test_same_placement_as_host_batch_to_global(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ("b",))
    for batch, host in zip(
        sharding.double_buffer_global(_host_batches(3), mesh=mesh),
        _host_batches(3)):
      expected = sharding.host_batch_to_global(host, mesh)
      for name in ("x", "y"):
        self.assertEqual(batch[name].sharding, expected[name].sharding)
        _assert_split(self, batch[name], host[name], mesh)

  def test_explicit_sharding(self):
    target = sharding.replicated()
    batches = list(sharding.double_buffer_global(_host_batches(2),
                                                 sharding=target))
    for batch, host in zip(batches, _host_batches(2)):
      for name in ("x", "y"):
        self.assertEqual(batch[name].sharding, target)
        self.assertTrue(batch[name].is_fully_replicated)
        np.testing.assert_array_equal(batch[name], host[name])

  def test_mesh_and_sharding_together_are_refused(self):
    with self.assertRaisesRegex(ValueError, "not both"):
      sharding.double_buffer_global(
          iter([]), mesh=sharding.data_parallel_mesh(),
          sharding=sharding.batch_sharded())

  def test_feeds_a_jitted_step(self):
    step = jax.jit(lambda total, batch: total + jnp.sum(batch["y"]),
                   out_shardings=sharding.replicated())
    total = sharding.replicate(np.int32(0))
    for batch in sharding.double_buffer_global(_host_batches(4)):
      total = step(total, batch)
    self.assertEqual(int(sharding.to_host(total)), 2 * _n() * (0 + 1 + 2 + 3))

  def test_empty_dataset(self):
    self.assertEqual(list(sharding.double_buffer_global(iter([]))), [])

  def test_pulls_nothing_before_iteration_and_one_batch_ahead(self):
    pulled = []
    batches = sharding.double_buffer_global(_host_batches(3, pulled))
    self.assertEqual(pulled, [])
    next(batches)
    self.assertEqual(pulled, [0, 1])
    next(batches)
    self.assertEqual(pulled, [0, 1, 2])

  def test_none_item_comes_after_the_batches_before_it(self):
    first, second = _host_batch(0), _host_batch(1)
    received, error = self._consume(
        sharding.double_buffer_global(iter([first, second, None, first])))
    self.assertLen(received, 2)
    self.assertIsInstance(error, ValueError)
    self.assertIn("double_buffer_global got a None item", str(error))

  def test_dataset_error_comes_at_its_batch(self):
    failure = IOError("disk gone")

    def source():
      yield from _host_batches(2)
      raise failure

    received, error = self._consume(sharding.double_buffer_global(source()))
    self.assertLen(received, 2)
    np.testing.assert_array_equal(received[1]["y"], np.full((2 * _n(),), 1))
    self.assertIs(error, failure)

  def test_placement_error_comes_instead_of_its_batch(self):
    good = _host_batch(0)
    # A scalar cannot be split along a leading axis.
    received, error = self._consume(sharding.double_buffer_global(
        iter([good, {"x": np.float32(1.0), "y": good["y"]}, good])))
    self.assertLen(received, 1)
    self.assertIsInstance(error, ValueError)

  def test_reused_host_buffer_is_copied(self):
    buffer = np.zeros((2 * _n(), 3), np.float32)

    def source():
      for i in range(20):
        buffer[...] = i  # One buffer, refilled for every batch.
        yield {"x": buffer}

    batches = []
    for i, batch in enumerate(sharding.double_buffer_global(source())):
      np.testing.assert_array_equal(batch["x"], np.full(buffer.shape, i))
      batches.append(batch)
    for i, batch in enumerate(batches):  # Nothing aliases the buffer.
      np.testing.assert_array_equal(batch["x"], np.full(buffer.shape, i))

  def test_next_batch_is_placed_while_the_step_on_this_one_runs(self):
    # Overlap, with no clock: the "step" on batch i does not end until
    # batch i+1's placement has started in another thread. Were placement
    # serial with the steps, the wait would time out.
    num = 4
    events = []  # Appended to by both threads.
    placing = [threading.Event() for _ in range(num)]
    place = jax.make_array_from_process_local_data

    def recording_place(target, x, *args, **kwargs):
      i = int(x.reshape(-1)[0])
      events.append(("placing", i, threading.current_thread()))
      placing[i].set()
      return place(target, x, *args, **kwargs)

    def source():
      for i in range(num):
        events.append(("pulled", i, threading.current_thread()))
        yield np.full((2 * _n(),), i, np.int32)

    with mock.patch.object(jax, "make_array_from_process_local_data",
                           side_effect=recording_place):
      for i, batch in enumerate(sharding.double_buffer_global(source())):
        events.append(("step", i, threading.current_thread()))
        if i + 1 < num:
          self.assertTrue(placing[i + 1].wait(_WAIT_SECS),
                          f"batch {i + 1} was not placed during step {i}")
        np.testing.assert_array_equal(batch, np.full((2 * _n(),), i))
        events.append(("step done", i, threading.current_thread()))

    order = [(what, i) for what, i, _ in events]
    for i in range(num - 1):
      self.assertLess(order.index(("pulled", i + 1)), order.index(("step", i)))
      self.assertLess(order.index(("placing", i + 1)),
                      order.index(("step done", i)))
    me = threading.current_thread()
    self.assertTrue(all(thread is not me
                        for what, _, thread in events if what == "placing"))

  def test_host_work_and_placement_overlap_under_py_prefetch(self):
    # Under py_prefetch the host side of batches i+1 and i+2 runs in the
    # producer thread while the step on batch i runs: again no clock.
    num = 5
    generated = [threading.Event() for _ in range(num)]
    me = threading.current_thread()
    threads = []

    def source():
      for i in range(num):
        threads.append(threading.current_thread())
        generated[i].set()
        yield _host_batch(i)

    batches = sharding.double_buffer_global(
        concurrency.py_prefetch(source, buffer_size=2))
    for i, batch in enumerate(batches):
      if i + 2 < num:
        self.assertTrue(generated[i + 2].wait(_WAIT_SECS),
                        f"batch {i + 2} was not made during step {i}")
      np.testing.assert_array_equal(batch["y"], np.full((2 * _n(),), i))
    self.assertLen(threads, num)
    self.assertTrue(all(thread is not me for thread in threads))


class SeveralDevicesTest(absltest.TestCase):

  def test_this_file_on_four_devices(self):
    if jax.device_count() > 1:
      self.skipTest("Already running on several devices.")
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.abspath(__file__)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=subprocess_env(4), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
      output, _ = process.communicate(timeout=300)
    finally:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    self.assertEqual(process.returncode, 0, output[-6000:])
    self.assertIn("passed", output)
    self.assertNotIn("failed", output)


if __name__ == "__main__":
  absltest.main()
