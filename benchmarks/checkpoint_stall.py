"""How long the training loop stalls while a ~100 MB checkpoint is saved.

Runs jaxline's own loop (`train.train`) three times in one process, on one
device, with the same experiment: a parameter array of `--size_mb` MB
(float32, in `CHECKPOINT_ATTRS`) that every step rewrites in place (a
jitted, donated update), so each step costs a steady few milliseconds and
every save copies a changing array.

  none   no periodic saves: the steady step rate.
  async  `DiskCheckpointer(config, "train", async_save=True)`, saving every
         `--interval` steps: the loop waits for the device-to-host copy,
         Orbax writes in the background.
  sync   `DiskCheckpointer(..., async_save=False)`: the loop waits until
         the checkpoint is committed on disk.

A periodic action placed before jaxline's checkpoint action timestamps every
step and looks for each save's step directory on disk, so it sees when the
save was committed. Per mode the table gives:

  save call      median time `checkpointer.save` took (the first save, which
                 also creates the Orbax manager, is shown separately);
  stall/save     median extra time of a step interval that holds a save,
                 over the median step interval without one;
  commit after   median time from the save call's return to the step
                 directory appearing, seen at the next step's end (0 for
                 sync: it is on disk when the call returns);
  steps/s saving steps per second between a save call's return and its
                 commit (async only: a sync save blocks the loop);
  steps/s none   steps per second in intervals with no save in flight;
  overall        steps per second over the whole timed run.

Usage:
  python benchmarks/checkpoint_stall.py
  python benchmarks/checkpoint_stall.py --size_mb 400 --saves 4

It prints the table and exits 0; it asserts nothing about timings. Runs in
about a minute on a 2-core machine (the disk speed matters).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
import jax
import numpy as np

from jaxline import base_config
from jaxline import checkpointing
from jaxline import experiment
from jaxline import train
from jaxline import utils
# pylint: enable=g-import-not-at-top,wrong-import-position


class _BigParams(experiment.AbstractExperiment):
  """One large per-device parameter array, updated in place every step."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_steps": "steps"}
  SIZE_MB = 100

  def __init__(self, mode, init_rng=None):
    super().__init__(mode, init_rng)
    count = self.SIZE_MB * 2**20 // 4
    self._params = utils.bcast_local_devices(
        {"w": np.zeros((count,), np.float32)})
    self._steps = 0
    self._update = jax.jit(
        lambda p: jax.tree.map(lambda x: x * 0.999 + 0.001, p),
        donate_argnums=0)

  def step(self, *, global_step, rng, writer):
    self._params = self._update(self._params)
    jax.block_until_ready(self._params)
    self._steps += 1
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


class _TimedCheckpointer(checkpointing.DiskCheckpointer):
  """Records how long each `save` call blocks its caller."""

  def __init__(self, *args, clock, **kwargs):
    super().__init__(*args, **kwargs)
    self.save_calls = []  # (global_step, start, end)
    self._clock = clock

  def save(self, ckpt_series):
    start = time.perf_counter()
    super().save(ckpt_series)
    end = time.perf_counter()
    step = self.get_experiment_state(ckpt_series).global_step
    self.save_calls.append((step, start, end))
    self._clock.poll(end)  # A synchronous save is on disk already.


class _StepClock:
  """A periodic action: step end times, and when saves reached the disk."""

  def __init__(self, series_dir):
    self._series_dir = series_dir
    self.times = {}  # global_step -> time after that step.
    self.commits = {}  # saved step -> first time its directory was seen.
    self._pending = set()

  def expect(self, step):
    self._pending.add(step)

  def poll(self, now):
    for step in list(self._pending):
      if os.path.isdir(os.path.join(self._series_dir, str(step))):
        self.commits[step] = now
        self._pending.discard(step)

  def __call__(self, t, step, scalar_outputs):
    del t, scalar_outputs
    now = time.perf_counter()
    self.poll(now)
    self.times[step] = now

  def update_time(self, t, step):
    pass

  def wait_to_finish(self):
    deadline = time.monotonic() + 120
    while self._pending and time.monotonic() < deadline:
      self.poll(time.perf_counter())
      time.sleep(0.005)


def _config(directory, steps, interval):
  config = base_config.get_base_config()
  config.checkpoint_dir = directory
  config.training_steps = steps
  config.interval_type = "steps"
  config.save_checkpoint_interval = interval
  config.log_tensors_interval = None
  config.log_train_data_interval = None
  config.max_checkpoints_to_keep = 2
  return config


def _run(mode, args, root):
  """One training run; returns its measurements."""
  directory = os.path.join(root, mode)
  warmup = args.interval  # Compile and settle before the first save.
  steps = warmup + args.interval * args.saves + args.interval // 2
  interval = -1 if mode == "none" else args.interval
  config = _config(directory, steps, interval)
  clock = _StepClock(os.path.join(directory, "checkpoints", "latest"))
  checkpointer = _TimedCheckpointer(config, "train", clock=clock,
                                    async_save=(mode != "sync"))

  saved_steps = set(range(interval, steps + 1, interval)) if interval > 0 else (
      set())
  for step in saved_steps:
    clock.expect(step)
  start = time.perf_counter()
  train.train(_BigParams, config, checkpointer, None,
              periodic_actions=(clock,))
  clock.wait_to_finish()
  total = time.perf_counter() - start

  # Step intervals: times[s] - times[s - 1] is step s's duration, plus the
  # save made right after step s - 1 if there was one.
  ordered = sorted(clock.times)
  gaps = {s: clock.times[s] - clock.times[s - 1] for s in ordered
          if s - 1 in clock.times and s > warmup}
  save_calls = [c for c in checkpointer.save_calls if c[0] in saved_steps]
  saving_gaps = [gaps[s + 1] for s, _, _ in save_calls if s + 1 in gaps]
  in_flight = set()
  for s, _, end in save_calls:
    commit = clock.commits.get(s, end)
    in_flight |= {t for t in ordered if t > s and
                  clock.times[t] <= commit}
  quiet_gaps = [g for s, g in gaps.items()
                if s - 1 not in saved_steps and s not in in_flight]
  quiet = statistics.median(quiet_gaps)

  commits, rates = [], []
  for s, _, end in save_calls:
    commit = clock.commits.get(s)
    if commit is None:
      continue
    commits.append(max(commit - end, 0.0))
    done = [t for t in ordered if end < clock.times[t] <= commit]
    if mode == "async" and commit > end:
      rates.append(len(done) / (commit - end))
  timed = [s for s in ordered if s > warmup]
  overall = (len(timed) - 1) / (clock.times[timed[-1]] - clock.times[timed[0]])
  calls = [end - begin for _, begin, end in save_calls]
  return {
      "mode": mode,
      "saves": len(save_calls),
      "first_call": calls[0] if calls else None,
      "call": statistics.median(calls[1:] or calls) if calls else None,
      "stall": (statistics.median(saving_gaps) - quiet) if saving_gaps
               else None,
      "commit": statistics.median(commits) if commits else None,
      "rate_saving": statistics.mean(rates) if rates else None,
      "rate_quiet": 1.0 / quiet,
      "overall": overall,
      "step_ms": quiet * 1e3,
      "total": total,
  }


def _ms(value):
  return "-" if value is None else f"{value * 1e3:8.1f}"


def _rate(value):
  return "-" if value is None else f"{value:8.1f}"


def _print_table(results, args):
  print()
  print(f"Checkpoint of {args.size_mb} MB (float32 params), one save every "
        f"{args.interval} steps, {args.saves} timed saves, on "
        f"{jax.devices()[0].platform} ({jax.local_device_count()} device).")
  header = (f"{'mode':6} {'saves':>5} {'1st call':>9} {'save call':>9} "
            f"{'stall/save':>10} {'commit after':>12} {'steps/s saving':>14} "
            f"{'steps/s none':>12} {'overall':>8}")
  print(header)
  print("-" * len(header))
  for r in results:
    print(f"{r['mode']:6} {r['saves']:>5} {_ms(r['first_call']):>9} "
          f"{_ms(r['call']):>9} {_ms(r['stall']):>10} "
          f"{_ms(r['commit']):>12} {_rate(r['rate_saving']):>14} "
          f"{_rate(r['rate_quiet']):>12} {_rate(r['overall']):>8}")
  print("(times in ms; a step without a save takes about "
        f"{results[0]['step_ms']:.1f} ms)")
  by_mode = {r["mode"]: r for r in results}
  async_stall, sync_stall = by_mode["async"]["stall"], by_mode["sync"]["stall"]
  if async_stall is not None and sync_stall is not None:
    ratio = sync_stall / max(async_stall, 1e-9)
    print(f"async stalls the loop {async_stall * 1e3:.0f} ms per save, sync "
          f"{sync_stall * 1e3:.0f} ms ({ratio:.1f}x).")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size_mb", type=int, default=100)
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--interval", type=int, default=20,
                      help="steps between saves")
  parser.add_argument("--dir", default="",
                      help="where to write (default: a temporary directory)")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  _BigParams.SIZE_MB = args.size_mb

  with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
    results = []
    for mode in ("none", "async", "sync"):
      print(f"running {mode} ...", flush=True)
      results.append(_run(mode, args, root))
  _print_table(results, args)


if __name__ == "__main__":
  main()
