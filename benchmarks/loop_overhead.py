"""What the jaxline training loop adds per step over a plain loop.

Issue 12 sets the bar: "a plain Python loop calling the same jitted update
with inputs already on the device, which is the physical limit of a loop".
Here that loop is `floor`, and every figure is jaxline's `train()` against
it, in one process and interleaved repeats, for two workloads:

  mlp   an MLP SGD step on a fixed batch (`--mlp_in`, `--mlp_width`,
        `--mlp_batch`; by default about 0.9 ms a step on 1 CPU device and
        about 2 ms on 8 forced ones, the issue's sizes). The global batch is
        split over the devices; each device updates its own copy of the
        parameters, so the step has no collectives.
  noop  an update that adds the step and the key's first word to a counter
        carried as the parameters: the loop's cost alone.

Both use the step (the MLP's learning-rate decay) and the key (input noise),
so neither input is pruned. Each runs in both experiment styles: pmap
(`jax.pmap` over per-device arrays) and sharded (`jax.jit` of a vmap over a
leading device axis split over the devices, with the replicated step and key
jaxline gives that style). The variants, all calling the same compiled
update (`--variants` picks among them, by default the first five; floor and
train always run):

  floor     the plain loop: constant step and key inputs already on the
            devices, the update call alone. The bar.
  train     `jaxline.train.train(...)` as a user runs it: InMemoryCheckpointer,
            the base config's logging and checkpoint intervals (60 s, 120 s,
            300 s, so nothing periodic fires in a run), a no-op writer, the
            non-finite guard (`terminate_on_nan`) and progress line on.
  orig      `train` with jaxline 0.0.8's per-step loop work re-created on
            current JAX: the same-run stand-in for "0.0.8 (shimmed)".
  bare      a plain loop plus one small jitted call per step that counts the
            step and splits the key: the old baseline.
  noguard   `train` with `terminate_on_nan=False`. Guard cost: train - noguard.
  fused     a plain loop whose compiled step also counts and splits.
  loop      `experiment.train_loop` called directly, no periodic actions.

The experiment's `step` reads the clocks (wall, and the loop thread's CPU
time) every `--window` steps after a warm-up, so every window holds the same
loop iterations whatever drives them. The summary gives, per device count,
style and workload, each variant's added us/step and ratio over floor as a
difference of medians and as the median of paired per-window differences
(the robust estimate the verdict uses), then the issue's table with a verdict
against its targets.

Before timing, unless `--skip_checks`, a check runs `train()` for a few
chunks of steps and compares the (global_step, rng) that `step` received
with the plain derivation (split the state key, fold in host and device, as
`jaxline/rng.py` documents), and the final parameters with those of a plain
loop fed them: they must be bit-identical.

Then, unless `--skip_sync_check`, the per-step sync check runs `train()` (guard
and progress line on, noop workload) with `train_loop` under
`jax.transfer_guard_device_to_host("disallow_explicit")` and counts, by
thread, every device-to-host fetch of a jax.Array and every wait on one: no
action firing (the loop thread must fetch nothing), every step logged
asynchronously (the fetches must all be in the actions' worker threads), and
a control logged synchronously (the loop thread fetches every step, which the
check must see). The guard is thread-local and, on XLA:CPU, never sees a
device-to-host copy (numpy gets a zero-copy view), so the counts are the
evidence; a small probe prints what the guard does on the backend in use.

Usage:
  python benchmarks/loop_overhead.py                 # 1 and 8 CPU devices
  python benchmarks/loop_overhead.py --devices 8 --workload noop
  python benchmarks/loop_overhead.py --mlp_in 16 --mlp_width 32 --mlp_batch 8
  python benchmarks/loop_overhead.py --breakdown_only --devices 1
  python benchmarks/loop_overhead.py --devices native --sync_check_only

`--devices` sets `--xla_force_host_platform_device_count` (and
JAX_PLATFORMS=cpu) before JAX is imported; with several counts each runs in
a child process; `native` leaves the platform to JAX (a GPU, say). It prints
results, exits 0, and never asserts on timings.
"""

import os
import sys

import forced_devices  # benchmarks/forced_devices.py, beside this script.


_REQUESTED_DEVICES = forced_devices.requested(sys.argv, "1,8")
if "," not in _REQUESTED_DEVICES and _REQUESTED_DEVICES != "native":
  forced_devices.force(int(_REQUESTED_DEVICES))
# Run from a checkout without installing: the repository root goes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import cProfile
import collections
import dataclasses
import functools
import gc
import io
import json
import pstats
import statistics
import subprocess
import tempfile
import threading
import time
import timeit
import traceback
import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import flags as absl_flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np

from jaxline import base_config
from jaxline import devices as devices_lib
from jaxline import experiment as experiment_lib
from jaxline import nonfinite
from jaxline import periodic
from jaxline import preemption
from jaxline import progress
from jaxline import rng as rng_lib
from jaxline import sharding
from jaxline import train as train_lib
from jaxline import utils
from jaxline import writers
# pylint: enable=g-import-not-at-top,wrong-import-position

WORKLOADS = ("mlp", "noop")
# Issue 12's targets by (workload, local device count): ("added", us/step)
# or ("ratio", train / plain), each the most jaxline may take.
TARGETS = {
    ("noop", 1): ("added", 10.0),
    ("noop", 8): ("added", 60.0),
    ("mlp", 1): ("ratio", 1.01),
    ("mlp", 8): ("ratio", 1.06),
}
# The issue's own figures for the same rows (2-core machine, each against
# its own plain loop): (jaxline when filed, 0.0.8 shimmed onto JAX 0.10.2).
ISSUE_FIGURES = {
    ("noop", 1): (17.0, 38.0),
    ("noop", 8): (204.0, 246.0),
    ("mlp", 1): (1.03, 1.06),
    ("mlp", 8): (1.12, 1.17),
}

AXIS = "i"
# Steps per timed window by workload: a window of the no-op step is a few
# milliseconds long at 50 steps, too short to ride out a scheduler tick.
_DEFAULT_WINDOW = {"mlp": 25, "noop": 250}


# ---------------------------------------------------------------------------
# The workloads. Each is `update(params, batch, global_step, rng) -> (params,
# scalars)` on one device's slice; the styles map it over the devices.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MlpShape:
  """The MLP's sizes; `batch` is global, split over the devices."""
  inputs: int = 128
  width: int = 512
  batch: int = 256


def _key_word(rng: jax.Array) -> jax.Array:
  """The key's first uint32 word, for raw and typed keys alike."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return rng.reshape(-1)[0].astype(jnp.uint32)


def _noop_update(params, batch, global_step, rng, collectives: bool):
  """Almost nothing: the counter plus the step and a word of the key.

  Both inputs feed the output, so jit keeps them and the loop's step and key
  are real dependencies, as in a training step.
  """
  del batch, collectives
  acc = params["acc"] + global_step.astype(jnp.uint32) + _key_word(rng)
  return {"acc": acc}, {"value": acc.astype(jnp.float32)}


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  pred = h @ params["w2"] + params["b2"]
  return jnp.mean((pred - y) ** 2)


def _mlp_update(params, batch, global_step, rng, collectives: bool):
  """One SGD step that uses both the step (lr decay) and the key (noise)."""
  x, y = batch
  x = x + 1e-3 * jax.random.normal(rng, x.shape)
  loss, grads = jax.value_and_grad(_loss)(params, x, y)
  if collectives:
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
  lr = 0.05 / (1.0 + 1e-4 * global_step.astype(jnp.float32))
  params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  return params, {"loss": loss}


_UPDATES = {"mlp": _mlp_update, "noop": _noop_update}


def _init_state(workload: str, shape: MlpShape, n: int, key: jax.Array):
  """(params of one device, batch with a leading axis of `n` devices)."""
  if workload == "noop":
    return {"acc": np.zeros((), np.uint32)}, None
  k1, k2 = jax.random.split(key)
  # Scaled by 1/sqrt(fan-in) so that, with the data below, any size trains
  # without diverging (a NaN would stop train() at the non-finite guard).
  params = {
      "w1": np.asarray(jax.random.normal(k1, (shape.inputs, shape.width)))
            / np.sqrt(shape.inputs),
      "b1": np.zeros((shape.width,), np.float32),
      "w2": np.asarray(jax.random.normal(k2, (shape.width, 1)))
            / np.sqrt(shape.width),
      "b2": np.zeros((1,), np.float32),
  }
  per_device = -(-shape.batch // n)  # The global batch, rounded up.
  # Rows of about unit norm on every device's slice: well conditioned at
  # any size and device count.
  x = np.random.default_rng(0).standard_normal(
      (n, per_device, shape.inputs)) / np.sqrt(shape.inputs)
  x = x.astype(np.float32)
  y = np.sin(2.0 * x.sum(axis=-1, keepdims=True))
  return params, (x, y)


def _split_advance(step, state_rng):
  """Counts the step and splits the key: `(step + 1, key, next_state)`."""
  keys = jax.random.split(state_rng)
  return step + 1, keys[0], keys[1]


def _fused_update(update, per_device: bool, params, batch, step, state_rng):
  """Advance and update in one compiled call, as a hand-written loop would."""
  step, key, state_rng = _split_advance(step, state_rng)
  if per_device:
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
  params, scalars = update(params, batch, step, key)
  return params, scalars, step, state_rng


@functools.lru_cache(maxsize=None)
def _compiled(workload: str, style: str, collectives: bool):
  """(update, fused, advance) for a workload and style, built once.

  The sharded style maps the update over a leading device axis that is split
  over the devices (vmap inside jit): each device updates its own slice, with
  no collectives, and gets the replicated step and key jaxline passes.
  """
  fn = functools.partial(_UPDATES[workload],
                         collectives=collectives and style == "pmap")
  if style == "pmap":
    update = jax.pmap(fn, axis_name=AXIS)
    fused = jax.pmap(functools.partial(_fused_update, fn, True),
                     axis_name=AXIS)
    advance = jax.jit(jax.vmap(_split_advance),
                      out_shardings=devices_lib.per_device_sharding())
  else:
    mapped = jax.vmap(fn, in_axes=(0, 0, None, None))
    update = jax.jit(mapped, out_shardings=sharding.batch_sharded())
    fused = jax.jit(functools.partial(_fused_update, mapped, False))
    advance = jax.jit(_split_advance)
  return update, fused, advance


class _Clock:
  """Times windows of `step` calls from inside the experiment.

  After `warmup` calls, every `window` calls it waits for the step's outputs
  and reads the clocks, so each window holds exactly `window` loop
  iterations of whatever loop runs the steps. It reads wall time and the
  calling thread's CPU time: the loop's overhead is CPU time of the thread
  that dispatches, which other processes on a shared machine disturb less.
  """

  def __init__(self):
    self.arm(0, 1, 0)

  def arm(self, warmup: int, window: int, windows: int,
          profiler: Optional[cProfile.Profile] = None) -> None:
    self.calls = 0
    self.marks = {warmup - 1 + j * window for j in range(windows + 1)}
    self.last = warmup - 1 + windows * window
    self.window = window
    self.profiler = profiler
    self.stamps = []

  def total_steps(self) -> int:
    return self.last + 1

  def after(self, outputs: Any) -> None:
    if self.calls in self.marks:
      jax.block_until_ready(outputs)
      if self.profiler is not None and self.calls == self.last:
        self.profiler.disable()
      self.stamps.append((time.perf_counter(), time.thread_time()))
      if self.profiler is not None and len(self.stamps) == 1:
        self.profiler.enable()
    self.calls += 1

  def window_us(self) -> Dict[str, List[float]]:
    """metric -> us/step of every window, in order."""
    if self.calls <= self.last:
      raise RuntimeError(f"The timed windows were not reached ({self.calls} "
                         f"steps ran, {self.last + 1} needed).")
    out = {"wall": [], "cpu": []}
    for (t0, c0), (t1, c1) in zip(self.stamps, self.stamps[1:]):
      out["wall"].append((t1 - t0) / self.window * 1e6)
      out["cpu"].append((c1 - c0) / self.window * 1e6)
    return out


class BenchExperiment(experiment_lib.AbstractExperiment):
  """A workload in the pmap or the sharded style.

  `record`, when a list, receives every step's (global_step, rng) as the loop
  passed them, for the key check. `built`, when a list, receives the
  instance, so a check can read what `train()` built.
  """

  CHECKPOINT_ATTRS = {"_params": "params"}

  def __init__(self, mode: str, init_rng: Optional[jax.Array] = None, *,
               style: str = "pmap", workload: str = "mlp",
               shape: MlpShape = MlpShape(), collectives: bool = False,
               clock: Optional[_Clock] = None, loop: str = "default",
               record: Optional[list] = None, built: Optional[list] = None):
    super().__init__(mode, init_rng)
    self.style = style
    self.loop = loop
    self.clock = clock or _Clock()
    self.record = record
    self.init_rng = init_rng
    self._update, self._fused, _ = _compiled(workload, style, collectives)
    key = jax.random.PRNGKey(0) if init_rng is None else init_rng
    n = jax.local_device_count() if style == "pmap" else jax.device_count()
    params, batch = _init_state(workload, shape, n, key)
    if style == "pmap":
      self._params = utils.bcast_local_devices(params)
      self._batch = jax.device_put(batch, devices_lib.per_device_sharding())
    else:
      stacked = jax.tree.map(lambda p: np.stack([p] * n), params)
      self._params = sharding.shard(stacked)
      self._batch = sharding.shard(batch)
    if built is not None:
      built.append(self)

  @property
  def params(self) -> Any:
    return self._params

  def update(self, global_step, rng):
    """One update of the parameters; returns (params, scalars)."""
    self._params, scalars = self._update(self._params, self._batch,
                                         global_step, rng)
    return self._params, scalars

  def step(self, *, global_step, rng, writer):
    del writer
    if self.record is not None:
      self.record.append((global_step, rng))
    params, scalars = self.update(global_step, rng)
    self.clock.after(params)
    return scalars

  def train_loop(self, config, state, periodic_actions, writer=None):
    if self.loop == "orig":
      loop = (_original_pmap_train_loop if self.style == "pmap" else
              _original_sharded_train_loop)
      return loop(self, config, state, periodic_actions, writer)
    return super().train_loop(config, state, periodic_actions, writer)

  def fused_step(self, step, state_rng):
    """The `fused` variant's step: advance and update in one call."""
    self._params, scalars, step, state_rng = self._fused(
        self._params, self._batch, step, state_rng)
    self.clock.after(self._params)
    return scalars, step, state_rng

  def evaluate(self, *, global_step, rng, writer):
    del global_step, rng, writer
    return {}


# ---------------------------------------------------------------------------
# jaxline 0.0.8's per-step loop work, re-created on current JAX ("orig").
# Keys and RNG modes are spelled out here, not taken from jaxline, so the
# reference does not move when jaxline's loop does.
# ---------------------------------------------------------------------------


def _unique_host(mode: str) -> bool:
  return mode.startswith("unique_host")


def _unique_device(mode: str) -> bool:
  return mode.endswith("unique_device")


def _specialize(key, host_id, device_index, mode: str):
  """Folds in the host id, then the device index, as `mode` asks."""
  if _unique_host(mode):
    key = jax.random.fold_in(key, host_id)
  if _unique_device(mode):
    key = jax.random.fold_in(key, device_index)
  return key


def _orig_pmap_advance(mode: str):
  """0.0.8's per-step device call: a pmap that counts, splits, specialises."""

  def next_device_state(step, rng, host_id):
    step_rng, state_rng = tuple(jax.random.split(rng))
    step_rng = _specialize(step_rng, host_id, jax.lax.axis_index(AXIS), mode)
    return step + 1, step_rng, state_rng

  return jax.pmap(next_device_state, axis_name=AXIS)


def _original_pmap_train_loop(exp, config, state, periodic_actions,
                              writer) -> None:
  """The per-step work of jaxline 0.0.8's loop (pmap style).

  0.0.8 built one `jax.pmap` per loop start that counted the step and split
  and specialised the key, fed it the host ids as one single-device array
  (`jnp.broadcast_to(host_id, ...)`) every step, passed the host step as a
  numpy array on the first step, and wrote `state` by attribute. Keys differ
  from jaxline's (0.0.8 gave the first step the unsplit state key); the cost
  does not.
  """
  next_state = _orig_pmap_advance(config.random_mode_train)
  n = jax.local_device_count()
  host_ids = jnp.broadcast_to(jax.process_index(), (n,))
  _original_loop(exp, config, state, periodic_actions, writer,
                 lambda step, rng: next_state(step, rng, host_ids),
                 np.broadcast_to(np.int32(state.global_step), [n]))


def _original_sharded_train_loop(exp, config, state, periodic_actions,
                                 writer) -> None:
  """0.0.8's loop shape, with the sharded style's device call.

  0.0.8 had no sharded style, so this is what a shim would run: 0.0.8's
  loop (the state written by attribute, the host step as numpy on the first
  step, one device call per step after the step, built at each loop start),
  with that call a jit of the sharded rule (split the replicated state key;
  no host or device folding) in place of the pmap.
  """
  next_state = jax.jit(lambda s, k: _split_advance(s, k))
  _original_loop(exp, config, state, periodic_actions, writer, next_state,
                 np.asarray(state.global_step, np.int32))


def _original_loop(exp, config, state, periodic_actions, writer, next_state,
                   global_step_devices) -> None:
  """0.0.8's loop body: step, count, then one device call for the keys."""
  step_key = state.train_step_rng
  with utils.log_activity("training loop"):
    while state.global_step < config.training_steps:
      with jax.profiler.StepTraceAnnotation("train",
                                            step_num=state.global_step):
        scalar_outputs = exp.step(global_step=global_step_devices,
                                  rng=step_key, writer=writer)
        t = time.time()
        state.global_step += 1
        global_step_devices, step_key, state.train_step_rng = next_state(
            global_step_devices, state.train_step_rng)
      for action in periodic_actions:
        action(t, state.global_step, scalar_outputs)


# ---------------------------------------------------------------------------
# The variants: each runs `total` steps; the clock times its windows.
# ---------------------------------------------------------------------------


def _initial_step_and_key(style: str):
  """The per-step inputs before the first step, laid out for the style."""
  step = np.asarray(-1, np.int32)
  key = jax.random.PRNGKey(1)
  if style == "pmap":
    return utils.bcast_local_devices((step, key))
  return sharding.replicate((step, key))


def _run_floor(exp: BenchExperiment, total: int) -> None:
  """The plain loop: the update with inputs already on the devices."""
  step, key = _initial_step_and_key(exp.style)
  for _ in range(total):
    exp.step(global_step=step, rng=key, writer=None)


def _run_bare(exp: BenchExperiment, total: int, workload: str) -> None:
  _, _, advance = _compiled(workload, exp.style, False)
  step, state_rng = _initial_step_and_key(exp.style)
  for _ in range(total):
    step, key, state_rng = advance(step, state_rng)
    exp.step(global_step=step, rng=key, writer=None)


def _run_fused(exp: BenchExperiment, total: int) -> None:
  step, state_rng = _initial_step_and_key(exp.style)
  for _ in range(total):
    _, step, state_rng = exp.fused_step(step, state_rng)


def _loop_config(style: str, total: int, log_every: Optional[int],
                 **overrides):
  """The config a user would write for this run, then `overrides`.

  With `log_every` None the base config's intervals stay (seconds: nothing
  fires in a run this short); otherwise logs every `log_every` steps.
  """
  config = base_config.get_base_config()
  config.training_steps = total
  if log_every is not None:
    config.interval_type = "steps"
    config.log_tensors_interval = log_every
    config.log_train_data_interval = log_every
    config.save_checkpoint_interval = 10**9
  if style != "pmap":
    config.experiment_style = style
  for key, value in overrides.items():
    config[key] = value
  return config


def _run_train_loop(exp: BenchExperiment, total: int,
                    log_every: Optional[int]) -> None:
  """`experiment.train_loop` directly, with no periodic actions."""
  config = _loop_config(exp.style, total, log_every)
  if exp.style != "pmap":  # What `train` does when it builds the experiment.
    setattr(exp, getattr(experiment_lib, "STYLE_ATTR",
                         "_jaxline_experiment_style"), exp.style)
  state = config_dict.ConfigDict()
  state.global_step = 0
  state.train_step_rng = exp.initialize_train_step_rng(jax.random.PRNGKey(1))
  exp.train_loop(config, state, (), None)


def _run_train(exp_factory: Callable[..., Any], style: str, total: int,
               log_every: Optional[int], **overrides) -> None:
  """`jaxline.train.train` as a user runs it, from a clean checkpoint dict.

  `overrides` are config keys set on top, e.g. `terminate_on_nan=False`.
  """
  config = _loop_config(style, total, log_every, **overrides)
  utils.GLOBAL_CHECKPOINT_DICT.clear()
  checkpointer = utils.InMemoryCheckpointer(config, "train")
  train_lib.train(exp_factory, config, checkpointer, writers.NullWriter())
  utils.GLOBAL_CHECKPOINT_DICT.clear()


# All variants, in their order in the tables; floor and train always run.
VARIANTS = ("floor", "train", "orig", "bare", "noguard", "fused", "loop")
_REQUIRED = ("floor", "train")
# Run unless --variants says otherwise: the issue's columns, the old
# baseline, and the guard's cost.
_DEFAULT_VARIANTS = ("floor", "train", "orig", "bare", "noguard")
METRICS = ("wall", "cpu")


def _factory(style: str, workload: str, args, **kwargs):
  return functools.partial(BenchExperiment, style=style, workload=workload,
                           shape=_shape(args), collectives=args.collectives,
                           **kwargs)


def _shape(args) -> MlpShape:
  return MlpShape(args.mlp_in, args.mlp_width, args.mlp_batch)


def _selected_variants(args) -> Tuple[str, ...]:
  wanted = set(_REQUIRED) | {v for v in args.variants.split(",") if v}
  unknown = wanted - set(VARIANTS)
  if unknown:
    raise ValueError(f"Unknown --variants {sorted(unknown)}; choose from "
                     f"{', '.join(VARIANTS)}.")
  return tuple(v for v in VARIANTS if v in wanted)


def _measure(style: str, workload: str, args
             ) -> Dict[str, Dict[str, List[List[float]]]]:
  """metric -> variant -> per repeat, the us/step of each timed window.

  Variants run back to back within a repeat, in a rotating order, so the
  windows of one repeat were timed seconds apart.
  """
  clock = _Clock()
  factory = _factory(style, workload, args, clock=clock)
  exp = factory("train", init_rng=jax.random.PRNGKey(0))
  log_every = args.log_every
  runners = {
      "floor": lambda n: _run_floor(exp, n),
      "fused": lambda n: _run_fused(exp, n),
      "bare": lambda n: _run_bare(exp, n, workload),
      "loop": lambda n: _run_train_loop(exp, n, log_every),
      "train": lambda n: _run_train(factory, style, n, log_every),
      "noguard": lambda n: _run_train(factory, style, n, log_every,
                                      terminate_on_nan=False),
      "orig": lambda n: _run_train(functools.partial(factory, loop="orig"),
                                   style, n, log_every),
  }
  variants = _selected_variants(args)
  window = args.window or _DEFAULT_WINDOW[workload]
  # One untimed pass compiles everything.
  for name in variants:
    clock.arm(0, 1, 0)
    runners[name](3)
  results = {m: collections.defaultdict(list) for m in METRICS}
  for r in range(args.repeats):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for name in order:
      gc.collect()
      clock.arm(args.warmup, window, args.windows)
      runners[name](clock.total_steps())
      for metric, values in clock.window_us().items():
        results[metric][name].append(values)
  return {m: dict(v) for m, v in results.items()}


# ---------------------------------------------------------------------------
# The key check: what `step` gets in train() against the plain derivation,
# and the final state against a plain loop fed the same inputs.
# ---------------------------------------------------------------------------


def _loop_chunk() -> int:
  """Steps per key-derivation call of jaxline's loop (1 if it has none)."""
  keys = getattr(experiment_lib, "StepKeys", None)
  return int(getattr(keys, "CHUNK", 1))


def _host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _plain_inputs(style: str, config, steps: int) -> List[Tuple[Any, Any]]:
  """(global_step, rng) of each step, derived with jax.random alone.

  The rule `jaxline/rng.py` documents: the train key is the seed's key (its
  first split unless `legacy_random_seed_behavior`); each step splits the
  state key into (key, next state); in the pmap style every device starts
  from the same state and folds the host id, then its index, into its key
  as `random_mode_train` asks; in the sharded style the key is used as is.
  The step is the count of steps done before it.
  """
  seed_key = jax.random.PRNGKey(config.random_seed)
  state = (seed_key if config.legacy_random_seed_behavior else
           jax.random.split(seed_key)[0])
  mode = config.random_mode_train
  n = jax.local_device_count()
  out = []
  for i in range(steps):
    key, state = jax.random.split(state)
    if style == "pmap":
      keys = [_specialize(key, jax.process_index(), d, mode)
              for d in range(n)]
      out.append((np.full((n,), i), np.stack([_host(k) for k in keys])))
    else:
      out.append((np.asarray(i), _host(key)))
  return out


def _check_one(style: str, workload: str, args) -> Dict[str, Any]:
  """One train() run recorded, then the plain loop; returns the check row."""
  steps = args.check_steps or 3 * _loop_chunk() + 7
  record, built = [], []
  factory = _factory(style, workload, args, record=record, built=built)
  config = _loop_config(style, steps, None)
  _run_train(factory, style, steps, None)
  got = [(_host(s), _host(k)) for s, k in record]
  want = _plain_inputs(style, config, steps)
  first_bad = next((i for i, (g, w) in enumerate(zip(got, want))
                    if not (np.array_equal(g[0], w[0]) and
                            np.array_equal(g[1], w[1]))), None)
  keys_ok = len(got) == steps and first_bad is None
  # The plain loop: the same update, fed the plain inputs laid out as the
  # loop lays its own out, from the parameters train() started with.
  trained = built[0]
  plain = factory("train", init_rng=trained.init_rng)
  plain.record = None
  dtype = got[0][0].dtype if got else np.int32
  for step, key in want:
    step = step.astype(dtype)
    if style == "pmap":
      step, key = jax.device_put((step, key),
                                 devices_lib.per_device_sharding())
    else:
      step, key = sharding.replicate((step, key))
    plain.step(global_step=step, rng=key, writer=None)
  ours, theirs = trained.params, plain.params
  same_state = (keys_ok and
                jax.tree.structure(ours) == jax.tree.structure(theirs) and
                all(np.array_equal(_host(a), _host(b)) for a, b in
                    zip(jax.tree.leaves(ours), jax.tree.leaves(theirs))))
  return {"metric": "check", "devices": jax.local_device_count(),
          "style": style, "workload": workload, "steps": steps,
          "received": len(got), "chunk": _loop_chunk(), "keys_ok": keys_ok,
          "first_bad": first_bad, "state_ok": bool(same_state)}


def _print_checks(rows: List[Dict[str, Any]]) -> None:
  checks = [r for r in rows if r["metric"] == "check"]
  if not checks:
    return
  print("\nKey and state check: the (global_step, rng) step() received in "
        "train() against the plain derivation, and train()'s final params "
        "against a plain loop fed them (bit for bit):")
  for r in checks:
    keys = ("equal" if r["keys_ok"] else
            f"DIFFER (first at step {r['first_bad']}, {r['received']} "
            "received)")
    state = "bit-identical" if r["state_ok"] else "DIFFERENT"
    verdict = "OK" if r["keys_ok"] and r["state_ok"] else "CHECK"
    print(f"  {r['devices']} device(s), {r['style']:7s} {r['workload']:4s}: "
          f"{r['steps']} steps (loop chunk {r['chunk']}): inputs {keys}; "
          f"final params {state}. {verdict}")


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def _median(xs: List[float]) -> float:
  return statistics.median(xs)


def _all(repeats: List[List[float]]) -> List[float]:
  return [v for windows in repeats for v in windows]


def _pairs(variant: List[List[float]], base: List[List[float]]
           ) -> List[Tuple[float, float]]:
  """(variant, base) windows at the same position of the same repeat."""
  return [(a, b) for rv, rb in zip(variant, base) for a, b in zip(rv, rb)]


def _summary_rows(n_devices: int, style: str, workload: str,
                  times: Mapping[str, Mapping[str, List[List[float]]]]
                  ) -> List[Dict[str, Any]]:
  """One row per metric and variant, against the plain loop (floor).

  Three estimates of the added time: `*_med`, the difference of the medians
  over all windows; `*_paired`, the median over window pairs (the variant's
  and floor's windows at the same position of the same repeat, timed
  seconds apart) of their difference or ratio; `*_min`, the fastest
  windows'. A burst of load from elsewhere spoils a few pairs, which the
  median drops, and a slow drift of load between repeats cancels within
  each pair.
  """
  rows = []
  for metric in METRICS:
    reps = times[metric]
    floor = _all(reps["floor"])
    for name in (v for v in VARIANTS if v in reps and v != "floor"):
      windows = _all(reps[name])
      pairs = _pairs(reps[name], reps["floor"])
      rows.append({
          "metric": metric, "devices": n_devices, "style": style,
          "workload": workload, "variant": name,
          "plain_med": _median(floor), "us_med": _median(windows),
          "plain_min": min(floor), "us_min": min(windows),
          "added_paired": _median([a - b for a, b in pairs]),
          "ratio_paired": _median([a / b for a, b in pairs]),
          "runs": [_median(w) for w in reps[name]],
          "plain_runs": [_median(w) for w in reps["floor"]],
      })
  return rows


def _print_details(n_devices: int, style: str, workload: str,
                   times: Mapping[str, Mapping[str, List[List[float]]]]
                   ) -> None:
  for metric in METRICS:
    print(f"\n  {n_devices} device(s), {style} style, {workload}, {metric} "
          "us/step: median and min of all windows | each run's median "
          "(min-max)")
    for name in (v for v in VARIANTS if v in times[metric]):
      windows = _all(times[metric][name])
      reps = " ".join(f"{_median(w):7.1f} ({min(w):.0f}-{max(w):.0f})"
                      for w in times[metric][name])
      print(f"    {name:8s} {_median(windows):8.1f} {min(windows):8.1f} | "
            f"{reps}")


_METRIC_TITLES = {
    "wall": "Wall time per step (what the run takes; the issue's measure)",
    "cpu": ("CPU time per step of the thread running the loop (its own "
            "Python and dispatch work; other processes disturb it less)"),
}


def _print_table(rows: List[Dict[str, Any]]) -> None:
  """Every variant against the plain loop, per metric."""
  for metric in METRICS:
    selected = [r for r in rows if r.get("metric") == metric]
    if not selected:
      continue
    print(f"\n{_METRIC_TITLES[metric]}, against the plain loop (floor):")
    header = (f"{'devices':>7} {'style':>7} {'work':>4} {'variant':>8} | "
              f"{'plain':>7} {'variant':>8} {'added':>7} {'ratio':>6} | "
              f"{'added':>7} {'ratio':>6} | {'added':>7}")
    print(header)
    print(f"{'':>7} {'':>7} {'':>4} {'':>8} | {'medians, us/step':^32} | "
          f"{'paired':^14} | {'fastest':>7}")
    print("-" * len(header))
    for r in selected:
      print(f"{r['devices']:>7} {r['style']:>7} {r['workload']:>4} "
            f"{r['variant']:>8} | {r['plain_med']:7.1f} {r['us_med']:8.1f} "
            f"{r['us_med'] - r['plain_med']:+7.1f} "
            f"{r['us_med'] / r['plain_med']:6.3f} | "
            f"{r['added_paired']:+7.1f} {r['ratio_paired']:6.3f} | "
            f"{r['us_min'] - r['plain_min']:+7.1f}")
  print("plain = floor: the same compiled update in a plain loop, inputs "
        "already on the devices. medians: of all windows; paired: median "
        "over window pairs\n(same repeat, same position) of variant - plain "
        "and variant / plain; fastest: fastest window - plain's fastest.")
  _print_guard_cost(rows)


def _figure(workload: str, devices: int, plain_us: float) -> str:
  kind = "added us/step" if workload == "noop" else "ratio"
  what = ("no-op step" if workload == "noop" else
          f"MLP ({plain_us / 1e3:.2f} ms)")
  return f"{what}, {devices} device{'s' if devices > 1 else ''}: {kind}"


def _target(workload: str, devices: int) -> Optional[Tuple[str, float]]:
  return TARGETS.get((workload, devices))


def _figure_value(row: Optional[Dict[str, Any]], kind: str,
                  estimate: str) -> Optional[float]:
  if row is None:
    return None
  if estimate == "paired":
    return row["added_paired"] if kind == "added" else row["ratio_paired"]
  if kind == "added":
    return row["us_med"] - row["plain_med"]
  return row["us_med"] / row["plain_med"]


def _fmt(value: Optional[float], kind: str) -> str:
  if value is None:
    return "-"
  return f"{value:+.1f}" if kind == "added" else f"{value:.3f}"


def _print_issue_table(rows: List[Dict[str, Any]]) -> None:
  """Issue 12's table: jaxline and 0.0.8 re-created against the targets.

  Wall time, as the issue measures. The verdict ("met?") uses the paired
  estimate; where the difference of medians disagrees it is noted.
  """
  wall = [r for r in rows if r.get("metric") == "wall"]
  by_key = {(r["devices"], r["style"], r["workload"], r["variant"]): r
            for r in wall}
  styles = [s for s in ("pmap", "sharded")
            if any(r["style"] == s for r in wall)]
  cases = sorted({(r["workload"], r["devices"]) for r in wall},
                 key=lambda c: (WORKLOADS[::-1].index(c[0])
                                if c[0] in WORKLOADS else 9, c[1]))
  for style in styles:
    print(f"\nIssue 12's table, {style} style (wall us/step; paired / "
          "median of the windows, see above):")
    header = (f"{'figure':38s} {'plain':>7} | {'jaxline':>16} | "
              f"{'0.0.8 re-created':>16} | {'target':>7} {'met?':>4}")
    print(header)
    print("-" * len(header))
    for workload, devices in cases:
      train = by_key.get((devices, style, workload, "train"))
      if train is None:
        continue
      orig = by_key.get((devices, style, workload, "orig"))
      target = _target(workload, devices)
      kind = "added" if workload == "noop" else "ratio"
      cols = []
      for row in (train, orig):
        cols.append(f"{_fmt(_figure_value(row, kind, 'paired'), kind):>7} / "
                    f"{_fmt(_figure_value(row, kind, 'median'), kind):>7}"
                    if row is not None else f"{'-':>16}")
      if target is None:
        goal, met = "-", "-"
      else:
        goal = f"{'<=':>2}{target[1]:g}"
        paired = _figure_value(train, kind, "paired") <= target[1]
        median = _figure_value(train, kind, "median") <= target[1]
        met = "yes" if paired else "NO"
        if median != paired:
          met += f" (median: {'yes' if median else 'NO'})"
      print(f"{_figure(workload, devices, train['plain_med']):38s} "
            f"{train['plain_med']:7.1f} | {cols[0]:>16} | {cols[1]:>16} | "
            f"{goal:>7} {met}")
  figures = "; ".join(
      f"{w} {d}: {_fmt(v[0], 'added' if w == 'noop' else 'ratio')} / "
      f"{_fmt(v[1], 'added' if w == 'noop' else 'ratio')}"
      for (w, d), v in ISSUE_FIGURES.items())
  print("met?: the paired estimate against the target. For reference, the "
        f"issue's figures (jaxline when filed / 0.0.8 shimmed): {figures}.")


def _print_guard_cost(rows: List[Dict[str, Any]]) -> None:
  """The non-finite guard's cost: train (guard on) - noguard, per metric."""
  by_key = {(r["metric"], r["devices"], r["style"], r["workload"],
             r["variant"]): r for r in rows if r.get("variant")}
  cases = sorted({(r["devices"], r["style"], r["workload"]) for r in rows
                  if r.get("variant") == "noguard"})
  if not cases:
    return
  print("\nNon-finite guard's cost per step, train (guard on) - noguard "
        "(guard off), us/step; both runs have the progress line:")
  header = (f"{'devices':>7} {'style':>7} {'work':>4} | {'wall':>7} "
            f"{'cpu':>7} | {'wall':>7} {'cpu':>7}")
  print(header)
  print(f"{'':>7} {'':>7} {'':>4} | {'medians':^15} | {'paired':^15}")
  print("-" * len(header))
  for devices, style, workload in cases:
    median, paired = [], []
    for metric in METRICS:
      on = by_key.get((metric, devices, style, workload, "train"))
      off = by_key.get((metric, devices, style, workload, "noguard"))
      if on is None or off is None:
        median.append(float("nan"))
        paired.append(float("nan"))
        continue
      median.append(on["us_med"] - off["us_med"])
      # Both paired against the same floor windows: the difference of the
      # paired estimates.
      paired.append(on["added_paired"] - off["added_paired"])
    print(f"{devices:>7} {style:>7} {workload:>4} | {median[0]:+7.1f} "
          f"{median[1]:+7.1f} | {paired[0]:+7.1f} {paired[1]:+7.1f}")
  print("Within noise when it is small next to how far train's and "
        "noguard's per-run medians (the detail lines) move.")


# ---------------------------------------------------------------------------
# --breakdown: where the per-step time goes.
# ---------------------------------------------------------------------------


def _device_us(rows: List[Tuple[str, Callable[[], Any], int]], calls: int,
               repeats: int) -> Dict[str, Tuple[float, float]]:
  """label -> median (wall, thread CPU) us per step of each row.

  A row is (label, fn, steps per call of fn). One repeat of a row runs
  `calls` steps' worth of calls, then a block; repeats of all rows are
  interleaved, so a burst of load from elsewhere hits them alike.
  """
  samples = {label: ([], []) for label, _, _ in rows}
  for _, fn, _ in rows:  # Warm up (and compile).
    jax.block_until_ready([fn() for _ in range(3)])
  for _ in range(repeats):
    for label, fn, steps in rows:
      n = max(2, calls // steps)
      out = None
      start, start_cpu = time.perf_counter(), time.thread_time()
      for _ in range(n):
        out = fn()
      jax.block_until_ready(out)
      samples[label][0].append((time.perf_counter() - start) / (n * steps))
      samples[label][1].append((time.thread_time() - start_cpu) /
                               (n * steps))
  return {label: (_median(w) * 1e6, _median(c) * 1e6)
          for label, (w, c) in samples.items()}


def _host_us(stmt: Callable[[], Any], number: int = 5000,
             repeats: int = 5) -> float:
  return min(timeit.repeat(stmt, number=number, repeat=repeats)) / number * 1e6


def _breakdown_device_calls(args) -> List[str]:
  """Per-step cost of the loop's key derivation, per step and chunked.

  Rows for jaxline's functions appear only where `jaxline.rng` and
  `jaxline.experiment` have them (`make_step_key_fn`, `make_step_keys_fn`,
  `StepKeys`), so the script outlives changes to them.
  """
  mode = "unique_host_unique_device"
  n = jax.local_device_count()
  chunk = max(_loop_chunk(), 2)
  host_ids = utils.bcast_local_devices(np.int32(jax.process_index()))
  # 0.0.8's host ids: one array on the default device, resharded each call.
  host_ids_orig = jnp.broadcast_to(jax.process_index(), (n,))
  seed = jax.random.PRNGKey(7)
  state0 = utils.bcast_local_devices(seed)
  step0 = utils.bcast_local_devices(np.asarray(-1, np.int32))
  exp = BenchExperiment("train", style="pmap", workload="noop")
  per_step = getattr(rng_lib, "make_step_key_fn", None)
  chunked = getattr(rng_lib, "make_step_keys_fn", None)
  step_keys = getattr(experiment_lib, "StepKeys", None)
  orig = _orig_pmap_advance(mode)
  per_step_fn = per_step(mode) if per_step is not None else None
  chunk_fn = chunked(mode, chunk) if chunked is not None else None

  # The plain derivation of the first 2 * chunk steps, from state `seed`.
  want, state = [], seed
  for i in range(2 * chunk):
    key, state = jax.random.split(state)
    want.append((np.full((n,), i), np.stack(
        [_host(_specialize(key, jax.process_index(), d, mode))
         for d in range(n)])))

  def agrees(got) -> bool:
    return len(got) == len(want) and all(
        np.array_equal(_host(s), ws) and np.array_equal(_host(k), wk)
        for (s, k), (ws, wk) in zip(got, want))

  def chained(adv, ids):
    carry = {"s": step0, "k": state0}

    def call():
      carry["s"], key, carry["k"] = adv(carry["s"], carry["k"], ids)
      return carry["s"], key

    return call

  def chained_chunk():
    carry = {"s": -1, "k": state0}

    def call():
      outs = chunk_fn(np.asarray(carry["s"], np.int32), carry["k"],
                      host_ids)
      carry["s"] += chunk
      carry["k"] = outs[-1][2]
      return [(s, k) for s, k, _ in outs]

    return call

  def step_keys_call():
    config = _loop_config("pmap", 10**9, None)
    keys = step_keys(exp, config)
    carry = {"s": 0, "k": state0}

    def call():
      s, k, carry["k"] = keys.next(carry["s"], carry["k"])
      carry["s"] += 1
      return s, k

    return call

  def with_update(fn):
    def call():
      out = fn()
      pairs = out if isinstance(out, list) else [out]
      return [exp.update(s, k)[0] for s, k in pairs][-1]
    return call

  def update_only():
    return exp.update(step0, state0)[0]

  forms = []  # (label, fn, steps per call)
  checks = []
  if per_step is not None:
    fn = chained(per_step_fn, host_ids)
    checks.append(("rng.make_step_key_fn",
                   agrees([fn() for _ in range(2 * chunk)])))
    forms.append(("1 step per call: rng.make_step_key_fn",
                  chained(per_step_fn, host_ids), 1))
  fn = chained(orig, host_ids_orig)
  checks.append(("0.0.8's pmap", agrees([fn() for _ in range(2 * chunk)])))
  forms.append(("1 step per call: jax.pmap, 0.0.8's form", chained(
      orig, host_ids_orig), 1))
  if chunked is not None:
    fn = chained_chunk()
    checks.append((f"rng.make_step_keys_fn({chunk})", agrees(fn() + fn())))
    forms.append((f"{chunk} steps per call: rng.make_step_keys_fn",
                  chained_chunk(), chunk))
  if step_keys is not None:
    try:
      fn = step_keys_call()
      checks.append(("StepKeys.next", agrees([fn() for _ in
                                              range(2 * chunk)])))
      forms.append(("StepKeys.next, per step (the loop's call)",
                    step_keys_call(), 1))
    except Exception as e:  # pylint: disable=broad-except
      checks.append((f"StepKeys ({_first_line(e)})", False))
  lines = [f"  same (step, key) for the first {2 * chunk} steps as the "
           "plain derivation: " + ", ".join(
               f"{name} {ok}" for name, ok in checks)]
  rows = [("update (noop pmap step), constant inputs", update_only, 1)]
  for label, fn, steps in forms:
    rows.append((f"advance, {label}", fn, steps))
  for label, fn, steps in forms:
    rows.append((f"  + update: {label}", with_update(fn), steps))
  costs = _device_us(rows, args.breakdown_calls, args.breakdown_repeats)
  for label, (wall, cpu) in costs.items():
    lines.append(f"  {label:58s} {wall:8.1f} {cpu:8.1f}")

  if chunked is not None:
    build_ms = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(chunked(mode, chunk)(
          np.asarray(-1, np.int32), state0, host_ids))  # As a loop start.
      build_ms.append((time.perf_counter() - start) * 1e3)
    lines.append(f"  {'make_step_keys_fn(mode, chunk) + a call, each loop':58s}"
                 f" {_median(build_ms):8.2f} ms wall (start; cached after "
                 "the first)")
  return lines


def _breakdown_host(args) -> List[str]:
  """Pure-Python per-step pieces of the loop."""
  del args
  key = utils.bcast_local_devices(jax.random.PRNGKey(3))
  cfg_state = config_dict.ConfigDict()
  cfg_state.global_step = 0
  cfg_state.train_step_rng = key
  plain_state = types.SimpleNamespace(global_step=0, train_step_rng=key)
  config = _loop_config("pmap", 10**9, None)
  exp = BenchExperiment("train", style="pmap", workload="noop")

  def cfg_incr():
    cfg_state.global_step += 1

  def cfg_item_incr():
    cfg_state["global_step"] = cfg_state["global_step"] + 1

  def cfg_item_rng():
    cfg_state["train_step_rng"] = key

  def plain_incr():
    plain_state.global_step += 1

  def annotation():
    with jax.profiler.StepTraceAnnotation("train", step_num=12345):
      pass

  counter = {"step": 10**6 + 1}  # Consecutive steps, far from any hit.

  def action_call(action):
    def call():
      counter["step"] += 1
      action(time.time(), counter["step"], {})
    return call

  steps_action = periodic.PeriodicAction(lambda s, x: None, "steps", 10**9,
                                         run_async=False)
  secs_action = periodic.PeriodicAction(lambda s, x: None, "secs", 1e9,
                                        run_async=False)
  end_action = periodic.PeriodicAction(lambda s, x: None, "secs", 1e9,
                                       run_async=True,
                                       end_step_to_action=10**12)
  stop_action = preemption.StopOnSignal(threading.Event())
  guard_action = nonfinite.NonFiniteGuard()
  progress_action = progress.ProgressLogger(
      training_steps=10**12, interval_type="secs", interval=1e9,
      run_async=True, fn_wrapper=guard_action.checked)
  progress_action(time.time(), 1, {})  # Its first call records the step.
  scalars = {"loss": key}

  rows = [
      ("state.global_step += 1 (ConfigDict attribute)", cfg_incr),
      ("state['global_step'] += 1 (ConfigDict item)", cfg_item_incr),
      ("state['train_step_rng'] = key (ConfigDict item)", cfg_item_rng),
      ("state['global_step'] read (ConfigDict item)",
       lambda: cfg_state["global_step"]),
      ("state.global_step += 1 (SimpleNamespace)", plain_incr),
      ("jax.profiler.StepTraceAnnotation enter+exit", annotation),
      ("time.time()", time.time),
      ("should_run_step(int, ConfigDict)",
       lambda: exp.should_run_step(5, config)),
      ("isinstance(scalars, Mapping)",
       lambda: isinstance(scalars, collections.abc.Mapping)),
      ("PeriodicAction, steps, not firing", action_call(steps_action)),
      ("PeriodicAction, secs (checkpoint), not firing",
       action_call(secs_action)),
      ("PeriodicAction, secs + end step (writer), not firing",
       action_call(end_action)),
      ("ProgressLogger, secs (progress line), not firing",
       action_call(progress_action)),
      ("NonFiniteGuard (keeps a reference)", action_call(guard_action)),
      ("preemption.StopOnSignal", lambda: stop_action(0.0, 1, {})),
  ]
  costs = {label: _host_us(fn) for label, fn in rows}
  lines = [f"  {label:58s} {cost:8.3f} us" for label, cost in costs.items()]
  # train()'s five default actions, none firing, with the default (secs)
  # intervals; and the loop's own bookkeeping around the step call.
  actions = (costs["NonFiniteGuard (keeps a reference)"] +
             costs["ProgressLogger, secs (progress line), not firing"] +
             costs["PeriodicAction, secs (checkpoint), not firing"] +
             costs["PeriodicAction, secs + end step (writer), not firing"] +
             costs["preemption.StopOnSignal"])
  bookkeeping = (2 * costs["state['global_step'] read (ConfigDict item)"] +
                 costs["state['global_step'] += 1 (ConfigDict item)"] +
                 costs["state['train_step_rng'] = key (ConfigDict item)"] +
                 costs["jax.profiler.StepTraceAnnotation enter+exit"] +
                 costs["time.time()"] +
                 costs["should_run_step(int, ConfigDict)"] +
                 costs["isinstance(scalars, Mapping)"])
  for label, cost in (
      ("=> train()'s five actions, none firing (sum)", actions),
      ("=> loop bookkeeping: state items, annotation, ... (sum)",
       bookkeeping)):
    lines.append(f"  {label:58s} {cost:8.3f} us")
  return lines


def _breakdown_profile(args) -> List[str]:
  """cProfile of `train()`'s loop: the top functions by own time per step."""
  clock = _Clock()
  factory = _factory("pmap", "noop", args, clock=clock)
  clock.arm(0, 1, 0)
  _run_train(factory, "pmap", 3, args.log_every)
  # Thread CPU time, not wall: waiting for devices or for a core is not cost.
  profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
  steps = _DEFAULT_WINDOW["noop"] * 4
  clock.arm(args.warmup, steps, 1, profiler=profiler)
  _run_train(factory, "pmap", clock.total_steps(), args.log_every)
  stats = pstats.Stats(profiler, stream=io.StringIO())
  lines = [f" cProfile (thread CPU time) of train()'s timed window ({steps} "
           "steps, noop, pmap style), top own time per step; profiling "
           "inflates small calls, and a C++ call (a jitted function) counts "
           "in its Python caller's own time:"]
  entries = []
  raw = getattr(stats, "stats")  # {(file, line, name): (cc, nc, tt, ...)}
  for (filename, line, name), stat in raw.items():
    calls, tottime = stat[1], stat[2]
    entries.append((tottime, calls, f"{os.path.basename(filename)}:{line}"
                    f"({name})"))
  entries.sort(reverse=True)
  for tottime, calls, where in entries[:args.profile_top]:
    lines.append(f"  {tottime / steps * 1e6:8.2f} us/step "
                 f"{calls / steps:6.2f} calls/step  {where}")
  return lines


def _print_breakdown(args) -> None:
  n = jax.local_device_count()
  print(f"\n=== breakdown, {n} device(s) ===")
  print(f" Key derivation, us per step (median of {args.breakdown_repeats} "
        f"interleaved loops of {args.breakdown_calls} steps, then a block):"
        f"{'wall':>9} {'cpu':>8}")
  for line in _breakdown_device_calls(args):
    print(line)
  print(" Host-side pieces of one loop iteration (timeit, best of 5):")
  for line in _breakdown_host(args):
    print(line)
  for line in _breakdown_profile(args):
    print(line)


# ---------------------------------------------------------------------------
# The per-step sync check: what the loop's thread fetches from the devices.
# ---------------------------------------------------------------------------

# Timed windows of the clock in each sync-check run: its waits happen under
# the transfer guard too.
_SYNC_WINDOWS = 3
_SYNC_WINDOW = 50
# (case, log interval in steps or None for longer than the run, log_async).
_SYNC_CASES = (
    ("quiet", None, True),
    ("async", 1, True),
    ("control", 1, False),
)


class _SyncCounter:
  """Counts fetches of jax.Arrays to the host, and waits on them, by thread.

  While entered, it wraps `ArrayImpl._value`, through which every copy of an
  array to numpy goes (`np.asarray`, `jax.device_get`, `float`, `.tolist()`,
  printing), `ArrayImpl.block_until_ready`, and the batched wait behind
  `jax.block_until_ready` with several arrays. A fetch counts when the array
  has no host copy yet. Unlike the transfer guard, it works on every backend
  and in every thread. These are JAX internals: where they are missing,
  `available` stays False and nothing is counted.

  Counts are keyed by (place, kind). Places: "loop" is the thread that
  entered the counter while `in_loop` is set (inside `train_loop`), "train"
  that thread otherwise (train()'s setup, final checks and save), "other"
  any other thread (asynchronous actions). Kinds: "fetch", "wait".
  """

  def __init__(self):
    self.counts = collections.Counter()
    self.in_loop = False
    self.available = False
    self._thread = None
    self._lock = threading.Lock()
    self._restore = []

  def record(self, kind: str) -> None:
    if threading.get_ident() != self._thread:
      place = "other"
    else:
      place = "loop" if self.in_loop else "train"
    with self._lock:
      self.counts[(place, kind)] += 1

  def __enter__(self) -> "_SyncCounter":
    self._thread = threading.get_ident()
    try:
      # pylint: disable=g-import-not-at-top
      from jax._src import api as jax_api
      from jax._src import array as jax_array
      # pylint: enable=g-import-not-at-top
      impl = jax_array.ArrayImpl
      value = impl.__dict__["_value"]
      block = impl.__dict__["block_until_ready"]
      batched = jax_api.xc.batched_block_until_ready
    except (ImportError, KeyError, AttributeError):
      return self

    def counted_value(array):
      if getattr(array, "_npy_value", None) is None:
        self.record("fetch")
      return value.fget(array)

    def counted_block(array):
      self.record("wait")
      return block(array)

    def counted_batched(arrays):
      self.record("wait")
      return batched(arrays)

    self._restore = [(impl, "_value", value),
                     (impl, "block_until_ready", block),
                     (jax_api.xc, "batched_block_until_ready", batched)]
    impl._value = property(counted_value)  # pylint: disable=protected-access
    impl.block_until_ready = counted_block
    jax_api.xc.batched_block_until_ready = counted_batched
    self.available = True
    return self

  def __exit__(self, *exc_info) -> None:
    for owner, name, original in self._restore:
      setattr(owner, name, original)
    self._restore = []


class _GuardedExperiment(BenchExperiment):
  """The experiment, with `train_loop` under the device-to-host transfer guard.

  The guard ("disallow_explicit": no fetch at all, implicit or explicit)
  applies to the thread that runs the loop; the counter marks that span.
  """

  def __init__(self, mode: str, init_rng: Optional[jax.Array] = None, *,
               counter: _SyncCounter, **kwargs):
    super().__init__(mode, init_rng, **kwargs)
    self.counter = counter

  def train_loop(self, config, state, periodic_actions, writer=None):
    self.counter.in_loop = True
    try:
      with jax.transfer_guard_device_to_host("disallow_explicit"):
        return super().train_loop(config, state, periodic_actions, writer)
    finally:
      self.counter.in_loop = False


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def _transfer_guard_probe() -> Dict[str, Any]:
  """What the transfer guard, set in this thread, stops here and elsewhere.

  Under `jax.transfer_guard_device_to_host("disallow_explicit")` it fetches
  a fresh array in this thread and another in a new thread; likewise a
  `jax.device_put` of a numpy array under the host-to-device guard. Each
  result is "raised" or "allowed".
  """

  def attempt(fn: Callable[[], Any]) -> str:
    try:
      fn()
    except Exception:  # pylint: disable=broad-except
      return "raised"
    return "allowed"

  def in_new_thread(fn: Callable[[], Any]) -> str:
    result = []
    thread = threading.Thread(target=lambda: result.append(attempt(fn)))
    thread.start()
    thread.join()
    return result[0]

  make = jax.jit(lambda i: jnp.arange(3.0) + i)
  fresh = [make(i) for i in range(2)]  # Computed: no host copy yet.
  jax.block_until_ready(fresh)
  host = np.ones(3, np.float32)
  probe = {"metric": "probe", "devices": jax.local_device_count(),
           "backend": jax.default_backend(), "jax": jax.__version__}
  with jax.transfer_guard_device_to_host("disallow_explicit"):
    probe["d2h_here"] = attempt(lambda: np.asarray(fresh[0]))
    probe["d2h_thread"] = in_new_thread(lambda: np.asarray(fresh[1]))
  with jax.transfer_guard_host_to_device("disallow_explicit"):
    probe["h2d_here"] = attempt(lambda: jax.device_put(host))
    probe["h2d_thread"] = in_new_thread(lambda: jax.device_put(host))
  return probe


def _sync_case(style: str, args, case: str, log_every: Optional[int],
               log_async: bool, guard_sees_d2h: bool) -> Dict[str, Any]:
  """One counted train() run; returns its row."""
  clock = _Clock()
  counter = _SyncCounter()
  factory = functools.partial(_GuardedExperiment, style=style,
                              workload="noop", clock=clock, counter=counter)
  clock.arm(args.warmup, _SYNC_WINDOW, _SYNC_WINDOWS)
  total = clock.total_steps()
  error = None
  gc.collect()
  with counter:
    try:
      _run_train(factory, style, total, log_every or total + 1,
                 log_async=log_async)
    except Exception as e:  # pylint: disable=broad-except
      error = _first_line(e)
  counts = counter.counts
  return {
      "metric": "sync", "devices": jax.local_device_count(), "style": style,
      "case": case, "steps": clock.calls, "counted": counter.available,
      "loop_fetch": counts[("loop", "fetch")],
      "loop_wait": counts[("loop", "wait")],
      "clock_wait": len(clock.stamps),
      "other_fetch": counts[("other", "fetch")],
      "train_fetch": counts[("train", "fetch")],
      "error": error, "guard_sees_d2h": guard_sees_d2h,
  }


def _sync_rows(args) -> List[Dict[str, Any]]:
  """The probe's row, then one row per style and sync case."""
  probe = _transfer_guard_probe()
  rows = [probe]
  for style in args.styles.split(","):
    # Compile the step and the loop's device calls outside the count.
    clock = _Clock()
    _run_train(functools.partial(BenchExperiment, style=style,
                                 workload="noop", clock=clock),
               style, 3, None)
    for case, log_every, log_async in _SYNC_CASES:
      try:
        rows.append(_sync_case(style, args, case, log_every, log_async,
                               probe["d2h_here"] == "raised"))
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        print(f"  sync check {style}/{case} failed: {_first_line(e)}")
  return rows


def _sync_verdict(row: Dict[str, Any]) -> str:
  """OK when the case shows what it is there to show."""
  if not row["counted"]:
    return "not counted"
  if row["case"] == "quiet":
    ok = (not row["error"] and row["loop_fetch"] == 0 and
          row["loop_wait"] == row["clock_wait"])
  elif row["case"] == "async":
    ok = not row["error"] and row["loop_fetch"] == 0 and row["other_fetch"]
  else:  # The control must be seen, by the counter or the guard.
    ok = row["loop_fetch"] > 0 or bool(row["error"])
  return "OK" if ok else "CHECK"


def _print_sync(rows: List[Dict[str, Any]]) -> None:
  """The probe's findings and the sync check's results, if any."""
  probes = [r for r in rows if r["metric"] == "probe"]
  syncs = [r for r in rows if r["metric"] == "sync"]
  if not probes and not syncs:
    return
  print("\nPer-step syncs: train() with the non-finite guard and the progress "
        "line on, its train_loop under\njax.transfer_guard_device_to_host("
        "\"disallow_explicit\"); fetches of jax.Arrays to the host and waits "
        "on them, counted by thread.")
  for p in probes:
    print(f"  transfer guard probe ({p['devices']} {p['backend']} device(s), "
          f"jax {p['jax']}), guard set in the main thread: device-to-host "
          f"fetch there {p['d2h_here']}, in a new thread {p['d2h_thread']}; "
          f"host-to-device put there {p['h2d_here']}, in a new thread "
          f"{p['h2d_thread']}.")
    notes = []
    if "raised" in (p["d2h_here"], p["h2d_here"]):
      local = all(p[k] == "allowed" for k in ("d2h_thread", "h2d_thread"))
      notes.append("the guard is thread-local: a context set in one thread "
                   "does not apply in others" if local else
                   "the guard also applied in the new thread")
    if p["d2h_here"] == "allowed":
      notes.append(f"on {p['backend']} it does not see device-to-host copies "
                   "(numpy gets a zero-copy view; jax-ml/jax#16602), so here "
                   "only the counts below show fetches")
    if notes:
      print("    => " + "; ".join(notes) + ".")
  for r in syncs:
    where = f"{r['devices']} device(s), {r['style']} style"
    raised = (f"transfer guard raised: {r['error']}" if r["error"] else
              "transfer guard did not raise")
    if r["case"] == "quiet":
      print(f"  {where}:\n    per-step device-to-host transfers in the loop "
            f"thread (guard + progress on, {r['steps']} steps, no action "
            f"firing but the writer's async one at the last step): "
            f"{r['loop_fetch']}; waits there {r['loop_wait']} (the benchmark "
            f"clock's: {r['clock_wait']}); {raised}; other threads fetched "
            f"{r['other_fetch']}, train() outside the loop {r['train_fetch']}."
            f" {_sync_verdict(r)}")
    elif r["case"] == "async":
      print(f"    every step logged, log_async=True ({r['steps']} steps): "
            f"loop thread fetched {r['loop_fetch']}, the actions' worker "
            f"threads {r['other_fetch']}; {raised}: the guard is thread-local,"
            f" so it does not apply in the worker threads, where the fetches "
            f"run. {_sync_verdict(r)}")
    else:
      if r["error"]:
        raised += " (jaxline logged it, with a traceback, above)"
      elif not r["guard_sees_d2h"]:
        raised += " (it cannot see device-to-host copies on this backend)"
      seen = ("the check sees the loop thread's fetches"
              if _sync_verdict(r) == "OK" else "the fetches went unseen")
      print(f"    control, every step logged, log_async=False ({r['steps']} "
            f"steps): loop thread fetched {r['loop_fetch']}; {raised}. "
            f"{_sync_verdict(r)}: {seen}.")


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,8",
                      help="Comma-separated forced CPU device counts, or "
                      "'native' for the devices JAX finds.")
  parser.add_argument("--styles", default="pmap,sharded",
                      help="Experiment styles to run: pmap, sharded.")
  parser.add_argument("--workload", default="mlp,noop",
                      help="Workloads to time: mlp, noop (comma-separated).")
  parser.add_argument("--variants", default=",".join(_DEFAULT_VARIANTS),
                      help="Variants to time (floor and train always run), "
                      "from: " + ", ".join(VARIANTS) + ".")
  parser.add_argument("--mlp_in", type=int, default=MlpShape.inputs,
                      help="MLP input features.")
  parser.add_argument("--mlp_width", type=int, default=MlpShape.width,
                      help="MLP hidden width. The defaults (128, 512, 256) "
                      "take about 0.9 ms a step on 1 CPU device; "
                      "--mlp_in 16 --mlp_width 32 --mlp_batch 8 is the "
                      "earlier ~0.1 ms MLP.")
  parser.add_argument("--mlp_batch", type=int, default=MlpShape.batch,
                      help="MLP global batch, split over the devices "
                      "(rounded up to a multiple of their count).")
  parser.add_argument("--window", type=int, default=None,
                      help="Steps per timed window (default: "
                      + ", ".join(f"{k} {v}" for k, v in
                                  _DEFAULT_WINDOW.items()) + ").")
  parser.add_argument("--windows", type=int, default=None,
                      help="Timed windows per run (default: 10 on 1 device, "
                      "5 on more).")
  parser.add_argument("--warmup", type=int, default=20,
                      help="Untimed steps at the start of every run.")
  parser.add_argument("--repeats", type=int, default=3,
                      help="Runs of every variant, interleaved.")
  parser.add_argument("--log_every", type=int, default=None,
                      help="Log every this many steps (interval_type steps, "
                      "checkpoints never). Default: the base config's "
                      "intervals in seconds, so nothing fires.")
  parser.add_argument("--collectives", action="store_true",
                      help="pmean the gradients (pmap style). For real "
                      "accelerators: on forced CPU devices XLA:CPU's "
                      "in-process all-reduce can hang within seconds (it did "
                      "on 2 devices with JAX 0.10.2).")
  parser.add_argument("--skip_checks", action="store_true",
                      help="Skip the key and final-state check.")
  parser.add_argument("--check_steps", type=int, default=None,
                      help="Steps of the key check (default: 3 of the loop's "
                      "key chunks and 7).")
  parser.add_argument("--breakdown", action="store_true",
                      help="Also time the loop's pieces.")
  parser.add_argument("--breakdown_only", action="store_true",
                      help="Only the breakdown (implies --breakdown).")
  parser.add_argument("--skip_sync_check", action="store_true",
                      help="Skip the per-step sync check (on by default).")
  parser.add_argument("--sync_check_only", action="store_true",
                      help="Only the per-step sync check.")
  parser.add_argument("--breakdown_calls", type=int, default=400,
                      help="Steps per timed loop of a device-call row.")
  parser.add_argument("--breakdown_repeats", type=int, default=5)
  parser.add_argument("--profile_top", type=int, default=15)
  parser.add_argument("--json_out", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  workloads = [w for w in args.workload.split(",") if w]
  bad = set(workloads) - set(WORKLOADS)
  if bad or not workloads:
    parser.error(f"--workload: choose from {', '.join(WORKLOADS)}")
  args.workloads = workloads
  try:
    _selected_variants(args)
  except ValueError as e:
    parser.error(str(e))
  return args


def _run_here(args) -> List[Dict[str, Any]]:
  """Measures with this process's devices; returns the summary rows."""
  absl_flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  n = jax.local_device_count()
  if args.windows is None:
    args.windows = 10 if n == 1 else 5
  logs = (f"every {args.log_every} steps" if args.log_every else
          "at the base config's intervals (seconds)")
  windows = (f"{args.window} steps" if args.window else
             ", ".join(f"{_DEFAULT_WINDOW[w]} steps ({w})"
                       for w in args.workloads))
  print(f"jax {jax.__version__}, {n} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} CPU cores, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"{args.repeats} interleaved runs per variant, each {args.warmup} "
        f"warm-up steps then {args.windows} windows of {windows}; MLP "
        f"{args.mlp_in}-{args.mlp_width}-1, global batch {args.mlp_batch}; "
        f"logging {logs}; loop key chunk {_loop_chunk()}.", flush=True)
  rows = []
  timed = not (args.breakdown_only or args.sync_check_only)
  styles = args.styles.split(",")
  if timed and not args.skip_checks:
    for style in styles:
      for workload in args.workloads:
        try:
          rows.append(_check_one(style, workload, args))
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()
          print(f"  check {style}/{workload} failed: {_first_line(e)}")
    _print_checks(rows)
  for style in styles if timed else []:
    for workload in args.workloads:
      try:
        times = _measure(style, workload, args)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        print(f"  {style}/{workload} failed: {type(e).__name__}: {e}")
        continue
      _print_details(n, style, workload, times)
      rows.extend(_summary_rows(n, style, workload, times))
  if any(r["metric"] in METRICS for r in rows):
    _print_table(rows)
    _print_issue_table(rows)
    print(f"(load average at the end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
  if args.sync_check_only or not (args.skip_sync_check or
                                  args.breakdown_only):
    sync = _sync_rows(args)
    _print_sync(sync)
    rows.extend(sync)
  if (args.breakdown or args.breakdown_only) and not args.sync_check_only:
    _print_breakdown(args)
  sys.stdout.flush()
  return rows


def _run_children(args, argv) -> None:
  """One child process per device count, then a combined summary."""
  rest = []
  skip = False
  for arg in argv:
    if skip:
      skip = False
      continue
    if arg == "--devices":
      skip = True
      continue
    if not arg.startswith("--devices="):
      rest.append(arg)
  rows = []
  for count in args.devices.split(","):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
      cmd = [sys.executable, os.path.abspath(__file__), "--devices", count,
             "--json_out", out.name] + rest
      print(f"\n##### {count} device(s): {' '.join(cmd[1:4])} ...",
            flush=True)
      proc = subprocess.run(cmd, check=False)
      if proc.returncode != 0:
        print(f"  child for {count} device(s) exited {proc.returncode}")
        continue
      with open(out.name) as f:
        rows.extend(json.load(f))
  if rows:
    print("\n##### Summary (all device counts)")
    _print_checks(rows)
    timing = [r for r in rows if r["metric"] in METRICS]
    if timing:
      _print_table(timing)
      _print_issue_table(timing)
    _print_sync(rows)


def main(argv) -> int:
  args = _parse_args(argv)
  if "," in args.devices:
    _run_children(args, argv)
    return 0
  rows = _run_here(args)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(rows, f)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
