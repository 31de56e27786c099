"""Tests for jaxline.rng.

Published experiments depend on the exact keys jaxline 0.0.8 derived from a
seed, so the contract's reference vectors are checked bit for bit, and every
mode is checked against a derivation written out with plain jax.random calls.
"""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxline import base_config
from jaxline import devices
from jaxline import rng
from jaxline import utils

_MODES = ("unique_host_unique_device", "unique_host_same_device",
          "same_host_unique_device", "same_host_same_device")

# Contract section 4: JAX 0.10.2 defaults, seed 42, process 0.
_SEED_KEY = [0, 42]
_TRAIN_KEY = [1832780943, 270669613]
_INIT_KEY = [64467757, 2916123636]
_STEP_KEYS = {  # step -> (device 0, device 1), unique_host_unique_device.
    0: ([2852371275, 1535037118], [2232176465, 33846082]),
    1: ([1415740534, 3212940511], [3288317168, 3869482587]),
    2: ([964605173, 3278640507], [3557650011, 3028360806]),
}
_EVAL_UNIQUE = ([1012194634, 3152801799], [1705926158, 899080142])


def _config(**overrides):
  config = base_config.get_base_config()
  config.update(overrides)
  return config


def _expected_step_key(state_key, mode, host, device):
  """The section 4 rule, written out with plain jax.random calls."""
  key = jax.random.split(state_key)[0]
  if rng.DistributedRNGMode(mode).unique_host:
    key = jax.random.fold_in(key, host)
  if rng.DistributedRNGMode(mode).unique_device:
    key = jax.random.fold_in(key, device)
  return key


def _run_steps(mode, num_steps, host_id=0, seed=42):
  """Runs the harness's key derivation; returns per-step host keys."""
  train_key, _ = rng.train_and_init_keys(_config(random_seed=seed))
  state = devices.bcast_local_devices(train_key)
  step = devices.bcast_local_devices(np.int32(-1))
  host_ids = devices.bcast_local_devices(np.int32(host_id))
  advance = rng.make_step_key_fn(mode)
  keys, steps = [], []
  for _ in range(num_steps):
    step, key, state = advance(step, state, host_ids)
    keys.append(np.asarray(key))
    steps.append(np.asarray(step))
  return keys, steps, state


class ReferenceVectorTest(absltest.TestCase):

  def test_seed_key(self):
    np.testing.assert_array_equal(jax.random.PRNGKey(42), _SEED_KEY)

  def test_train_and_init_keys(self):
    train_key, init_key = rng.train_and_init_keys(_config())
    np.testing.assert_array_equal(train_key, _TRAIN_KEY)
    np.testing.assert_array_equal(init_key, _INIT_KEY)
    self.assertEqual(train_key.dtype, jnp.uint32)

  def test_step_keys_on_devices_0_and_1(self):
    keys, _, _ = _run_steps("unique_host_unique_device", 3)
    for step, (device0, device1) in _STEP_KEYS.items():
      np.testing.assert_array_equal(keys[step][0], device0, err_msg=str(step))
      if jax.local_device_count() > 1:
        np.testing.assert_array_equal(keys[step][1], device1,
                                      err_msg=str(step))

  def test_eval_keys_default_mode_are_the_seed_key(self):
    keys = np.asarray(rng.eval_keys(_config()))
    self.assertEqual(keys.shape, (jax.local_device_count(), 2))
    for row in keys:
      np.testing.assert_array_equal(row, _SEED_KEY)

  def test_eval_keys_unique_host_unique_device(self):
    keys = np.asarray(
        rng.eval_keys(_config(random_mode_eval="unique_host_unique_device")))
    np.testing.assert_array_equal(keys[0], _EVAL_UNIQUE[0])
    if jax.local_device_count() > 1:
      np.testing.assert_array_equal(keys[1], _EVAL_UNIQUE[1])

  def test_eval_keys_ignore_the_legacy_flag(self):
    # The constructor in eval gets the unsplit key either way.
    for mode in ("same_host_same_device", "unique_host_unique_device"):
      legacy = rng.eval_keys(
          _config(random_mode_eval=mode, legacy_random_seed_behavior=True))
      default = rng.eval_keys(_config(random_mode_eval=mode))
      np.testing.assert_array_equal(legacy, default)


class TrainAndInitKeysTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 42, 2**31 - 1)
  def test_split_of_the_seed_key(self, seed):
    train_key, init_key = rng.train_and_init_keys(_config(random_seed=seed))
    expected = jax.random.split(jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(train_key, expected[0])
    np.testing.assert_array_equal(init_key, expected[1])
    self.assertFalse(np.array_equal(train_key, init_key))

  def test_legacy_random_seed_behavior_uses_the_seed_key_for_both(self):
    train_key, init_key = rng.train_and_init_keys(
        _config(legacy_random_seed_behavior=True))
    np.testing.assert_array_equal(train_key, _SEED_KEY)
    np.testing.assert_array_equal(init_key, _SEED_KEY)

  def test_legacy_step_keys_follow_from_the_seed_key(self):
    config = _config(legacy_random_seed_behavior=True)
    train_key, _ = rng.train_and_init_keys(config)
    state = devices.bcast_local_devices(train_key)
    step = devices.bcast_local_devices(np.int32(-1))
    host_ids = devices.bcast_local_devices(np.int32(0))
    _, key, _ = rng.make_step_key_fn(config.random_mode_train)(
        step, state, host_ids)
    expected = _expected_step_key(jax.random.PRNGKey(42),
                                  config.random_mode_train, 0, 0)
    np.testing.assert_array_equal(np.asarray(key)[0], expected)

  def test_typed_keys_under_custom_prng(self):
    # With jax_enable_custom_prng, PRNGKey gives typed keys; the derivation
    # is the same, only the trailing 2 of the shape goes.
    with jax.enable_custom_prng(True):
      train_key, init_key = rng.train_and_init_keys(_config())
      self.assertTrue(jax.dtypes.issubdtype(train_key.dtype,
                                            jax.dtypes.prng_key))
      self.assertEqual(train_key.shape, ())
      np.testing.assert_array_equal(jax.random.key_data(train_key), _TRAIN_KEY)
      np.testing.assert_array_equal(jax.random.key_data(init_key), _INIT_KEY)
      state = devices.bcast_local_devices(train_key)
      step = devices.bcast_local_devices(np.int32(-1))
      host_ids = devices.bcast_local_devices(np.int32(0))
      _, key, new_state = rng.make_step_key_fn("unique_host_unique_device")(
          step, state, host_ids)
      self.assertEqual(key.shape, (jax.local_device_count(),))
      self.assertEqual(new_state.shape, (jax.local_device_count(),))
      np.testing.assert_array_equal(jax.random.key_data(key)[0],
                                    _STEP_KEYS[0][0])
      eval_keys = rng.eval_keys(_config())
      self.assertEqual(eval_keys.shape, (jax.local_device_count(),))
      np.testing.assert_array_equal(jax.random.key_data(eval_keys)[0],
                                    _SEED_KEY)


class StepKeyFnTest(parameterized.TestCase):

  @parameterized.parameters(*_MODES)
  def test_matches_the_written_out_rule_on_every_device(self, mode):
    n = jax.local_device_count()
    host = 3
    keys, steps, state = _run_steps(mode, 3, host_id=host)
    train_key, _ = rng.train_and_init_keys(_config())
    state_key = train_key
    for i in range(3):
      np.testing.assert_array_equal(steps[i], np.full((n,), i))
      for device in range(n):
        np.testing.assert_array_equal(
            keys[i][device],
            _expected_step_key(state_key, mode, host, device),
            err_msg=f"step {i} device {device}")
      state_key = jax.random.split(state_key)[1]
    # The returned state is the key for the next step, on every device.
    for row in np.asarray(state):
      np.testing.assert_array_equal(row, state_key)

  def test_unique_device_modes_differ_across_devices(self):
    if jax.local_device_count() < 2:
      self.skipTest("needs at least two local devices")
    for mode in _MODES:
      keys, _, _ = _run_steps(mode, 1)
      distinct = len({tuple(row) for row in keys[0]})
      if rng.DistributedRNGMode(mode).unique_device:
        self.assertEqual(distinct, jax.local_device_count(), msg=mode)
      else:
        self.assertEqual(distinct, 1, msg=mode)

  def test_unique_host_modes_depend_on_the_host(self):
    for mode in _MODES:
      on_host0, _, _ = _run_steps(mode, 1, host_id=0)
      on_host1, _, _ = _run_steps(mode, 1, host_id=1)
      same = np.array_equal(on_host0[0], on_host1[0])
      self.assertEqual(same, not rng.DistributedRNGMode(mode).unique_host,
                       msg=mode)

  def test_outputs_are_per_device_and_feed_back(self):
    train_key, _ = rng.train_and_init_keys(_config())
    state = devices.bcast_local_devices(train_key)
    step = devices.bcast_local_devices(np.int32(4))
    host_ids = devices.bcast_local_devices(np.int32(0))
    new_step, key, new_state = rng.make_step_key_fn(
        "unique_host_unique_device")(step, state, host_ids)
    for out in (new_step, key, new_state):
      self.assertTrue(out.sharding.is_equivalent_to(
          devices.per_device_sharding(), out.ndim))
    np.testing.assert_array_equal(new_step, 5)
    # A user's pmapped step takes the key as it comes.
    bits = jax.pmap(lambda k: jax.random.bits(k, (), jnp.uint32))(key)
    self.assertEqual(bits.shape, (jax.local_device_count(),))

  def test_same_keys_with_pmap_and_jit_faked(self):
    # --jaxline_disable_pmap_jit must not change any key.
    expected, _, _ = _run_steps("unique_host_unique_device", 2)
    with chex.fake_pmap_and_jit():
      faked, _, _ = _run_steps("unique_host_unique_device", 2)
    for want, got in zip(expected, faked):
      np.testing.assert_array_equal(want, got)

  def test_invalid_mode_raises(self):
    train_key, _ = rng.train_and_init_keys(_config())
    with self.assertRaises(ValueError):
      rng.make_step_key_fn("unique_everything")(
          devices.bcast_local_devices(np.int32(0)),
          devices.bcast_local_devices(train_key),
          devices.bcast_local_devices(np.int32(0)))


class EvalKeysTest(parameterized.TestCase):

  @parameterized.parameters(*_MODES)
  def test_matches_the_written_out_rule(self, mode):
    host = 2
    with mock.patch.object(utils.jax, "process_index", return_value=host):
      keys = np.asarray(rng.eval_keys(_config(random_mode_eval=mode)))
    seed_key = jax.random.PRNGKey(42)
    self.assertEqual(keys.shape, (jax.local_device_count(), 2))
    for device, row in enumerate(keys):
      key = seed_key
      if rng.DistributedRNGMode(mode).unique_host:
        key = jax.random.fold_in(key, host)
      if rng.DistributedRNGMode(mode).unique_device:
        key = jax.random.fold_in(key, device)
      np.testing.assert_array_equal(row, key, err_msg=f"device {device}")

  def test_are_per_device(self):
    keys = rng.eval_keys(_config(random_mode_eval="unique_host_unique_device"))
    self.assertTrue(keys.sharding.is_equivalent_to(
        devices.per_device_sharding(), keys.ndim))

  def test_invalid_mode_raises(self):
    with self.assertRaises(ValueError):
      rng.eval_keys(_config(random_mode_eval="bad_mode"))


class DistributedRNGModeTest(parameterized.TestCase):

  @parameterized.parameters(
      ("UNIQUE_HOST_UNIQUE_DEVICE", "unique_host_unique_device", True, True),
      ("UNIQUE_HOST_SAME_DEVICE", "unique_host_same_device", True, False),
      ("SAME_HOST_UNIQUE_DEVICE", "same_host_unique_device", False, True),
      ("SAME_HOST_SAME_DEVICE", "same_host_same_device", False, False),
  )
  def test_members_and_properties(self, name, value, unique_host,
                                  unique_device):
    member = rng.DistributedRNGMode[name]
    self.assertEqual(member.value, value)
    self.assertIs(rng.DistributedRNGMode(value), member)
    self.assertIs(member.unique_host, unique_host)
    self.assertIs(member.unique_device, unique_device)

  def test_exactly_four_members(self):
    self.assertLen(rng.DistributedRNGMode, 4)

  def test_unknown_value_raises(self):
    with self.assertRaises(ValueError):
      rng.DistributedRNGMode("unique_host")

  def test_utils_reexports_the_same_objects(self):
    self.assertIs(utils.DistributedRNGMode, rng.DistributedRNGMode)
    self.assertIs(utils.host_id_devices_for_rng, rng.host_id_devices_for_rng)
    self.assertIs(utils.specialize_rng_host_device,
                  rng.specialize_rng_host_device)


class HostIdDevicesForRngTest(parameterized.TestCase):

  @parameterized.parameters("unique_host_unique_device",
                            "unique_host_same_device")
  def test_unique_host_modes_give_the_process_index_per_device(self, mode):
    with mock.patch.object(utils.jax, "process_index",
                           return_value=5) as process_index:
      host_ids = utils.host_id_devices_for_rng(mode)
    process_index.assert_called()
    self.assertEqual(host_ids.dtype, np.int32)
    np.testing.assert_array_equal(host_ids,
                                  np.full((jax.local_device_count(),), 5))

  def test_default_mode_is_unique_host_unique_device(self):
    with mock.patch.object(utils.jax, "process_index", return_value=2):
      np.testing.assert_array_equal(
          utils.host_id_devices_for_rng(),
          np.full((jax.local_device_count(),), 2))

  def test_process_index_is_read_at_each_call(self):
    with mock.patch.object(utils.jax, "process_index", return_value=1):
      first = utils.host_id_devices_for_rng()
    with mock.patch.object(utils.jax, "process_index", return_value=7):
      second = utils.host_id_devices_for_rng()
    self.assertEqual(set(first.tolist()), {1})
    self.assertEqual(set(second.tolist()), {7})

  @parameterized.parameters("same_host_unique_device", "same_host_same_device")
  def test_same_host_modes_give_none(self, mode):
    self.assertIsNone(utils.host_id_devices_for_rng(mode))

  def test_invalid_mode_raises(self):
    with self.assertRaises(ValueError):
      utils.host_id_devices_for_rng("per_host")


class SpecializeRngHostDeviceTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.key = jax.random.PRNGKey(9)

  def test_unique_host_without_host_id_raises(self):
    for mode in ("unique_host_unique_device", "unique_host_same_device"):
      with self.assertRaisesRegex(ValueError, "host_id"):
        rng.specialize_rng_host_device(self.key, None, "i", mode)

  def test_invalid_mode_raises(self):
    with self.assertRaises(ValueError):
      rng.specialize_rng_host_device(self.key, 0, "i", "sometimes")

  def test_same_host_same_device_returns_the_key(self):
    out = rng.specialize_rng_host_device(self.key, None, None,
                                         "same_host_same_device")
    np.testing.assert_array_equal(out, self.key)

  def test_unique_host_same_device_folds_in_the_host(self):
    out = rng.specialize_rng_host_device(self.key, 4, None,
                                         "unique_host_same_device")
    np.testing.assert_array_equal(out, jax.random.fold_in(self.key, 4))

  @parameterized.parameters("same_host_unique_device",
                            "unique_host_unique_device")
  def test_unique_device_folds_in_the_pmap_axis_index(self, mode):
    n = jax.local_device_count()
    host = 6
    fn = jax.pmap(
        lambda k, h: rng.specialize_rng_host_device(k, h, "dev", mode),
        axis_name="dev")
    out = np.asarray(fn(devices.bcast_local_devices(self.key),
                        devices.bcast_local_devices(np.int32(host))))
    for device in range(n):
      key = self.key
      if rng.DistributedRNGMode(mode).unique_host:
        key = jax.random.fold_in(key, host)
      np.testing.assert_array_equal(out[device],
                                    jax.random.fold_in(key, device))

  def test_named_vmap_binds_the_axis_too(self):
    keys = jnp.stack([self.key] * 3)
    out = jax.vmap(
        lambda k: rng.specialize_rng_host_device(
            k, None, "v", "same_host_unique_device"),
        axis_name="v")(keys)
    for index in range(3):
      np.testing.assert_array_equal(out[index],
                                    jax.random.fold_in(self.key, index))

  def test_host_id_may_be_traced(self):
    # The host id is an argument so one compiled program serves every host.
    fn = jax.jit(lambda k, h: rng.specialize_rng_host_device(
        k, h, None, "unique_host_same_device"))
    for host in (0, 3):
      np.testing.assert_array_equal(fn(self.key, jnp.int32(host)),
                                    jax.random.fold_in(self.key, host))


if __name__ == "__main__":
  absltest.main()
