"""How much per-step time the jaxline training loop adds over a bare loop.

The workload is a tiny MLP SGD step on a fixed batch, so the step itself is
cheap and the harness's per-step cost shows. The same compiled step function
runs, in one process and interleaved repeats, through:

  floor     a bare loop with constant step/key inputs: the step call alone.
  fused     a bare loop whose (different, single) compiled step also counts
            the step and splits the keys.
  bare      the baseline: a bare loop that counts the per-device step and
            splits the keys with one small jitted call, then calls the step.
  loop      `experiment.train_loop` called directly, no periodic actions.
  train     `jaxline.train.train(...)` as a user runs it: InMemoryCheckpointer,
            step-interval logging, a huge checkpoint interval, a no-op writer.
            The non-finite guard (`terminate_on_nan`, default True) and the
            progress line are on, as by default.
  noguard   `train` with `config.terminate_on_nan = False`: no guard. The
            guard's cost is train - noguard.
  orig      `train` with jaxline 0.0.8's per-step loop work re-created: the
            same-run reference (pmap style).
  proposed  with --proposed: `train` with a prototype of the proposed loop;
  chunked   the same, deriving 16 steps' keys per device call.

The experiment's `step` reads the clocks (wall, and the loop thread's CPU
time) every `--window` steps after a warm-up, so every window holds the same
loop iterations whatever drives them. "added" is jaxline's median us/step
minus bare's. `--breakdown` times the loop's pieces.

Then, unless `--skip_sync_check`, the per-step sync check runs `train()` (guard
and progress line on) with `train_loop` under
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
  python benchmarks/loop_overhead.py --devices 8     # one device count
  python benchmarks/loop_overhead.py --proposed --breakdown
  python benchmarks/loop_overhead.py --devices native --sync_check_only

`--devices` sets `--xla_force_host_platform_device_count` (and
JAX_PLATFORMS=cpu) before JAX is imported; with several counts each runs in
a child process; `native` leaves the platform to JAX (a GPU, say). It prints
results, exits 0, and never asserts on timings.
"""

import os
import sys


def _devices_from_argv(argv):
  """The `--devices` value, read before argparse so JAX sees the env."""
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--devices="):
      return arg.split("=", 1)[1]
  return "1,8"


def _force_device_count(count):
  """Sets the host-platform device count in XLA_FLAGS (replacing any)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={count}")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ["JAX_PLATFORMS"] = "cpu"


_REQUESTED_DEVICES = _devices_from_argv(sys.argv)
if "," not in _REQUESTED_DEVICES and _REQUESTED_DEVICES != "native":
  _force_device_count(int(_REQUESTED_DEVICES))
# Run from a checkout without installing: the repository root goes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import cProfile
import collections
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
from typing import Any, Callable, Dict, List, Mapping, Optional

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

# Per-step overhead the original jaxline 0.0.8, shimmed onto JAX 0.10.2, adds
# over a bare loop (from the issue), by local device count, in microseconds.
REFERENCE_ADDED_US = {1: 25.0, 8: 210.0}

AXIS = "i"
_IN, _HIDDEN, _OUT = 16, 32, 1
_BATCH_PER_DEVICE = 8


# ---------------------------------------------------------------------------
# The workload.
# ---------------------------------------------------------------------------


def _init_params(key: jax.Array) -> Dict[str, np.ndarray]:
  k1, k2 = jax.random.split(key)
  return {
      "w1": np.asarray(jax.random.normal(k1, (_IN, _HIDDEN))) * 0.1,
      "b1": np.zeros((_HIDDEN,), np.float32),
      "w2": np.asarray(jax.random.normal(k2, (_HIDDEN, _OUT))) * 0.1,
      "b2": np.zeros((_OUT,), np.float32),
  }


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  pred = h @ params["w2"] + params["b2"]
  return jnp.mean((pred - y) ** 2)


def _sgd(params, batch, global_step, rng, collectives: bool):
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


def _split_advance(step, state_rng):
  """Counts the step and splits the key: `(step + 1, key, next_state)`."""
  keys = jax.random.split(state_rng)
  return step + 1, keys[0], keys[1]


def _fused_sgd(params, batch, step, state_rng, collectives: bool,
               per_device: bool):
  """Advance and SGD in one compiled call, as a hand-written loop would."""
  step, key, state_rng = _split_advance(step, state_rng)
  if per_device:
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
  params, scalars = _sgd(params, batch, step, key, collectives)
  return params, scalars, step, state_rng


@functools.lru_cache(maxsize=None)
def _compiled(style: str, collectives: bool):
  """(update, fused, advance) for a style, built once per process."""
  if style == "pmap":
    update = jax.pmap(functools.partial(_sgd, collectives=collectives),
                      axis_name=AXIS)
    fused = jax.pmap(functools.partial(_fused_sgd, collectives=collectives,
                                       per_device=True), axis_name=AXIS)
    advance = jax.jit(jax.vmap(_split_advance),
                      out_shardings=devices_lib.per_device_sharding())
  else:
    update = jax.jit(functools.partial(_sgd, collectives=False))
    fused = jax.jit(functools.partial(_fused_sgd, collectives=False,
                                      per_device=False))
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


class MlpExperiment(experiment_lib.AbstractExperiment):
  """A tiny MLP regression, in the pmap or the sharded style."""

  CHECKPOINT_ATTRS = {"_params": "params"}

  def __init__(self, mode: str, init_rng: Optional[jax.Array] = None, *,
               style: str = "pmap", collectives: bool = False,
               clock: Optional[_Clock] = None, loop: str = "default"):
    super().__init__(mode, init_rng)
    self.style = style
    self.loop = loop
    self.clock = clock or _Clock()
    self._update, self._fused, _ = _compiled(style, collectives)
    key = jax.random.PRNGKey(0) if init_rng is None else init_rng
    params = _init_params(key)
    n = jax.local_device_count() if style == "pmap" else jax.device_count()
    rows = n * _BATCH_PER_DEVICE
    x = np.linspace(-1.0, 1.0, rows * _IN, dtype=np.float32)
    x = x.reshape(rows, _IN)
    y = np.sin(x.sum(axis=1, keepdims=True))
    if style == "pmap":
      self._params = utils.bcast_local_devices(params)
      shape = (n, _BATCH_PER_DEVICE)
      batch = (x.reshape(shape + (_IN,)), y.reshape(shape + (_OUT,)))
      self._batch = jax.device_put(batch, devices_lib.per_device_sharding())
    else:
      # Replicated batch: no collectives in the step (see the module doc).
      self._params = sharding.replicate(params)
      self._batch = sharding.replicate((x, y))

  def sgd(self, global_step, rng):
    """One update of the parameters; returns (params, scalars)."""
    self._params, scalars = self._update(self._params, self._batch,
                                         global_step, rng)
    return self._params, scalars

  def step(self, *, global_step, rng, writer):
    del writer
    params, scalars = self.sgd(global_step, rng)
    self.clock.after(params)
    return scalars

  def train_loop(self, config, state, periodic_actions, writer=None):
    if self.loop == "default":
      return super().train_loop(config, state, periodic_actions, writer)
    if self.loop == "orig":
      return _original_style_train_loop(self, config, state, periodic_actions,
                                        writer)
    chunk = 1 if self.loop == "proposed" else _CHUNK
    return _proposed_train_loop(self, config, state, periodic_actions, writer,
                                chunk)

  def fused_step(self, step, state_rng):
    """The `fused` variant's step: advance and SGD in one call."""
    self._params, scalars, step, state_rng = self._fused(
        self._params, self._batch, step, state_rng)
    self.clock.after(self._params)
    return scalars, step, state_rng

  def evaluate(self, *, global_step, rng, writer):
    del global_step, rng, writer
    return {}


# ---------------------------------------------------------------------------
# A prototype of the proposed loop (not jaxline's): what the numbers for
# "proposed" and "chunked" measure. Same keys, steps and action calls.
# ---------------------------------------------------------------------------

_CHUNK = 16


@functools.lru_cache(maxsize=None)
def _cached_step_key_fn(mode: str, chunk: int, local_devices: tuple[Any, ...]):
  """The advance function, built (and compiled) once per process."""
  del local_devices  # Part of the cache key only.
  if chunk == 1:
    return rng_lib.make_step_key_fn(mode)
  return _chunked_step_key_fn(mode, chunk)


def _proposed_train_loop(exp, config, state, periodic_actions, writer,
                         chunk: int) -> None:
  """`AbstractExperiment.train_loop` with the proposed changes.

  State fields are read once per iteration and written by item, which for a
  ConfigDict is `__setattr__` without its `dir()` check. With `chunk` > 1 one
  device call yields the next `chunk` steps' (step, key, state key); a
  `state.train_step_rng` or `global_step` changed from outside (an action, a
  restore) is noticed and the chunk recomputed from it.
  """
  mode = config.random_mode_train
  host_ids = None
  if utils.DistributedRNGMode(mode).unique_host:
    host_ids = utils.bcast_local_devices(np.int32(jax.process_index()))
  advance = _cached_step_key_fn(mode, chunk, tuple(jax.local_devices()))
  step = state["global_step"]
  step_devices = utils.bcast_local_devices(np.asarray(step - 1, np.int32))
  pending = []
  expected_step, expected_rng = None, None
  with utils.log_activity("training loop"):
    while exp.should_run_step(step, config):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state_rng = state["train_step_rng"]
        if chunk == 1:
          step_devices, key, state_rng = advance(step_devices, state_rng,
                                                 host_ids)
        else:
          if (not pending or expected_step != step or
              expected_rng is not state_rng):
            if expected_step is not None and expected_step != step:
              step_devices = utils.bcast_local_devices(
                  np.asarray(step - 1, np.int32))
            pending = list(advance(step_devices, state_rng, host_ids))
            pending.reverse()
          step_devices, key, state_rng = pending.pop()
        state["train_step_rng"] = state_rng
        scalar_outputs = exp.step(global_step=step_devices, rng=key,
                                  writer=writer)
        if not isinstance(scalar_outputs, collections.abc.Mapping):
          raise TypeError("step must return a mapping")
        t = time.time()
        step += 1
        state["global_step"] = step
        expected_step, expected_rng = step, state_rng
      for action in periodic_actions:
        action(t, step, scalar_outputs)
      step = state["global_step"]


def _original_style_train_loop(exp, config, state, periodic_actions,
                               writer) -> None:
  """The per-step work of jaxline 0.0.8's loop, re-created on current JAX.

  0.0.8 ran one `jax.pmap` per step that counted the step and split and
  specialised the key, fed it the host ids as one single-device array
  (`jnp.broadcast_to(host_id, ...)`) every step, passed the host step as a
  numpy array on the first step, and wrote `state` by attribute. Keys differ
  from jaxline's (0.0.8 gave the first step the unsplit state key); the cost
  does not. Used as the same-run reference ("orig").
  """
  mode = config.random_mode_train

  def next_device_state(step, rng, host_id):
    step_rng, state_rng = tuple(jax.random.split(rng))
    step_rng = rng_lib.specialize_rng_host_device(step_rng, host_id, AXIS,
                                                  mode)
    return step + 1, (step_rng, state_rng)

  next_state = jax.pmap(next_device_state, axis_name=AXIS)
  n = jax.local_device_count()
  global_step_devices = np.broadcast_to(np.int32(state.global_step), [n])
  host_ids = None
  if utils.DistributedRNGMode(mode).unique_host:
    host_ids = jnp.broadcast_to(jax.process_index(), (n,))
  step_key = state.train_step_rng
  with utils.log_activity("training loop"):
    while state.global_step < config.training_steps:
      with jax.profiler.StepTraceAnnotation("train",
                                            step_num=state.global_step):
        scalar_outputs = exp.step(global_step=global_step_devices,
                                  rng=step_key, writer=writer)
        t = time.time()
        state.global_step += 1
        global_step_devices, (step_key, state.train_step_rng) = next_state(
            global_step_devices, state.train_step_rng, host_ids)
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


def _run_floor(exp: MlpExperiment, total: int) -> None:
  step, key = _initial_step_and_key(exp.style)
  for _ in range(total):
    exp.step(global_step=step, rng=key, writer=None)


def _run_bare(exp: MlpExperiment, total: int) -> None:
  _, _, advance = _compiled(exp.style, False)
  step, state_rng = _initial_step_and_key(exp.style)
  for _ in range(total):
    step, key, state_rng = advance(step, state_rng)
    exp.step(global_step=step, rng=key, writer=None)


def _run_fused(exp: MlpExperiment, total: int) -> None:
  step, state_rng = _initial_step_and_key(exp.style)
  for _ in range(total):
    _, step, state_rng = exp.fused_step(step, state_rng)


def _loop_config(style: str, total: int, log_every: int, **overrides):
  """The config a user would write for this run, then `overrides`."""
  config = base_config.get_base_config()
  config.training_steps = total
  config.interval_type = "steps"
  config.log_tensors_interval = log_every
  config.log_train_data_interval = log_every
  config.save_checkpoint_interval = 10**9
  if style != "pmap":
    config.experiment_style = style
  for key, value in overrides.items():
    config[key] = value
  return config


def _run_train_loop(exp: MlpExperiment, total: int, log_every: int) -> None:
  """`experiment.train_loop` directly, with no periodic actions."""
  config = _loop_config(exp.style, total, log_every)
  if exp.style != "pmap":  # What `train` does when it builds the experiment.
    setattr(exp, experiment_lib.STYLE_ATTR, exp.style)
  state = config_dict.ConfigDict()
  state.global_step = 0
  state.train_step_rng = exp.initialize_train_step_rng(jax.random.PRNGKey(1))
  exp.train_loop(config, state, (), None)


def _run_train(exp_factory: Callable[..., Any], style: str, total: int,
               log_every: int, **overrides) -> None:
  """`jaxline.train.train` as a user runs it, from a clean checkpoint dict.

  `overrides` are config keys set on top, e.g. `terminate_on_nan=False`.
  """
  config = _loop_config(style, total, log_every, **overrides)
  utils.GLOBAL_CHECKPOINT_DICT.clear()
  checkpointer = utils.InMemoryCheckpointer(config, "train")
  train_lib.train(exp_factory, config, checkpointer, writers.NullWriter())
  utils.GLOBAL_CHECKPOINT_DICT.clear()


VARIANTS = ("floor", "fused", "bare", "loop", "train", "noguard")
# train() with 0.0.8's loop re-created (pmap style only).
ORIG = ("orig",)
# train() with the prototype loop (--proposed; pmap style only).
PROPOSED = ("proposed", "chunked")
# Rows of the summary table, each against "bare".
_ROWS = ("loop", "train", "noguard") + ORIG + PROPOSED
METRICS = ("wall", "cpu")


def _measure_style(style: str, args) -> Dict[str, Dict[str, List[List[float]]]]:
  """metric -> variant -> per repeat, the us/step of each timed window.

  Variants run back to back within a repeat, in a rotating order.
  """
  clock = _Clock()
  factory = functools.partial(MlpExperiment, style=style,
                              collectives=args.collectives, clock=clock)
  exp = factory("train", init_rng=jax.random.PRNGKey(0))
  runners = {
      "floor": lambda n: _run_floor(exp, n),
      "fused": lambda n: _run_fused(exp, n),
      "bare": lambda n: _run_bare(exp, n),
      "loop": lambda n: _run_train_loop(exp, n, args.log_every),
      "train": lambda n: _run_train(factory, style, n, args.log_every),
      "noguard": lambda n: _run_train(factory, style, n, args.log_every,
                                      terminate_on_nan=False),
  }
  variants = VARIANTS
  if style == "pmap":
    variants += ORIG + (PROPOSED if args.proposed else ())
  for loop in variants[len(VARIANTS):]:
    runners[loop] = functools.partial(
        _run_train, functools.partial(factory, loop=loop), style,
        log_every=args.log_every)
  # One untimed pass compiles everything.
  for name in variants:
    clock.arm(0, 1, 0)
    runners[name](2)
  results = {m: collections.defaultdict(list) for m in METRICS}
  for r in range(args.repeats):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for name in order:
      gc.collect()
      clock.arm(args.warmup, args.window, args.windows)
      runners[name](clock.total_steps())
      for metric, values in clock.window_us().items():
        results[metric][name].append(values)
  return {m: dict(v) for m, v in results.items()}


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def _median(xs: List[float]) -> float:
  return statistics.median(xs)


def _all(repeats: List[List[float]]) -> List[float]:
  return [v for windows in repeats for v in windows]


def _summary_rows(n_devices: int, style: str,
                  times: Mapping[str, Mapping[str, List[List[float]]]]
                  ) -> List[Dict[str, Any]]:
  """One row per metric and jaxline variant, against the bare baseline.

  `*_us` is the median over all of a variant's windows, `*_min` its fastest
  window: interference from other processes only ever adds time, so on a
  busy machine the fastest window is the steadier estimate.
  """
  rows = []
  for metric in METRICS:
    t = {name: _all(reps) for name, reps in times[metric].items()}
    for name in (n for n in _ROWS if n in t):
      rows.append({
          "metric": metric, "devices": n_devices, "style": style,
          "variant": name,
          "bare_us": _median(t["bare"]), "jaxline_us": _median(t[name]),
          "bare_min": min(t["bare"]), "jaxline_min": min(t[name]),
      })
  return rows


def _print_details(n_devices: int, style: str,
                   times: Mapping[str, Mapping[str, List[List[float]]]]
                   ) -> None:
  for metric in METRICS:
    print(f"\n  {n_devices} device(s), {style} style, {metric} us/step: "
          "median and min of all windows | each run's median (min-max)")
    for name in VARIANTS + tuple(n for n in _ROWS
                                 if n in times[metric] and n not in VARIANTS):
      windows = _all(times[metric][name])
      reps = " ".join(f"{_median(w):6.1f} ({min(w):.0f}-{max(w):.0f})"
                      for w in times[metric][name])
      print(f"    {name:8s} {_median(windows):7.1f} {min(windows):7.1f} | "
            f"{reps}")


_METRIC_TITLES = {
    "wall": "Wall time per step (what the run takes)",
    "cpu": ("CPU time per step of the thread running the loop (the loop's "
            "own cost; other processes disturb it less)"),
}


def _verdict(added: float, reference: Optional[float]) -> str:
  if reference is None:
    return "-"
  return "yes" if added < reference else "NO"


def _print_table(rows: List[Dict[str, Any]]) -> None:
  """The summary: jaxline against the bare loop, per metric."""
  for metric in METRICS:
    print(f"\n{_METRIC_TITLES[metric]}:")
    header = (f"{'devices':>7} {'style':>7} {'variant':>8} | {'bare':>7} "
              f"{'jaxline':>7} {'added':>7} {'ratio':>5} | {'bare':>6} "
              f"{'jaxline':>7} | {'bare':>6} {'jaxline':>7} {'added':>6} | "
              f"{'< issue':>7} {'< orig':>6}")
    print(header)
    print(f"{'':>7} {'':>7} {'':>8} | {'median us/step':^30} | "
          f"{'steps/s':^14} | {'fastest window us/step':^22} | "
          f"{'added less than':^14}")
    print("-" * len(header))
    selected = [r for r in rows if r["metric"] == metric]
    orig = {(r["devices"], r["style"]): r["jaxline_us"] - r["bare_us"]
            for r in selected if r["variant"] == "orig"}
    for row in selected:
      added = row["jaxline_us"] - row["bare_us"]
      ref = REFERENCE_ADDED_US.get(row["devices"])
      same_run = orig.get((row["devices"], row["style"]))
      if row["variant"] == "orig":
        same_run = None
      print(f"{row['devices']:>7} {row['style']:>7} {row['variant']:>8} | "
            f"{row['bare_us']:7.1f} {row['jaxline_us']:7.1f} {added:7.1f} "
            f"{row['jaxline_us'] / row['bare_us']:5.2f} | "
            f"{1e6 / row['bare_us']:6.0f} {1e6 / row['jaxline_us']:7.0f} | "
            f"{row['bare_min']:6.1f} {row['jaxline_min']:7.1f} "
            f"{row['jaxline_min'] - row['bare_min']:6.1f} | "
            f"{_verdict(added, ref):>7} {_verdict(added, same_run):>6}")
  refs = ", ".join(f"{v:.0f} us on {k} device{'s' if k > 1 else ''}"
                   for k, v in REFERENCE_ADDED_US.items())
  print("added = jaxline - bare; ratio = jaxline / bare. loop = "
        "experiment.train_loop, no actions; train = jaxline.train.train with "
        "its default actions (non-finite guard and progress line on);\n"
        "noguard = train with terminate_on_nan=False; orig = train() with "
        "jaxline 0.0.8's per-step "
        "work re-created (pmap style); proposed/chunked = train() with the "
        "prototype loop (--proposed).\n< issue: median added below what 0.0.8 "
        f"on JAX 0.10.2 adds per the issue ({refs}); < orig: median added "
        "below orig's in this run.")
  _print_guard_cost(rows)


def _print_guard_cost(rows: List[Dict[str, Any]]) -> None:
  """The non-finite guard's cost: train (guard on) - noguard, per metric."""
  by_key = {(r["metric"], r["devices"], r["style"], r.get("variant")): r
            for r in rows}
  cases = sorted({(r["devices"], r["style"]) for r in rows
                  if r.get("variant") == "noguard"})
  if not cases:
    return
  print("\nNon-finite guard's cost per step, train (guard on) - noguard "
        "(guard off), us/step; both runs have the progress line:")
  header = (f"{'devices':>7} {'style':>7} | {'wall':>7} {'cpu':>7} | "
            f"{'wall':>7} {'cpu':>7}")
  print(header)
  print(f"{'':>7} {'':>7} | {'median':^15} | {'fastest window':^15}")
  print("-" * len(header))
  for devices, style in cases:
    median, fastest = [], []
    for metric in METRICS:
      on = by_key.get((metric, devices, style, "train"))
      off = by_key.get((metric, devices, style, "noguard"))
      if on is None or off is None:
        median.append(float("nan"))
        fastest.append(float("nan"))
        continue
      median.append(on["jaxline_us"] - off["jaxline_us"])
      fastest.append(on["jaxline_min"] - off["jaxline_min"])
    print(f"{devices:>7} {style:>7} | {median[0]:7.1f} {median[1]:7.1f} | "
          f"{fastest[0]:7.1f} {fastest[1]:7.1f}")
  print("Within noise when it is small next to how far the bare baseline's "
        "and train's medians move between runs (the per-run columns above).")


# ---------------------------------------------------------------------------
# --breakdown: where the per-step time goes.
# ---------------------------------------------------------------------------


def _device_us(rows: List[tuple[str, Callable[[], Any], int]], calls: int,
               repeats: int) -> Dict[str, tuple[float, float]]:
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


def _pmap_step_key_fn(mode: str):
  """The same derivation as `rng.make_step_key_fn`, through `jax.pmap`."""

  def advance(step, state_rng, host_id):
    key, new_state_rng = jax.random.split(state_rng)
    key = rng_lib.specialize_rng_host_device(key, host_id, AXIS, mode)
    return step + 1, key, new_state_rng

  return jax.pmap(advance, axis_name=AXIS)


def _chunked_step_key_fn(mode: str, chunk: int):
  """`chunk` steps of (step, key, state) in one jitted call, same keys."""

  def advance(step, state_rng, host_id):
    key, new_state_rng = jax.random.split(state_rng)
    key = rng_lib.specialize_rng_host_device(key, host_id,
                                             devices_lib.LOCAL_AXIS, mode)
    return step + 1, key, new_state_rng

  def many(step, state_rng, host_id):
    outs = []
    for _ in range(chunk):
      step, key, state_rng = advance(step, state_rng, host_id)
      outs.append((step, key, state_rng))
    return outs

  mapped = jax.vmap(many, axis_name=devices_lib.LOCAL_AXIS)
  return jax.jit(mapped, out_shardings=devices_lib.per_device_sharding())


def _same(xs: Any, ys: Any) -> bool:
  xs, ys = jax.tree.leaves(xs), jax.tree.leaves(ys)
  return len(xs) == len(ys) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(xs, ys))


def _breakdown_device_calls(args) -> List[str]:
  """Per-step cost of the loop's device call in several forms."""
  mode = "unique_host_unique_device"
  n = jax.local_device_count()
  step0 = utils.bcast_local_devices(np.asarray(0, np.int32))
  state0 = utils.bcast_local_devices(jax.random.PRNGKey(7))
  host_ids = utils.bcast_local_devices(np.int32(jax.process_index()))
  # 0.0.8's host ids: one array on the default device, resharded each call.
  host_ids_orig = jnp.broadcast_to(jax.process_index(), (n,))
  jaxline_adv = rng_lib.make_step_key_fn(mode)
  jaxline_adv_2in = rng_lib.make_step_key_fn("same_host_unique_device")
  pmap_adv = _pmap_step_key_fn(mode)
  plain_jit = jax.jit(jax.vmap(
      lambda s, k, h: (s + 1,) + tuple(jax.random.split(k)),
      axis_name=AXIS))
  exp = MlpExperiment("train", style="pmap")

  # The keys each form gives for the first _CHUNK steps.
  reference = []
  s, k = step0, state0
  for _ in range(_CHUNK):
    s, key, k = jaxline_adv(s, k, host_ids)
    reference.append((s, key, k))
  s, k = step0, state0
  pmap_keys = []
  for _ in range(_CHUNK):
    s, key, k = pmap_adv(s, k, host_ids)
    pmap_keys.append((s, key, k))
  chunked = _chunked_step_key_fn(mode, _CHUNK)
  lines = [f"  same (step, key, state) for {_CHUNK} steps as "
           f"rng.make_step_key_fn: jax.pmap {_same(pmap_keys, reference)}, "
           f"chunked {_same(chunked(step0, state0, host_ids), reference)}"]

  def chained(adv, ids=host_ids, with_update=False):
    carry = {"s": step0, "k": state0}

    def call():
      s, key, carry["k"] = adv(carry["s"], carry["k"], ids)
      carry["s"] = s
      if with_update:
        return exp.sgd(s, key)[0]
      return carry["k"]

    return call

  def chained_chunk(with_update=False):
    carry = {"s": step0, "k": state0}

    def call():
      outs = chunked(carry["s"], carry["k"], host_ids)
      carry["s"], _, carry["k"] = outs[-1]
      if with_update:
        return [exp.sgd(s, key)[0] for s, key, _ in outs][-1]
      return carry["k"]

    return call

  def update_only():
    return exp.sgd(step0, state0)[0]

  rows = [
      ("update (the user's pmap step), constant inputs", update_only, 1),
      ("advance: rng.make_step_key_fn (jaxline: jit+vmap)",
       chained(jaxline_adv), 1),
      ("advance: same, same_host mode (no host ids)",
       chained(lambda s, k, h: jaxline_adv_2in(s, k, None)), 1),
      ("advance: jax.pmap, same keys", chained(pmap_adv), 1),
      ("advance: jax.pmap, host ids as 1 array (0.0.8)",
       chained(pmap_adv, ids=host_ids_orig), 1),
      ("advance: jit+vmap, split only (bare loop's)", chained(plain_jit), 1),
      (f"advance: {_CHUNK} steps per jit call (chunked)", chained_chunk(),
       _CHUNK),
      ("advance (jaxline) + update", chained(jaxline_adv, with_update=True),
       1),
      ("advance (jax.pmap) + update", chained(pmap_adv, with_update=True), 1),
      (f"advance ({_CHUNK} per call) + update", chained_chunk(True), _CHUNK),
  ]
  costs = _device_us(rows, args.breakdown_calls, args.breakdown_repeats)
  for label, (wall, cpu) in costs.items():
    lines.append(f"  {label:50s} {wall:8.1f} {cpu:8.1f}")

  compile_ms = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(rng_lib.make_step_key_fn(mode)(step0, state0,
                                                         host_ids))
    compile_ms.append((time.perf_counter() - start) * 1e3)
  lines.append(f"  {'make_step_key_fn(mode) + first call, each loop start':50s}"
               f" {_median(compile_ms):8.1f} ms wall (a fresh jit: traced "
               "and compiled again)")
  return lines


def _breakdown_host(args) -> List[str]:
  """Pure-Python per-step pieces of the loop."""
  del args
  key = utils.bcast_local_devices(jax.random.PRNGKey(3))
  cfg_state = config_dict.ConfigDict()
  cfg_state.global_step = 0
  cfg_state.train_step_rng = key
  plain_state = types.SimpleNamespace(global_step=0, train_step_rng=key)
  config = _loop_config("pmap", 10**9, 500)
  exp = MlpExperiment("train", style="pmap")

  def cfg_incr():
    cfg_state.global_step += 1

  def cfg_rng():
    cfg_state.train_step_rng = key

  def cfg_read():
    return cfg_state.global_step

  def plain_incr():
    plain_state.global_step += 1

  def plain_rng():
    plain_state.train_step_rng = key

  def annotation():
    with jax.profiler.StepTraceAnnotation("train", step_num=12345):
      pass

  counter = {"step": 10**6 + 1}  # Consecutive steps, far from any hit.

  def action_call(action):
    def call():
      counter["step"] += 1
      action(0.0, counter["step"], {})
    return call

  def cfg_item_incr():
    cfg_state["global_step"] = cfg_state["global_step"] + 1

  def cfg_item_rng():
    cfg_state["train_step_rng"] = key

  steps_action = periodic.PeriodicAction(lambda s, x: None, "steps", 10**9,
                                         run_async=False)
  growth_action = periodic.PeriodicAction(
      lambda s, x: None, "steps", 10**9, run_async=False,
      logging_growth_ratios=[1, 2, 5, 10])
  secs_action = periodic.PeriodicAction(lambda s, x: None, "secs", 1e9,
                                        run_async=False)
  end_action = periodic.PeriodicAction(lambda s, x: None, "steps", 10**9,
                                       run_async=True,
                                       end_step_to_action=10**12)
  stop_action = preemption.StopOnSignal(threading.Event())
  guard_action = nonfinite.NonFiniteGuard()
  progress_action = progress.ProgressLogger(
      training_steps=10**12, interval_type="steps", interval=10**9,
      run_async=True, fn_wrapper=guard_action.checked)
  progress_action(0.0, 1, {})  # Its first call records the first step.
  scalars = {"loss": key}

  rows = [
      ("state.global_step += 1 (ConfigDict)", cfg_incr),
      ("state.train_step_rng = key (ConfigDict)", cfg_rng),
      ("state.global_step read (ConfigDict)", cfg_read),
      ("state['global_step'] += 1 (ConfigDict item)", cfg_item_incr),
      ("state['train_step_rng'] = key (ConfigDict item)", cfg_item_rng),
      ("state.global_step += 1 (SimpleNamespace)", plain_incr),
      ("state.train_step_rng = key (SimpleNamespace)", plain_rng),
      ("jax.profiler.StepTraceAnnotation enter+exit", annotation),
      ("time.time()", time.time),
      ("should_run_step(int, ConfigDict)",
       lambda: exp.should_run_step(5, config)),
      ("isinstance(scalars, Mapping)",
       lambda: isinstance(scalars, collections.abc.Mapping)),
      ("PeriodicAction, steps, not firing", action_call(steps_action)),
      ("PeriodicAction, steps + growth ratios, not firing",
       action_call(growth_action)),
      ("PeriodicAction, secs, not firing", action_call(secs_action)),
      ("PeriodicAction, writer-style (end step), not firing",
       action_call(end_action)),
      ("ProgressLogger (progress line), not firing",
       action_call(progress_action)),
      ("NonFiniteGuard (keeps a reference)", action_call(guard_action)),
      ("preemption.StopOnSignal", lambda: stop_action(0.0, 1, {})),
  ]
  costs = {label: _host_us(fn) for label, fn in rows}
  lines = [f"  {label:50s} {cost:8.3f} us" for label, cost in costs.items()]
  # What one iteration of the default loop does on the host, besides the two
  # device calls: 3 reads of state.global_step (loop test, annotation,
  # actions), the += and the key write, the annotation, time.time(),
  # should_run_step, the output check, and train()'s five actions
  # (non-finite guard, progress line, checkpoint, writer, StopOnSignal), none
  # firing.
  loop = (3 * costs["state.global_step read (ConfigDict)"] +
          costs["state.global_step += 1 (ConfigDict)"] +
          costs["state.train_step_rng = key (ConfigDict)"] +
          costs["jax.profiler.StepTraceAnnotation enter+exit"] +
          costs["time.time()"] +
          costs["should_run_step(int, ConfigDict)"] +
          costs["isinstance(scalars, Mapping)"] +
          costs["NonFiniteGuard (keeps a reference)"] +
          costs["ProgressLogger (progress line), not firing"] +
          costs["PeriodicAction, steps, not firing"] +
          costs["PeriodicAction, writer-style (end step), not firing"] +
          costs["preemption.StopOnSignal"])
  items = (costs["state['global_step'] += 1 (ConfigDict item)"] +
           costs["state['train_step_rng'] = key (ConfigDict item)"] -
           costs["state.global_step += 1 (ConfigDict)"] -
           costs["state.train_step_rng = key (ConfigDict)"] -
           2 * costs["state.global_step read (ConfigDict)"])
  lines.append(f"  {'=> host-side Python per train() iteration (sum)':50s} "
               f"{loop:8.3f} us")
  lines.append(f"  {'   same with item writes and one read (sum)':50s} "
               f"{loop + items:8.3f} us")
  return lines


def _breakdown_profile(args) -> List[str]:
  """cProfile of `train()`'s loop: the top functions by own time per step."""
  clock = _Clock()
  factory = functools.partial(MlpExperiment, style="pmap", clock=clock)
  clock.arm(0, 1, 0)
  _run_train(factory, "pmap", 2, args.log_every)
  # Thread CPU time, not wall: waiting for devices or for a core is not cost.
  profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
  steps = args.window * args.windows
  clock.arm(args.warmup, steps, 1, profiler=profiler)
  _run_train(factory, "pmap", clock.total_steps(), args.log_every)
  stats = pstats.Stats(profiler, stream=io.StringIO())
  lines = [f" cProfile (thread CPU time) of train()'s timed window ({steps} "
           "steps, pmap style), top own time per step; profiling inflates "
           "small calls, and a C++ call (a jitted function) counts in its "
           "Python caller's own time:"]
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
  print(f" Device calls, us per step (median of {args.breakdown_repeats} "
        f"interleaved loops of {args.breakdown_calls} steps, then a block):"
        f"{'wall':>11} {'cpu':>8}")
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


class _GuardedExperiment(MlpExperiment):
  """The MLP, with `train_loop` under the device-to-host transfer guard.

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
  factory = functools.partial(_GuardedExperiment, style=style, clock=clock,
                              counter=counter)
  clock.arm(args.warmup, args.window, _SYNC_WINDOWS)
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
    _run_train(functools.partial(MlpExperiment, style=style, clock=clock),
               style, 2, args.log_every)
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
  parser.add_argument("--window", type=int, default=50,
                      help="Steps per timed window.")
  parser.add_argument("--windows", type=int, default=None,
                      help="Timed windows per run (default: 10 on 1 device, "
                      "5 on more).")
  parser.add_argument("--warmup", type=int, default=20,
                      help="Untimed steps at the start of every run.")
  parser.add_argument("--repeats", type=int, default=3,
                      help="Runs of every variant, interleaved.")
  parser.add_argument("--log_every", type=int, default=500,
                      help="log_tensors_interval and log_train_data_interval "
                      "(steps).")
  parser.add_argument("--collectives", action="store_true",
                      help="pmean the gradients (pmap style). Keep runs short "
                      "on many forced devices.")
  parser.add_argument("--proposed", action="store_true",
                      help="Also run train() with a prototype of the "
                      "proposed loop, per step and 16 steps per key call.")
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
  return parser.parse_args(argv)


def _run_here(args) -> List[Dict[str, Any]]:
  """Measures with this process's devices; returns the summary rows."""
  absl_flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  n = jax.local_device_count()
  if args.windows is None:
    args.windows = 10 if n == 1 else 5
  print(f"jax {jax.__version__}, {n} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; "
        f"{args.repeats} interleaved runs per variant, each {args.warmup} "
        f"warm-up steps then {args.windows} windows of {args.window} steps; "
        f"log_every={args.log_every} steps.", flush=True)
  rows = []
  timed = not (args.breakdown_only or args.sync_check_only)
  for style in args.styles.split(",") if timed else []:
    try:
      times = _measure_style(style, args)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      print(f"  {style} style failed: {type(e).__name__}: {e}")
      continue
    _print_details(n, style, times)
    rows.extend(_summary_rows(n, style, times))
  if rows:
    _print_table(rows)
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
  """One child process per device count, then a combined table."""
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
    timing = [r for r in rows if r["metric"] in METRICS]
    if timing:
      _print_table(timing)
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
