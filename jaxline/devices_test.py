"""Tests for jaxline.devices.

The per-device layout is what user code written for pmap receives and hands
back, so it must match a pmap output exactly (device order included), and
frozen snapshots must be immune to later donation or mutation of live arrays.
"""

import collections
import types

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np

from jaxline import devices


def _shard_devices_by_index(x):
  """The device holding each slice of axis 0, in index order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return [s.device for s in shards]


class BcastLocalDevicesTest(parameterized.TestCase):

  def assert_per_device(self, result, value):
    """`result` is `value` once per local device, laid out like pmap output."""
    n = jax.local_device_count()
    self.assertIsInstance(result, jax.Array)
    self.assertEqual(result.shape, (n,) + np.shape(value))
    self.assertTrue(
        result.sharding.is_equivalent_to(devices.per_device_sharding(),
                                         result.ndim))
    self.assertEqual(_shard_devices_by_index(result), jax.local_devices())
    for shard in result.addressable_shards:
      self.assertEqual(shard.data.shape, (1,) + np.shape(value))
      np.testing.assert_array_equal(np.asarray(shard.data)[0],
                                    np.asarray(value))

  @parameterized.named_parameters(
      ("int", 3, np.int32),
      ("float", 1.5, np.float32),
      ("bool", True, np.bool_),
  )
  def test_python_scalars(self, value, dtype):
    result = devices.bcast_local_devices(value)
    self.assert_per_device(result, value)
    self.assertEqual(result.dtype, dtype)

  @parameterized.named_parameters(
      ("scalar", np.float32(2.5)),
      ("vector", np.arange(5, dtype=np.int32)),
      ("matrix", np.arange(6, dtype=np.float32).reshape(2, 3)),
      ("uint32", np.array([0, 42], dtype=np.uint32)),
  )
  def test_numpy(self, value):
    result = devices.bcast_local_devices(value)
    self.assert_per_device(result, value)
    self.assertEqual(result.dtype, value.dtype)

  def test_numpy_source_is_not_aliased(self):
    # On CPU, device_put may alias a numpy buffer, depending on its
    # alignment; several arrays make a missed copy show up reliably.
    for _ in range(20):
      value = np.arange(1024, dtype=np.float32)
      result = devices.bcast_local_devices(value)
      value[:] = -1
      for row in np.asarray(result):
        np.testing.assert_array_equal(row, np.arange(1024))

  @parameterized.named_parameters(
      ("vector", lambda: jnp.arange(3.0)),
      ("scalar", lambda: jnp.int32(7)),
      ("on_last_device",
       lambda: jax.device_put(jnp.ones((2, 2)), jax.local_devices()[-1])),
  )
  def test_jax_array(self, make):
    value = make()
    result = devices.bcast_local_devices(value)
    self.assert_per_device(result, np.asarray(value))
    self.assertEqual(result.dtype, value.dtype)

  def test_per_device_value_of_a_pmap_output(self):
    # Snapshots of per-device values hold device 0's slice; restoring
    # broadcasts that slice again.
    doubled = jax.pmap(lambda x: x * 2)(
        devices.bcast_local_devices(np.arange(3.0, dtype=np.float32)))
    result = devices.bcast_local_devices(devices.get_first(doubled))
    self.assert_per_device(result, np.arange(3.0) * 2)

  @parameterized.named_parameters(
      ("threefry", "threefry2x32"),
      ("rbg", "rbg"),
  )
  def test_typed_keys(self, impl):
    key = jax.random.key(7, impl=impl)
    result = devices.bcast_local_devices(key)
    n = jax.local_device_count()
    self.assertTrue(jax.dtypes.issubdtype(result.dtype, jax.dtypes.prng_key))
    self.assertEqual(jax.random.key_impl(result), jax.random.key_impl(key))
    self.assertEqual(result.shape, (n,))
    self.assertEqual(_shard_devices_by_index(result), jax.local_devices())
    data = np.asarray(jax.random.key_data(result))
    for row in data:
      np.testing.assert_array_equal(row, jax.random.key_data(key))

  def test_raw_key(self):
    key = jax.random.PRNGKey(42)
    result = devices.bcast_local_devices(key)
    self.assert_per_device(result, np.array([0, 42], np.uint32))

  @parameterized.named_parameters(
      ("none", None),
      ("empty_dict", {}),
      ("empty_list", []),
  )
  def test_empty_trees_pass_through(self, value):
    self.assertEqual(devices.bcast_local_devices(value), value)
    self.assertIs(type(devices.bcast_local_devices(value)), type(value))

  def test_pytree_structure_is_kept_and_none_leaves_stay_none(self):
    tree = {"w": np.ones((2,), np.float32), "opt": (jnp.zeros(()), None),
            "step": 4}
    result = devices.bcast_local_devices(tree)
    self.assertEqual(jax.tree.structure(result), jax.tree.structure(tree))
    self.assertIsNone(result["opt"][1])
    self.assert_per_device(result["w"], tree["w"])
    self.assert_per_device(result["opt"][0], np.zeros(()))
    self.assert_per_device(result["step"], 4)

  def test_sharding_matches_a_pmap_output(self):
    value = devices.bcast_local_devices(np.arange(4, dtype=np.float32))
    out = jax.pmap(lambda x: x + 1)(value)
    self.assertTrue(value.sharding.is_equivalent_to(out.sharding, value.ndim))

  def test_pmap_consumes_it_without_a_transfer(self):
    value = devices.bcast_local_devices(np.arange(4, dtype=np.float32))
    fn = jax.pmap(lambda x: x * 3)
    np.testing.assert_array_equal(
        fn(value), np.tile(np.arange(4) * 3, (jax.local_device_count(), 1)))
    # The layout already is pmap's, so a second call needs no resharding
    # copy (a transfer of a numpy argument would be refused here).
    with jax.transfer_guard("disallow"):
      out = fn(value)
    self.assertEqual(out.shape, value.shape)

  def test_pmapped_collective_sees_one_slice_per_device(self):
    n = jax.local_device_count()
    value = devices.bcast_local_devices(np.float32(2.0))
    total = jax.pmap(lambda x: jax.lax.psum(x, "d"), axis_name="d")(value)
    np.testing.assert_array_equal(total, np.full((n,), 2.0 * n))

  def test_per_device_sharding_is_over_local_devices_in_order(self):
    sharding = devices.per_device_sharding()
    self.assertEqual(list(sharding.mesh.devices.flat), jax.local_devices())
    self.assertEqual(sharding.spec, jax.sharding.PartitionSpec(
        devices.LOCAL_AXIS))
    self.assertEqual(sharding.mesh.axis_names, (devices.LOCAL_AXIS,))


class GetFirstTest(parameterized.TestCase):

  def test_reads_device_zero_slice_of_a_per_device_array(self):
    n = jax.local_device_count()
    value = jax.pmap(lambda x: x * 10)(
        devices.bcast_local_devices(np.float32(1.0)) +
        jnp.arange(n, dtype=jnp.float32))
    first = devices.get_first(value)
    self.assertEqual(first.shape, ())
    self.assertEqual(float(first), 10.0 * 1.0)

  def test_distinct_slices_pick_index_zero(self):
    n = jax.local_device_count()
    host = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
    value = jax.device_put(host, devices.per_device_sharding())
    np.testing.assert_array_equal(devices.get_first(value), host[0])

  def test_does_not_gather(self):
    # F2: the result is read from the shard on device 0, so it lives there
    # alone; indexing the global array would give an array over every device.
    n = jax.local_device_count()
    host = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    value = jax.device_put(host, devices.per_device_sharding())
    first = devices.get_first(value)
    self.assertEqual(first.devices(), {jax.local_devices()[0]})
    np.testing.assert_array_equal(first, host[0])

  def test_typed_keys(self):
    keys = devices.bcast_local_devices(jax.random.key(3))
    first = devices.get_first(keys)
    self.assertEqual(first.shape, ())
    np.testing.assert_array_equal(jax.random.key_data(first),
                                  jax.random.key_data(jax.random.key(3)))

  def test_numpy_and_python_containers(self):
    tree = {"a": np.arange(6).reshape(3, 2), "b": [np.array([5, 6])]}
    first = devices.get_first(tree)
    np.testing.assert_array_equal(first["a"], [0, 1])
    self.assertEqual(first["b"][0], 5)
    self.assertIsInstance(first["a"], np.ndarray)

  def test_none_leaves_pass_through(self):
    self.assertIsNone(devices.get_first(None))
    self.assertEqual(devices.get_first({"a": None}), {"a": None})

  def test_replicated_array(self):
    mesh = devices.local_mesh()
    value = jax.device_put(
        np.arange(8, dtype=np.float32).reshape(2, 4),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    np.testing.assert_array_equal(devices.get_first(value), [0, 1, 2, 3])

  def test_array_sharded_on_another_axis_still_gives_x0(self):
    # Only an axis-0 shard holds the whole of x[0]; for other layouts the
    # value must still be x[0], not a piece of it.
    n = jax.local_device_count()
    mesh = devices.local_mesh()
    host = np.arange(2 * n * 2, dtype=np.float32).reshape(2, n * 2)
    value = jax.device_put(host, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, devices.LOCAL_AXIS)))
    np.testing.assert_array_equal(devices.get_first(value), host[0])


class MaybeDeviceGetTest(absltest.TestCase):

  def test_jax_array_comes_to_the_host(self):
    result = devices.maybe_device_get(jnp.arange(3))
    self.assertIsInstance(result, np.ndarray)
    np.testing.assert_array_equal(result, [0, 1, 2])

  def test_other_values_are_returned_as_is(self):
    host = np.arange(3)
    self.assertIs(devices.maybe_device_get(host), host)
    self.assertEqual(devices.maybe_device_get(5), 5)
    tree = {"a": jnp.ones(())}
    self.assertIs(devices.maybe_device_get(tree), tree)


class FreezeThawTest(parameterized.TestCase):

  def test_frozen_copy_survives_numpy_mutation(self):
    live = {"w": np.arange(3, dtype=np.float32), "nested": [np.ones(2)]}
    frozen, _ = devices.freeze(live)
    live["w"][:] = -1
    live["nested"][0][:] = -1
    live["nested"].append("new")
    np.testing.assert_array_equal(frozen["w"], [0, 1, 2])
    np.testing.assert_array_equal(frozen["nested"][0], [1, 1])
    self.assertLen(frozen["nested"], 1)

  def test_frozen_copy_survives_donation_of_the_live_array(self):
    live = devices.bcast_local_devices(np.arange(3, dtype=np.float32))
    frozen, placements = devices.freeze({"params": live})
    # Whether the donated buffer is reused for the output (and the live array
    # deleted) depends on the JAX release; the frozen copy must not care.
    out = jax.jit(lambda x: x * 0 - 1, donate_argnums=0)(live)
    np.testing.assert_array_equal(out, -np.ones_like(out))
    self.assertIsInstance(frozen["params"], np.ndarray)
    thawed = devices.thaw(frozen, placements)
    np.testing.assert_array_equal(
        thawed["params"], np.tile(np.arange(3), (jax.local_device_count(), 1)))

  def test_frozen_copy_survives_deleting_the_live_array(self):
    live = jnp.arange(4.0)
    frozen, _ = devices.freeze([live])
    live.delete()
    np.testing.assert_array_equal(frozen[0], np.arange(4.0))

  def test_containers_are_rebuilt_and_scalars_kept(self):
    live = {"step": 3, "lr": 0.1, "name": "x", "none": None,
            "tuple": (1, np.int64(2))}
    frozen, placements = devices.freeze(live)
    self.assertEqual(frozen, live)
    self.assertIsNot(frozen, live)
    self.assertIs(type(frozen["step"]), int)
    self.assertIs(type(frozen["lr"]), float)
    self.assertIsNone(frozen["none"])
    self.assertEmpty(placements)

  def test_config_dicts_become_plain_dicts(self):
    live = config_dict.ConfigDict(
        {"global_step": 2, "inner": {"a": np.ones(2)}})
    frozen, _ = devices.freeze(live)
    self.assertIs(type(frozen), dict)
    self.assertIs(type(frozen["inner"]), dict)
    np.testing.assert_array_equal(frozen["inner"]["a"], [1, 1])

  def test_keys_of_mixed_types_and_dotted_keys(self):
    # Snapshots may use any hashable keys; JAX cannot sort mixed ones.
    live = {"a.b": jnp.ones(2), 3: np.zeros(1), ("t", 1): [jnp.arange(2)],
            "nested": {0: jnp.ones(()), "0": 5}}
    frozen, placements = devices.freeze(live)
    self.assertEqual(list(frozen), list(live))
    self.assertIsInstance(frozen["a.b"], np.ndarray)
    thawed = devices.thaw(frozen, placements)
    self.assertIsInstance(thawed["a.b"], jax.Array)
    self.assertIsInstance(thawed[("t", 1)][0], jax.Array)
    self.assertIsInstance(thawed["nested"][0], jax.Array)
    self.assertEqual(thawed["nested"]["0"], 5)
    self.assertIsInstance(thawed[3], np.ndarray)

  def test_plain_mappings_are_copied_too(self):
    live = types.MappingProxyType({"w": np.ones(2), 1: jnp.zeros(2)})
    frozen, placements = devices.freeze(live)
    self.assertIs(type(frozen), dict)
    live["w"][:] = 5
    np.testing.assert_array_equal(frozen["w"], [1, 1])
    self.assertIsInstance(devices.thaw(frozen, placements)[1], jax.Array)

  def test_named_tuples_are_rebuilt(self):
    Pair = collections.namedtuple("Pair", ["a", "b"])
    live = Pair(jnp.ones(2), np.zeros(1))
    frozen, placements = devices.freeze(live)
    self.assertIsInstance(frozen, Pair)
    self.assertIsInstance(frozen.a, np.ndarray)
    thawed = devices.thaw(frozen, placements)
    self.assertIsInstance(thawed, Pair)
    self.assertIsInstance(thawed.a, jax.Array)

  def test_thaw_restores_jax_arrays_on_their_sharding(self):
    per_device = devices.bcast_local_devices(np.arange(2, dtype=np.int32))
    single = jax.device_put(jnp.ones(3), jax.local_devices()[-1])
    tree = {"per_device": per_device, "single": single,
            "host": np.zeros(2), "step": 5}
    frozen, placements = devices.freeze(tree)
    thawed = devices.thaw(frozen, placements)
    self.assertIsInstance(thawed["per_device"], jax.Array)
    self.assertEqual(thawed["per_device"].sharding, per_device.sharding)
    self.assertEqual(thawed["single"].devices(), {jax.local_devices()[-1]})
    self.assertIsInstance(thawed["host"], np.ndarray)
    self.assertIs(type(thawed["step"]), int)
    for key in ("per_device", "single", "host"):
      np.testing.assert_array_equal(thawed[key], tree[key])

  def test_thawed_arrays_do_not_alias_the_frozen_copy(self):
    for _ in range(20):
      live = devices.bcast_local_devices(np.arange(1024, dtype=np.float32))
      frozen, placements = devices.freeze({"p": live})
      thawed = devices.thaw(frozen, placements)
      frozen["p"][:] = -1
      np.testing.assert_array_equal(
          np.asarray(thawed["p"])[-1], np.arange(1024))

  def test_thawed_numpy_does_not_alias_the_frozen_copy(self):
    frozen, placements = devices.freeze({"host": np.zeros(2)})
    thawed = devices.thaw(frozen, placements)
    thawed["host"][:] = 9
    np.testing.assert_array_equal(frozen["host"], [0, 0])
    again = devices.thaw(frozen, placements)
    np.testing.assert_array_equal(again["host"], [0, 0])

  @parameterized.named_parameters(
      ("single", lambda: jax.random.key(11)),
      ("per_device", lambda: devices.bcast_local_devices(jax.random.key(11))),
  )
  def test_typed_keys_round_trip(self, make):
    key = make()
    frozen, placements = devices.freeze({"rng": key})
    self.assertIsInstance(frozen["rng"], np.ndarray)
    self.assertEqual(frozen["rng"].dtype, np.uint32)
    thawed = devices.thaw(frozen, placements)["rng"]
    self.assertTrue(jax.dtypes.issubdtype(thawed.dtype, jax.dtypes.prng_key))
    self.assertEqual(jax.random.key_impl(thawed), jax.random.key_impl(key))
    self.assertEqual(thawed.shape, key.shape)
    self.assertTrue(thawed.sharding.is_equivalent_to(key.sharding, key.ndim))
    np.testing.assert_array_equal(jax.random.key_data(thawed),
                                  jax.random.key_data(key))
    # The restored key draws the same numbers as the original.
    first = lambda k: jax.random.uniform(k.reshape(-1)[0], ())
    self.assertEqual(float(first(thawed)), float(first(key)))

  def test_thawed_per_device_array_feeds_pmap(self):
    live = devices.bcast_local_devices(np.float32(4.0))
    frozen, placements = devices.freeze(live)
    thawed = devices.thaw(frozen, placements)
    out = jax.pmap(lambda x: x / 2)(thawed)
    np.testing.assert_array_equal(out,
                                  np.full((jax.local_device_count(),), 2.0))


if __name__ == "__main__":
  absltest.main()
