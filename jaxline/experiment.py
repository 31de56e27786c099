"""`AbstractExperiment`: the class a researcher subclasses.

A subclass defines `__init__`, `step` and `evaluate`; the harness owns the
loop, the keys, checkpoints and logging. Attribute maps are read through
`self` on every use, so they may be properties that depend on the mode.
"""

import abc
import threading
import time
import types
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np

from jaxline import rng as rng_lib
from jaxline import sharding
from jaxline import utils

# Set on each experiment by the harness from `config.experiment_style`;
# absent means the default pmap style.
STYLE_ATTR = "_jaxline_experiment_style"


def is_sharded(experiment: Any) -> bool:
  """Whether `experiment` runs in the sharded (global-array) style."""
  return getattr(experiment, STYLE_ATTR, "pmap") == "sharded"


def _check_step_output(scalars: Any) -> None:
  # `type(...) is dict` first: it is what steps return, and the Mapping
  # check costs a per-step microsecond.
  if type(scalars) is not dict and not isinstance(scalars, Mapping):  # pylint: disable=unidiomatic-typecheck
    raise TypeError(
        "Experiment.step must return a mapping of scalars to log ({} if there "
        f"is nothing to log), but it returned a {type(scalars).__name__}.")


def _is_number(value: Any) -> bool:
  """A Python number, or a numeric array or scalar (no transfer needed)."""
  if isinstance(value, (bool, int, float, np.number, np.bool_)):
    return True
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    return False
  try:  # jnp's test knows bfloat16; typed keys are not numbers.
    return bool(jnp.issubdtype(dtype, jnp.number) or
                jnp.issubdtype(dtype, jnp.bool_))
  except TypeError:
    return False


def check_step_values(scalars: Mapping[str, Any]) -> None:
  """Rejects values no logger can write, at the first step, naming the key.

  `None` passes: 0.0.8 experiments return statistics that are `None` on
  some steps, and the writers skip them with a warning.
  """
  for key, value in scalars.items():
    if value is not None and not _is_number(value):
      raise TypeError(
          f"Experiment.step returned {key!r}: {type(value).__name__} "
          f"({value!r:.80}), but every value must be a number or a numeric "
          "array. Return only numbers; log other things from step() with "
          "the writer or absl logging.")


class AbstractExperiment(abc.ABC):
  """The interface between a user's experiment and the harness."""

  # Attribute name -> checkpoint name, for per-device values (leading axis
  # of local_device_count): device 0's slice is saved, and restored to all.
  CHECKPOINT_ATTRS: Dict[str, str] = {}
  # Same, for values saved and restored whole: step counters, host state.
  NON_BROADCAST_CHECKPOINT_ATTRS: Dict[str, str] = {}

  @abc.abstractmethod
  def __init__(self, mode: str, init_rng: Optional[jax.Array] = None):
    """Subclasses must define it; calling this base body is optional."""

  def initialize_train_step_rng(self, rng: jax.Array) -> jax.Array:
    """The key state the step keys are split from.

    Per-device in the pmap style; one replicated key in the sharded style.
    """
    if is_sharded(self):
      return sharding.replicate(rng)
    return utils.bcast_local_devices(rng)

  @abc.abstractmethod
  def step(self, *, global_step: jax.Array, rng: jax.Array,
           writer: Optional[utils.Writer]) -> Dict[str, np.ndarray]:
    """Runs one training step and returns scalars to log."""

  @abc.abstractmethod
  def evaluate(self, *, global_step: jax.Array, rng: jax.Array,
               writer: Optional[utils.Writer]) -> Optional[Dict[str, Any]]:
    """Evaluates the current parameters and returns scalars to log."""

  def should_run_step(self, global_step: int, config) -> bool:
    """Whether training continues; `global_step` is the count of steps done."""
    return global_step < config.training_steps

  def train_loop(self, config, state, periodic_actions: Sequence[Any],
                 writer: Optional[utils.Writer] = None) -> None:
    """Runs steps until `should_run_step` is False, calling the actions.

    The per-device step and key come from `StepKeys`, which derives many
    steps' worth in one device call, so the loop adds no device call and no
    transfer to the host per step; actions fetch only when they fire.
    """
    with utils.log_activity("training loop"):
      keys = StepKeys(self, config)
      get, put = _state_accessors(state)
      first = True
      while self.should_run_step(get("global_step"), config):
        step = get("global_step")
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          global_step_devices, step_key, new_state_rng = keys.next(
              step, get("train_step_rng"))
          put("train_step_rng", new_state_rng)
          scalar_outputs = self.step(
              global_step=global_step_devices, rng=step_key, writer=writer)
          _check_step_output(scalar_outputs)
          if first:
            check_step_values(scalar_outputs)
            first = False
          t = time.time()
          step += 1
          put("global_step", step)
        for action in periodic_actions:
          action(t, step, scalar_outputs)

  def snapshot_state(self) -> Dict[str, Any]:
    """What a checkpoint holds: checkpoint name -> value."""
    snapshot = {}
    first = (lambda x: x) if is_sharded(self) else utils.get_first
    for attr, name in self.CHECKPOINT_ATTRS.items():
      snapshot[name] = first(getattr(self, attr))
    for attr, name in self.NON_BROADCAST_CHECKPOINT_ATTRS.items():
      snapshot[name] = getattr(self, attr)
    if not snapshot:
      logging.warning(
          "Nothing will be checkpointed: CHECKPOINT_ATTRS and "
          "NON_BROADCAST_CHECKPOINT_ATTRS of %s are both empty.",
          type(self).__name__)
    return snapshot

  def abstract_snapshot_state(self) -> Optional[Mapping[str, Any]]:
    """What `snapshot_state` would hold once lazily created state exists.

    Optional. Return checkpoint name -> pytree of `jax.ShapeDtypeStruct`s
    (device 0's slice in the pmap style; with shardings in the sharded
    style, which restores then use), for example
    `{"params": jax.eval_shape(self._init, rng)}`. A restore then checks
    those entries' structure, shapes and dtypes as it does live values, so
    a checkpoint of another model fails before any step.
    """
    return None

  def restore_from_snapshot(self, snapshot_state: Mapping[str, Any]) -> None:
    """Puts a snapshot's values back, per-device ones on every device."""
    maps = [(self.CHECKPOINT_ATTRS, True),
            (self.NON_BROADCAST_CHECKPOINT_ATTRS, False)]
    for attr_map, _ in maps:
      for name in attr_map.values():
        if name not in snapshot_state:
          raise KeyError(
              f"Checkpoint has no entry {name!r}; it holds "
              f"{sorted(map(str, snapshot_state))}. Does the experiment "
              "match the checkpoint?")
    # Free device memory before new buffers are placed.
    for attr_map, _ in maps:
      for attr in attr_map:
        if attr in self.__dict__:
          delattr(self, attr)
    if is_sharded(self):  # Arrays come back with their saved shardings.
      maps = [(attr_map, False) for attr_map, _ in maps]
    for attr_map, broadcast in maps:
      for attr, name in attr_map.items():
        value = snapshot_state[name]
        setattr(self, attr,
                utils.bcast_local_devices(value) if broadcast else value)

  def on_new_best_model(self, best_state: Any) -> None:
    """Called just before each save of a new best checkpoint."""


def _step_dtype():
  return np.int64 if jax.config.jax_enable_x64 else np.int32


def _state_accessors(state: Any):
  """Fast field access for the loop's two per-step reads and writes.

  `ConfigDict.__setattr__` calls `dir()` on every write (about 10 us);
  item access does the same type-checked write without it. Duck-typed
  states without items use attributes.
  """
  if isinstance(state, config_dict.ConfigDict):
    return state.__getitem__, state.__setitem__
  return (lambda name: getattr(state, name),
          lambda name, value: setattr(state, name, value))


class StepKeys:
  """The per-device `global_step` and key of each step, derived ahead.

  One device call yields the next `CHUNK` steps' `(step, key, state_rng)`,
  the same arrays, bit for bit, as one call per step would give, so a loop
  pays a device call every `CHUNK` steps instead of every step. A step or
  key state that is not the one the previous `next` returned (set by an
  action, a restore, or a loop of the user's own) starts a new chunk from
  it, so resuming at any step gives the same keys.
  """

  CHUNK = 16

  def __init__(self, experiment: Any, config):
    self._dtype = _step_dtype()
    if is_sharded(experiment):
      self._advance = rng_lib.make_sharded_step_keys_fn(self.CHUNK)
    else:
      fn = rng_lib.make_step_keys_fn(config.random_mode_train, self.CHUNK)
      host_ids = None
      if utils.DistributedRNGMode(config.random_mode_train).unique_host:
        host_ids = utils.bcast_local_devices(np.int32(jax.process_index()))
      self._advance = lambda step, rng: fn(step, rng, host_ids)
    self._pending = []
    self._step = None  # The step `next` expects, and its key state.
    self._rng = None

  @classmethod
  def compile_ahead(cls, experiment_class: Any, config) -> Callable[[], None]:
    """Compiles the key derivation in a thread; returns a wait for it.

    `train` calls it first, so the compile runs while the seed's keys are
    made and the experiment's constructor runs, not before the first step.
    Only for the base class's key state and loop with raw keys, whose shapes
    are known before the experiment exists; otherwise it does nothing.
    """
    base = AbstractExperiment
    key = jax.eval_shape(jax.random.PRNGKey, 0)  # Traces; compiles nothing.
    if (not isinstance(experiment_class, type) or
        experiment_class.initialize_train_step_rng is not
        base.initialize_train_step_rng or
        experiment_class.train_loop is not base.train_loop or
        not np.issubdtype(key.dtype, np.unsignedinteger)):
      return lambda: None
    style = config.get("experiment_style", "pmap")
    dtype = _step_dtype()

    def compile_once():
      try:
        exp = types.SimpleNamespace(**{STYLE_ATTR: style})
        keys = cls(exp, config)
        rng = base.initialize_train_step_rng(
            exp, np.zeros(key.shape, key.dtype))
        jax.block_until_ready(keys._advance(np.asarray(0, dtype), rng))  # pylint: disable=protected-access
      except Exception:  # pylint: disable=broad-except
        # The loop compiles it then, and reports any error itself.
        logging.debug("Compiling the step keys ahead failed.", exc_info=True)

    thread = threading.Thread(target=compile_once, daemon=True,
                              name="jaxline-compile-step-keys")
    thread.start()
    return thread.join

  def next(self, step: int, state_rng: Any) -> Tuple[Any, Any, Any]:
    """`(global_step, key, new_state_rng)` for the step after `step` steps."""
    if (not self._pending or step != self._step or
        state_rng is not self._rng):
      self._pending = list(self._advance(
          np.asarray(step - 1, dtype=self._dtype), state_rng))
      self._pending.reverse()
    out = self._pending.pop()
    self._step, self._rng = step + 1, out[2]
    return out
