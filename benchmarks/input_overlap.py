"""Does jaxline's input path overlap host input with compute?

A tiny step (about 1 ms, a small MLP SGD step) and a medium one (about
10 ms, a bigger MLP) are fed from a pipeline whose host side takes about as
long as the step: by default it sleeps (a stand-in for reading and decoding,
which wait on I/O), after copying a pre-made batch. Each case reports the
time per step; a loop that overlaps its input with compute runs at close to
max(compute, input), one that does not at compute + input.

  compute   the step alone, on a batch already on the devices.
  input     the pipeline alone: each host batch made and placed on the
            devices (waiting for the transfer), with no step.
  serial    host batch, then placement, then the step, in one thread.
  buffer    `utils.double_buffer` (pmap style) or
            `sharding.double_buffer_global` (sharded style) over the host
            pipeline in the caller's thread: placement overlaps, host work
            does not move.
  overlap   the same over `utils.py_prefetch(pipeline)`: jaxline's overlap,
            host work in a producer thread, placement in another.
  train     `overlap`'s pipeline, pulled by the experiment's `step` inside
            `jaxline.train.train(...)` (InMemoryCheckpointer, base config).

Both experiment styles run: `pmap` (the step is `jax.pmap`, batches are
per-device arrays) and `sharded` (the step is `jax.jit` over global arrays
split over `sharding.data_parallel_mesh()`). Both loop modes run:

  async     the loop never waits for a step, as jaxline's own loop runs: JAX's
            asynchronous dispatch alone lets the caller's host work overlap
            the running step, so even `serial` can come close to the max.
  synced    the loop waits for every step's output (as a loop that logs every
            step does): only work in other threads can overlap the step.

The time is the median over all windows (`--windows` per run, `--repeats`
runs of every case, interleaved in a rotating order) of whole steps, each
window ended by waiting for the parameters. The host delay defaults to the
measured compute time of each step (`--host_ms` sets it instead).

Usage:
  python benchmarks/input_overlap.py                # 1 CPU device
  python benchmarks/input_overlap.py --devices 8    # 8 forced CPU devices
  python benchmarks/input_overlap.py --sizes medium --modes synced
  python benchmarks/input_overlap.py --host_work numpy

`--devices N` sets `--xla_force_host_platform_device_count=N` (and
JAX_PLATFORMS=cpu) before JAX is imported; `native` leaves the platform to
JAX. The script prints numbers, exits 0 and never asserts on timings.
"""

import os
import sys

import forced_devices  # benchmarks/forced_devices.py, beside this script.


_REQUESTED_DEVICES = forced_devices.requested(sys.argv, "1")
if _REQUESTED_DEVICES != "native":
  forced_devices.force(int(_REQUESTED_DEVICES))
# Run from a checkout without installing: the repository root goes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import functools
import gc
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxline import base_config
from jaxline import devices as devices_lib
from jaxline import experiment as experiment_lib
from jaxline import sharding
from jaxline import train as train_lib
from jaxline import utils
from jaxline import writers
# pylint: enable=g-import-not-at-top,wrong-import-position

AXIS = "i"
# name -> (input features, hidden width, global batch). The batch divides
# over 8 devices. About 1 ms and 10 ms per step on one core of the 2-core
# development machine; the script measures and prints the real figure.
SIZES = {
    "tiny": (64, 256, 256),
    "medium": (256, 768, 256),
}
CASES = ("compute", "input", "serial", "buffer", "overlap", "train")
STYLES = ("pmap", "sharded")
MODES = ("async", "synced")


# ---------------------------------------------------------------------------
# The workload.
# ---------------------------------------------------------------------------


def _init_params(size: str) -> Dict[str, np.ndarray]:
  d_in, hidden, _ = SIZES[size]
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "w1": np.asarray(jax.random.normal(k1, (d_in, hidden))) * 0.05,
      "w2": np.asarray(jax.random.normal(k2, (hidden, hidden))) * 0.05,
      "w3": np.asarray(jax.random.normal(k3, (hidden, 1))) * 0.05,
  }


def _loss(params, batch):
  x, y = batch["x"], batch["y"]
  h = jnp.tanh(x @ params["w1"])
  h = jnp.tanh(h @ params["w2"])
  return jnp.mean((h @ params["w3"] - y) ** 2)


def _sgd(params, batch, pmap_axis: Optional[str]):
  loss, grads = jax.value_and_grad(_loss)(params, batch)
  if pmap_axis:  # Data parallel: the sharded step's jit does this itself.
    grads = jax.lax.pmean(grads, pmap_axis)
    loss = jax.lax.pmean(loss, pmap_axis)
  params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
  return params, loss


@functools.lru_cache(maxsize=None)
def _step_fn(style: str) -> Callable[..., Any]:
  if style == "pmap":
    return jax.pmap(functools.partial(_sgd, pmap_axis=AXIS), axis_name=AXIS)
  return jax.jit(functools.partial(_sgd, pmap_axis=None),
                 out_shardings=(sharding.replicated(), sharding.replicated()))


def _initial_params(style: str, size: str) -> Any:
  params = _init_params(size)
  if style == "pmap":
    return utils.bcast_local_devices(params)
  return sharding.replicate(params)


def _place(style: str, batch: Any) -> Any:
  """What a loop without jaxline's helpers does with each host batch."""
  if style == "pmap":
    return jax.device_put(batch, devices_lib.per_device_sharding())
  return sharding.host_batch_to_global(batch)


class HostPipeline:
  """Host batches that take about `host_s` each to make.

  A few batches are made up front; each item is a fresh copy of one of them
  (so no two items share memory), then the host delay: a sleep, or numpy
  work until the delay has passed (`numpy`, which competes with XLA's CPU
  threads for the cores).
  """

  def __init__(self, style: str, size: str, host_s: float, work: str):
    d_in, _, batch = SIZES[size]
    rng = np.random.default_rng(0)
    n = jax.local_device_count()
    self._pool = []
    for _ in range(4):
      x = rng.standard_normal((batch, d_in), dtype=np.float32)
      y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
      if style == "pmap":  # Per-device arrays: a leading local-device axis.
        x = x.reshape((n, batch // n, d_in))
        y = y.reshape((n, batch // n, 1))
      self._pool.append({"x": x, "y": y})
    self._host_s = host_s
    self._work = work
    self._scratch = rng.standard_normal((16384,), dtype=np.float32)

  def _delay(self) -> None:
    if self._work == "sleep":
      time.sleep(self._host_s)
      return
    # Elementwise work: single-threaded, unlike a BLAS call, whose threads
    # would fight XLA's for the cores.
    deadline = time.perf_counter() + self._host_s
    while time.perf_counter() < deadline:
      self._scratch = np.sin(self._scratch)

  def __call__(self) -> Iterator[Dict[str, np.ndarray]]:
    i = 0
    while True:
      batch = {k: v.copy() for k, v in self._pool[i % len(self._pool)].items()}
      self._delay()
      yield batch
      i += 1


def _overlapped(style: str, pipeline: HostPipeline,
                prefetch: bool) -> Iterator[Any]:
  """jaxline's input path for the style, with or without `py_prefetch`."""
  host = utils.py_prefetch(pipeline) if prefetch else pipeline()
  if style == "pmap":
    return utils.double_buffer(host)
  return sharding.double_buffer_global(host)


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


class Clock:
  """Times windows of whole steps from inside the loop that runs them.

  The loop calls `after(outputs)` once per step. After `warmup` steps, every
  `window` steps it waits for the outputs and reads the wall clock.
  """

  def __init__(self, warmup: int, window: int, windows: int):
    self.calls = 0
    self.marks = {warmup - 1 + j * window for j in range(windows + 1)}
    self.last = warmup - 1 + windows * window
    self.window = window
    self.stamps: List[float] = []

  @property
  def total_steps(self) -> int:
    return self.last + 1

  def after(self, outputs: Any) -> None:
    if self.calls in self.marks:
      jax.block_until_ready(outputs)
      self.stamps.append(time.perf_counter())
    self.calls += 1

  def ms_per_step(self) -> List[float]:
    if self.calls <= self.last:
      raise RuntimeError(f"Only {self.calls} of {self.total_steps} steps ran.")
    return [(b - a) / self.window * 1e3
            for a, b in zip(self.stamps, self.stamps[1:])]


def _loop(batches: Iterator[Any], params: Any, step: Callable[..., Any],
          clock: Clock, synced: bool) -> None:
  for _ in range(clock.total_steps):
    params, loss = step(params, next(batches))
    if synced:
      jax.block_until_ready(loss)
    clock.after(params)


class InputExperiment(experiment_lib.AbstractExperiment):
  """An experiment whose `step` pulls its batch from an overlapped pipeline."""

  CHECKPOINT_ATTRS = {"_params": "params"}

  def __init__(self, mode: str, init_rng: Optional[jax.Array] = None, *,
               style: str, size: str, pipeline: HostPipeline, clock: Clock,
               synced: bool):
    super().__init__(mode, init_rng)
    self._style = style
    self._step = _step_fn(style)
    self._params = _initial_params(style, size)
    self._pipeline = pipeline
    self._batches = None
    self._clock = clock
    self._synced = synced

  def step(self, *, global_step, rng, writer):
    del global_step, rng, writer
    if self._batches is None:  # Built on the first step, as examples do.
      self._batches = _overlapped(self._style, self._pipeline, prefetch=True)
    self._params, loss = self._step(self._params, next(self._batches))
    if self._synced:
      jax.block_until_ready(loss)
    self._clock.after(self._params)
    return {"loss": loss}

  def evaluate(self, *, global_step, rng, writer):
    del global_step, rng, writer
    return {}


def _run_train(style: str, size: str, pipeline: HostPipeline, clock: Clock,
               synced: bool) -> None:
  """`jaxline.train.train` as a user runs it, logging rarely."""
  config = base_config.get_base_config()
  config.training_steps = clock.total_steps
  config.interval_type = "steps"
  config.log_tensors_interval = 10**9
  config.log_train_data_interval = 10**9
  config.save_checkpoint_interval = 10**9
  if style != "pmap":
    config.experiment_style = style
  factory = functools.partial(InputExperiment, style=style, size=size,
                              pipeline=pipeline, clock=clock, synced=synced)
  utils.GLOBAL_CHECKPOINT_DICT.clear()
  checkpointer = utils.InMemoryCheckpointer(config, "train")
  train_lib.train(factory, config, checkpointer, writers.NullWriter())
  utils.GLOBAL_CHECKPOINT_DICT.clear()


def _measure(case: str, style: str, size: str, pipeline: HostPipeline,
             clock: Clock, synced: bool) -> List[float]:
  """ms per step of each window of one case."""
  step = _step_fn(style)
  gc.collect()
  if case == "train":
    _run_train(style, size, pipeline, clock, synced)
    return clock.ms_per_step()
  params = _initial_params(style, size)
  if case == "compute":
    placed = _place(style, next(pipeline()))
    batches = iter(lambda: placed, None)
  elif case == "input":
    host = pipeline()
    for _ in range(clock.total_steps):
      clock.after(jax.block_until_ready(_place(style, next(host))))
    return clock.ms_per_step()
  elif case == "serial":
    batches = (_place(style, batch) for batch in pipeline())
  elif case == "buffer":
    batches = _overlapped(style, pipeline, prefetch=False)
  elif case == "overlap":
    batches = _overlapped(style, pipeline, prefetch=True)
  else:
    raise ValueError(case)
  try:
    _loop(batches, params, step, clock, synced)
  finally:
    if hasattr(batches, "close"):
      batches.close()  # Stops the prefetching threads.
  return clock.ms_per_step()


def _compute_ms(style: str, size: str) -> float:
  """The step's own time, to size the host delay and the windows."""
  step = _step_fn(style)
  params = _initial_params(style, size)
  placed = _place(style, next(HostPipeline(style, size, 0.0, "sleep")()))
  params, _ = step(params, placed)  # Compiles.
  jax.block_until_ready(params)
  times = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(10):
      params, _ = step(params, placed)
    jax.block_until_ready(params)
    times.append((time.perf_counter() - start) / 10 * 1e3)
  return statistics.median(times)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def _parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1",
                      help="CPU devices to force (read before JAX starts), "
                      "or 'native'.")
  parser.add_argument("--sizes", default="tiny,medium")
  parser.add_argument("--styles", default="pmap,sharded")
  parser.add_argument("--modes", default="async,synced")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--host_ms", type=float, default=None,
                      help="Host delay per batch; default: the step's time.")
  parser.add_argument("--host_work", choices=("sleep", "numpy"),
                      default="sleep")
  parser.add_argument("--repeats", type=int, default=3,
                      help="Runs of every case, interleaved.")
  parser.add_argument("--windows", type=int, default=2,
                      help="Timed windows per run.")
  parser.add_argument("--window_s", type=float, default=0.12,
                      help="About how long each timed window runs.")
  parser.add_argument("--warmup_windows", type=float, default=1.0)
  return parser.parse_args(argv)


def _split(value: str, allowed) -> List[str]:
  items = [v for v in value.split(",") if v]
  bad = [v for v in items if v not in allowed]
  if bad:
    raise SystemExit(f"Unknown {bad}; choose from {list(allowed)}.")
  return items


def main(argv: List[str]) -> int:
  args = _parse_args(argv)
  logging.set_verbosity(logging.WARNING)  # train()'s INFO lines: not here.
  sizes = _split(args.sizes, SIZES)
  styles = _split(args.styles, STYLES)
  modes = _split(args.modes, MODES)
  cases = _split(args.cases, CASES)
  load_before = os.getloadavg()
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} "
        f"device(s), {os.cpu_count()} CPUs, host work: {args.host_work}, "
        f"load average {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}")
  start = time.perf_counter()
  rows = []
  for size in sizes:
    for style in styles:
      compute_ms = _compute_ms(style, size)
      host_ms = compute_ms if args.host_ms is None else args.host_ms
      pipeline = HostPipeline(style, size, host_ms / 1e3, args.host_work)
      for mode in modes:
        synced = mode == "synced"
        # Windows sized to the slower side: the expected time per step.
        window = max(3, int(args.window_s * 1e3 / max(compute_ms, host_ms)))
        warmup = max(2, int(args.warmup_windows * window))
        windows = {case: [] for case in cases}
        for r in range(args.repeats):
          # Interleaved, in a rotating order: load from other processes
          # then falls on every case alike.
          for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            clock = Clock(warmup, window, args.windows)
            windows[case] += _measure(case, style, size, pipeline, clock,
                                      synced)
        results = {case: statistics.median(windows[case]) for case in cases}
        rows.append((size, style, mode, host_ms, results))
        _print_group(size, style, mode, host_ms, results)
  load_after = os.getloadavg()
  print(f"\n{time.perf_counter() - start:.0f} s; load average at the end "
        f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
  _print_summary(rows)
  return 0


def _print_group(size: str, style: str, mode: str, host_ms: float,
                 results: Dict[str, float]) -> None:
  compute = results.get("compute")
  inputs = results.get("input")
  print(f"\n{size} step, {style} style, {mode} loop, host delay "
        f"{host_ms:.2f} ms")
  if compute is not None and inputs is not None:
    print(f"  max(compute, input) = {max(compute, inputs):.2f} ms, "
          f"compute + input = {compute + inputs:.2f} ms")
  print(f"  {'case':<8} {'ms/step':>8} {'steps/s':>8} {'/ max':>6} "
        f"{'/ sum':>6}")
  for case, ms in results.items():
    line = f"  {case:<8} {ms:8.2f} {1e3 / ms:8.1f}"
    if compute is not None and inputs is not None:
      line += (f" {ms / max(compute, inputs):6.2f}"
               f" {ms / (compute + inputs):6.2f}")
    print(line)


def _print_summary(rows) -> None:
  """One line per group: the loops' time over max(compute, input)."""
  shown = [c for c in ("serial", "buffer", "overlap", "train")
           if all(c in r[4] for r in rows)]
  if not rows or "compute" not in rows[0][4] or "input" not in rows[0][4]:
    return
  print("\ntime per step / max(compute, input) (1.00 = full overlap; "
        "sum/max = no overlap)")
  header = (f"  {'size':<7} {'style':<8} {'mode':<7} {'compute':>8} "
            f"{'input':>8} {'sum/max':>7}")
  for case in shown:
    header += f" {case:>8}"
  print(header)
  for size, style, mode, _, results in rows:
    best = max(results["compute"], results["input"])
    line = (f"  {size:<7} {style:<8} {mode:<7} "
            f"{results['compute']:5.2f} ms {results['input']:5.2f} ms "
            f"{(results['compute'] + results['input']) / best:7.2f}")
    for case in shown:
      line += f" {results[case] / best:8.2f}"
    print(line)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
