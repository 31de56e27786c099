"""Helpers the harness and experiments share; the names jaxline 0.0.8 had.

Larger pieces live in modules of their own (`devices`, `rng`, `concurrency`,
`periodic`); this module re-exports them as the same objects, so
`utils.PeriodicAction` and friends keep working.
"""

import collections
import contextlib
import functools
import importlib
import os
import pdb
import sys
import threading
from typing import Any, Callable, Mapping, Optional, Protocol, TypeVar

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from jaxline import concurrency
from jaxline import devices
from jaxline import periodic
from jaxline import preemption
from jaxline import rng as rng_lib

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_POST_MORTEM = flags.DEFINE_bool(
    "jaxline_post_mortem", False,
    "Whether to enter a pdb post-mortem session when the run fails.")
_DISABLE_PMAP_JIT = flags.DEFINE_bool(
    "jaxline_disable_pmap_jit", False,
    "Run jax.pmap and jax.jit eagerly (chex.fake_pmap_and_jit), for "
    "debugging with prints and breakpoints.")

# Re-exports: same objects, older home.
make_async = concurrency.make_async
py_prefetch = concurrency.py_prefetch
bcast_local_devices = devices.bcast_local_devices
get_first = devices.get_first
maybe_device_get = devices.maybe_device_get
DistributedRNGMode = rng_lib.DistributedRNGMode
host_id_devices_for_rng = rng_lib.host_id_devices_for_rng
specialize_rng_host_device = rng_lib.specialize_rng_host_device
PeriodicAction = periodic.PeriodicAction
StopTraining = periodic.StopTraining
tree_psum = jax.lax.psum

SnapshotNT = collections.namedtuple("SnapshotNT", ["id", "pickle_nest"])
CheckpointNT = collections.namedtuple("CheckpointNT", ["active", "history"])

# Series name -> CheckpointNT. Rebindable: always read as
# `utils.GLOBAL_CHECKPOINT_DICT`.
GLOBAL_CHECKPOINT_DICT = {}


def __getattr__(name: str) -> Any:
  """`utils.chex`, as in 0.0.8, imported on first use.

  chex (and the absl testing modules it imports) adds start-up time that
  only --jaxline_disable_pmap_jit needs (issue 12).
  """
  if name == "chex":
    return importlib.import_module("chex")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Writer(Protocol):
  """Anything that logs scalars; `TensorBoardLogger` is one."""

  def write_scalars(self, global_step: int, scalars: Mapping[str, Any]):
    """Writes the scalars for one step."""


class Checkpointer(Protocol):
  """The six methods the harness calls on a checkpointer.

  Subclass it explicitly and define `__init__`; the bodies here do nothing.
  """

  def save(self, ckpt_series: str) -> None:
    """Saves the calling thread's live state of `ckpt_series`."""

  def restore(self, ckpt_series: str) -> None:
    """Restores the newest checkpoint of `ckpt_series` into the live state."""

  def get_experiment_state(self, ckpt_series: str):
    """Returns the live, mutable state object of `ckpt_series`."""

  def restore_path(self, ckpt_series: str) -> Optional[str]:
    """Returns an id of the newest checkpoint, or None."""

  def can_be_restored(self, ckpt_series: str) -> bool:
    """Whether `ckpt_series` holds a checkpoint."""

  def wait_for_checkpointing_to_finish(self) -> None:
    """Blocks until asynchronous saves are on disk."""


def kwargs_only(f: F) -> F:
  """Makes `f` refuse positional arguments."""

  @functools.wraps(f)
  def wrapped(*args, **kwargs):
    if args:
      raise TypeError(f"{f.__name__} takes keyword arguments only; got "
                      f"{len(args)} positional.")
    return f(**kwargs)

  return wrapped


@contextlib.contextmanager
def log_activity(activity_name: str):
  """Logs the start, end or failure of a phase of the run."""
  logging.info("[jaxline] %s starting...", activity_name)
  try:
    yield
  except preemption.Preempted as e:
    logging.info("[jaxline] %s stopped: %s", activity_name, e)
    raise
  except BaseException:
    logging.exception("[jaxline] %s failed with error.", activity_name)
    raise
  logging.info("[jaxline] %s finished.", activity_name)


def double_buffer(ds):
  """Transfers item i+1 to the devices while the caller works on item i.

  `ds` yields pytrees of per-device arrays (leading axis
  `jax.local_device_count()`, as `jax.pmap` takes them); each comes out as
  `jax.Array`s laid out over the local devices. Item i+1 is pulled from `ds`
  before item i is yielded, and its numpy leaves are copied (datasets often
  refill one buffer, and a CPU transfer may alias it) and transferred in a
  background thread while the caller's step on item i runs. `ds` is
  iterated in the caller's thread, so slow host work belongs upstream in
  `utils.py_prefetch`:

      ds = utils.double_buffer(utils.py_prefetch(make_host_batches))

  An error raised by `ds`, or a None item, comes after the items before it.
  For the sharded (`jax.jit`) style, where the step takes global arrays,
  `jaxline.sharding.double_buffer_global` does the same with
  `host_batch_to_global`'s placement.
  """
  sharding = devices.per_device_sharding()
  yield from concurrency.place_ahead(
      ds, lambda item: jax.device_put(item, sharding),
      thread_name="double_buffer", what="double_buffer")


def double_buffer_on_gpu(ds):
  """`double_buffer(ds)` on GPU, where it pays off; `ds` elsewhere."""
  if jax.default_backend() == "gpu":
    yield from double_buffer(ds)
  else:
    yield from ds


def rendezvous() -> None:
  """Blocks until every process reaches this point."""
  with log_activity("rendezvous"):
    # A jitted sum over a global array: a psum across every device of every
    # process, with no pmap, so the sharded style stays pmap-free.
    expected = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    spec = jax.sharding.PartitionSpec
    ones = [jax.device_put(np.ones([1], np.int32), d)
            for d in jax.local_devices()]
    x = jax.make_array_from_single_device_arrays(
        (expected,), jax.sharding.NamedSharding(mesh, spec("d")), ones)
    total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(
        mesh, spec()))(x)
    x = int(np.asarray(total.addressable_data(0)))
    if x != expected:
      raise ValueError(f"Expected {expected} got {x}")


def debugger_fallback(f: F) -> F:
  """Opens pdb on the failing frame when --jaxline_post_mortem is set."""

  @functools.wraps(f)
  def wrapped(*args, **kwargs):
    try:
      return f(*args, **kwargs)
    except Exception:
      if flags.FLAGS["jaxline_post_mortem"].value:
        pdb.post_mortem(sys.exc_info()[2])
      raise

  return wrapped


_warned_none_eval = threading.Event()


def evaluate_should_return_dict(f: F) -> F:
  """Turns a `None` from `evaluate` into `{}`, warning once per process."""

  @functools.wraps(f)
  def wrapped(*args, **kwargs):
    result = f(*args, **kwargs)
    if result is None:
      if not _warned_none_eval.is_set():
        _warned_none_eval.set()
        logging.warning("evaluate() returned None; treating it as {}. Return "
                        "a dict of scalars to log them.")
      return {}
    return result

  return wrapped


def disable_pmap_jit(fn: F) -> F:
  """Runs `fn` with pmap and jit made eager when --jaxline_disable_pmap_jit."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    if flags.FLAGS["jaxline_disable_pmap_jit"].value:
      import chex  # pylint: disable=g-import-not-at-top  # See __getattr__.
      with chex.fake_pmap_and_jit():
        return fn(*args, **kwargs)
    return fn(*args, **kwargs)

  return wrapped


def get_checkpoint_dir(config, host_id: Optional[int] = None) -> str:
  """Returns `config.checkpoint_dir`, created; every host shares it."""
  del host_id  # All hosts use one directory.
  directory = config.get("checkpoint_dir", "") if hasattr(
      config, "get") else getattr(config, "checkpoint_dir", "")
  if not directory:
    raise ValueError("config.checkpoint_dir is missing or empty; set it to "
                     "the directory for checkpoints and logs.")
  os.makedirs(directory, exist_ok=True)
  return directory



class Snapshot(dict):
  """One frozen history entry: a dict that also reads as attributes.

  Keys may be any hashable, dotted strings included; `placements` records
  where each array lived so that a restore puts it back there.
  """

  def __init__(self, nest: Mapping[Any, Any], placements=None):
    super().__init__(nest)
    self.placements = placements or {}

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def to_dict(self) -> dict:
    return dict(self)


def _with_live_type(live: Any, value: Any) -> Any:
  """Coerces `value` to the type of the live ConfigDict field it replaces."""
  if value is None or live is None:
    return value
  if isinstance(live, bool):
    return bool(value)
  if isinstance(live, int):
    return int(value)
  if isinstance(live, float):
    return float(value)
  if isinstance(live, jax.Array) and not isinstance(value, jax.Array):
    value = np.array(value)  # A private copy: device_put may alias it.
    if value.shape == live.shape:
      return jax.device_put(value, live.sharding)
    return jax.device_put(value)
  return value


def _is_legacy_module(module: Any) -> bool:
  return (not isinstance(module, Mapping) and
          hasattr(module, "CHECKPOINT_ATTRS"))


def _restore_legacy_module(live_module: Any, saved_module: Any) -> None:
  """Copies attributes from an experiment instance saved by hand (0.0.8)."""
  attrs = (list(saved_module.CHECKPOINT_ATTRS) +
           list(saved_module.NON_BROADCAST_CHECKPOINT_ATTRS))
  for attr in attrs:
    setattr(live_module, attr, getattr(saved_module, attr))


_LOCK = threading.RLock()


class InMemoryCheckpointer(Checkpointer):
  """Keeps checkpoints in this process's memory, in GLOBAL_CHECKPOINT_DICT.

  Threads share one history per series but each has its own live state: that
  is how eval follows training in `train_eval_multithreaded`, and how a
  second `platform.main` call in one process finds the first one's state.
  """

  def __init__(self, config, mode: str):
    del mode
    self._max_checkpoints_to_keep = config.max_checkpoints_to_keep

  def get_experiment_state(self, ckpt_series: str):
    with _LOCK:
      series = GLOBAL_CHECKPOINT_DICT.get(ckpt_series)
      if series is None:
        series = CheckpointNT(threading.local(), [])
        GLOBAL_CHECKPOINT_DICT[ckpt_series] = series
      if not hasattr(series.active, "state"):
        series.active.state = config_dict.ConfigDict()
      return series.active.state

  def save(self, ckpt_series: str) -> None:
    with _LOCK:
      series = GLOBAL_CHECKPOINT_DICT[ckpt_series]
      history = series.history
      nest = {}
      for key, value in series.active.state.items():
        if key == "experiment_module":
          value = value.snapshot_state()
        nest[key] = value
      frozen, placements = devices.freeze(nest)
      ckpt_id = history[-1].id + 1 if history else 0
      history.append(SnapshotNT(ckpt_id, Snapshot(frozen, placements)))
      keep = self._max_checkpoints_to_keep
      if keep and len(history) > keep:
        del history[:len(history) - keep]
    logging.info("Saved checkpoint %s with id %s.", ckpt_series, ckpt_id)

  def can_be_restored(self, ckpt_series: str) -> bool:
    series = GLOBAL_CHECKPOINT_DICT.get(ckpt_series)
    return series is not None and bool(series.history)

  def restore(self, ckpt_series: str) -> None:
    live = self.get_experiment_state(ckpt_series)
    with _LOCK:
      snapshot = GLOBAL_CHECKPOINT_DICT[ckpt_series].history[-1]
    nest = snapshot.pickle_nest
    legacy = _is_legacy_module(nest["experiment_module"]) if (
        "experiment_module" in nest) else False
    if legacy:
      values = dict(nest.items())
    else:
      values = devices.thaw(nest, getattr(nest, "placements", {}))
    for key in list(live.keys()):
      if key not in values:
        continue  # Fields only live keep their value.
      if key == "experiment_module":
        if legacy:
          _restore_legacy_module(live.experiment_module, values[key])
        else:
          live.experiment_module.restore_from_snapshot(values[key])
      else:
        setattr(live, key, _with_live_type(live[key], values[key]))
    logging.info("Returned checkpoint %s with id %s.", ckpt_series,
                 snapshot.id)

  def restore_path(self, ckpt_series: str) -> Optional[str]:
    if not self.can_be_restored(ckpt_series):
      return None
    return str(GLOBAL_CHECKPOINT_DICT[ckpt_series].history[-1].id)

  def wait_for_checkpointing_to_finish(self) -> None:
    pass
