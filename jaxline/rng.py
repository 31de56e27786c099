"""PRNG keys for every step, host and device, derived as jaxline 0.0.8 did.

Keeping the derivation bit-for-bit identical means a seed gives the same
per-step keys as the original, so published experiments reproduce.
"""

import enum
import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxline import devices


class DistributedRNGMode(enum.Enum):
  """Whether hosts and devices get distinct keys."""
  UNIQUE_HOST_UNIQUE_DEVICE = "unique_host_unique_device"
  UNIQUE_HOST_SAME_DEVICE = "unique_host_same_device"
  SAME_HOST_UNIQUE_DEVICE = "same_host_unique_device"
  SAME_HOST_SAME_DEVICE = "same_host_same_device"

  @property
  def unique_host(self) -> bool:
    return self in (DistributedRNGMode.UNIQUE_HOST_UNIQUE_DEVICE,
                    DistributedRNGMode.UNIQUE_HOST_SAME_DEVICE)

  @property
  def unique_device(self) -> bool:
    return self in (DistributedRNGMode.UNIQUE_HOST_UNIQUE_DEVICE,
                    DistributedRNGMode.SAME_HOST_UNIQUE_DEVICE)


def host_id_devices_for_rng(
    mode: str = "unique_host_unique_device") -> Optional[np.ndarray]:
  """This host's index once per local device, for unique-host modes only."""
  if not DistributedRNGMode(mode).unique_host:
    return None
  return np.full([jax.local_device_count()], jax.process_index(), np.int32)


def specialize_rng_host_device(
    rng: jax.Array,
    host_id: Optional[Any],
    axis_name: Optional[str],
    mode: str = "unique_host_unique_device") -> jax.Array:
  """Folds the host id and then the device index into `rng`, per `mode`.

  The host id is an argument rather than a call to `jax.process_index()` so
  that the compiled program is the same on every host.
  """
  mode = DistributedRNGMode(mode)
  if mode.unique_host:
    if host_id is None:
      raise ValueError(f"host_id must be given in RNG mode {mode.value!r}.")
    rng = jax.random.fold_in(rng, host_id)
  if mode.unique_device:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  return rng


def train_and_init_keys(config) -> Tuple[jax.Array, jax.Array]:
  """The key behind every step's key, and the key given to the constructor."""
  key = jax.random.PRNGKey(config.random_seed)
  if config.legacy_random_seed_behavior:
    return key, key
  train_key, init_key = jax.random.split(key)
  return train_key, init_key


def _on_local_devices(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Maps `fn` over the leading (local device) axis, as one jitted call.

  Built at call time through `jax.jit`, so `chex.fake_pmap_and_jit` replaces it
  too. A named vmap binds the axis that `specialize_rng_host_device` reads.
  """
  mapped = jax.vmap(fn, axis_name=devices.LOCAL_AXIS)
  sharding = devices.per_device_sharding()
  return jax.jit(mapped, out_shardings=sharding)


def make_step_key_fn(mode: str) -> Callable[..., Any]:
  """Returns `advance(step, state_rng, host_ids) -> (step+1, key, state_rng)`.

  One device computation per training step both counts the step and splits
  the keys, so the loop adds a single small dispatch and no host sync. The
  compiled function is reused across runs in a process; the cache key holds
  the current `jax.jit`, so `chex.fake_pmap_and_jit` gets its own.
  """
  return _cached_step_key_fn(mode, tuple(jax.local_devices()), jax.jit)


@functools.lru_cache(maxsize=32)
def _cached_step_key_fn(mode: str, local_devices: tuple[Any, ...],
                        jit: Callable[..., Any]) -> Callable[..., Any]:
  del local_devices, jit  # Cache keys only.

  def advance(step, state_rng, host_id):
    key, new_state_rng = jax.random.split(state_rng)
    key = specialize_rng_host_device(key, host_id, devices.LOCAL_AXIS, mode)
    return step + 1, key, new_state_rng

  return _on_local_devices(advance)


def make_sharded_step_key_fn() -> Callable[..., Any]:
  """`advance(step, state_rng) -> (step+1, key, state_rng)`, all replicated.

  The sharded style's rule: the step key is `split(state)[0]`, the same on
  every device and host (no host or device folding); the next state is
  `split(state)[1]`. Built through `jax.jit` at call time, without pmap.
  """
  from jaxline import sharding  # pylint: disable=g-import-not-at-top

  def advance(step, state_rng):
    key, new_state_rng = jax.random.split(state_rng)
    return step + 1, key, new_state_rng

  return jax.jit(advance, out_shardings=sharding.replicated())


def eval_keys(config) -> jax.Array:
  """Per-device eval keys: the unsplit seed, specialised per host and device."""
  key = devices.bcast_local_devices(jax.random.PRNGKey(config.random_seed))
  host_ids = host_id_devices_for_rng(config.random_mode_eval)
  if host_ids is None:
    host_ids = np.zeros([jax.local_device_count()], np.int32)
  fn = _on_local_devices(
      lambda k, h: specialize_rng_host_device(
          k, h, devices.LOCAL_AXIS, config.random_mode_eval))
  return fn(key, jnp.asarray(host_ids))
