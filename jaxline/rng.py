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
  if config.legacy_random_seed_behavior:
    key = jax.random.PRNGKey(config.random_seed)
    return key, key
  # The settings that change what PRNGKey returns, as static arguments:
  # JAX's own jit cache does not key on all of them.
  return _seed_and_split(config.random_seed, jax.config.jax_enable_custom_prng,
                         jax.config.jax_default_prng_impl)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _seed_and_split(seed: int, custom_prng: bool,
                    prng_impl: str) -> Tuple[jax.Array, jax.Array]:
  # One program, not three (seed, split, unstack): each compile is start-up
  # time before the first step.
  del custom_prng, prng_impl  # Cache keys only.
  train_key, init_key = jax.random.split(jax.random.PRNGKey(seed))
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


def make_step_keys_fn(mode: str, chunk: int) -> Callable[..., Any]:
  """`chunk` steps of `make_step_key_fn` in one device call.

  Returns `advance(last_step, state_rng, host_ids)`, where `last_step` is a
  host scalar (the step count before the first of them, minus one), giving a
  tuple of `chunk` `(step, key, state_rng)` triples, the same arrays, bit for
  bit, as `chunk` chained calls of `make_step_key_fn(mode)` would. Deriving
  keys ahead is what lets the loop skip a device call per step.
  """
  return _cached_step_keys_fn(mode, chunk, tuple(jax.local_devices()),
                              jax.jit)


@functools.lru_cache(maxsize=32)
def _cached_step_keys_fn(mode: str, chunk: int,
                         local_devices: tuple[Any, ...],
                         jit: Callable[..., Any]) -> Callable[..., Any]:
  del local_devices, jit  # Cache keys only.

  def one(step, state_rng, host_id):
    key, new_state_rng = jax.random.split(state_rng)
    key = specialize_rng_host_device(key, host_id, devices.LOCAL_AXIS, mode)
    return step + 1, key, new_state_rng

  def advance(step, state_rng, host_id):
    return _chained_outputs(
        lambda s, r: one(s, r, host_id), step, state_rng, chunk)

  # The host step is one scalar for every device (in_axes None).
  mapped = jax.vmap(advance, in_axes=(None, 0, 0),
                    axis_name=devices.LOCAL_AXIS)
  return jax.jit(mapped, out_shardings=devices.per_device_sharding())


def make_sharded_step_keys_fn(chunk: int) -> Callable[..., Any]:
  """`chunk` steps of `make_sharded_step_key_fn` in one call, same values.

  `advance(last_step, state_rng)` takes the host step count minus one and
  returns a tuple of `chunk` replicated `(step, key, state_rng)` triples.
  """
  return _cached_sharded_step_keys_fn(chunk, tuple(jax.devices()), jax.jit)


@functools.lru_cache(maxsize=32)
def _cached_sharded_step_keys_fn(chunk: int, all_devices: tuple[Any, ...],
                                 jit: Callable[..., Any]) -> Callable[..., Any]:
  del all_devices, jit  # Cache keys only.
  from jaxline import sharding  # pylint: disable=g-import-not-at-top

  def one(step, state_rng):
    key, new_state_rng = jax.random.split(state_rng)
    return step + 1, key, new_state_rng

  def advance(step, state_rng):
    return _chained_outputs(one, step, state_rng, chunk)

  return jax.jit(advance, out_shardings=sharding.replicated())


def _chained_outputs(one: Callable[..., Any], step: Any, state_rng: Any,
                      chunk: int) -> tuple[Any, ...]:
  """`chunk` chained `one(step, state_rng)` results, each a separate output.

  A scan, not an unrolled loop, keeps the compiled program to one copy of
  the key derivation (XLA:CPU takes seconds to compile 16); slicing its
  stacked results inside the same program gives each step its own arrays.
  """

  def body(carry, _):
    out = one(*carry)
    return (out[0], out[2]), out

  _, stacked = jax.lax.scan(body, (step, state_rng), None, length=chunk)
  return tuple(jax.tree.map(lambda x, i=i: x[i], stacked)
               for i in range(chunk))


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
