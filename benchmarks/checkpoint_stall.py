"""What a checkpoint save costs the training loop: stall and host memory.

Two experiments, each run through jaxline's own loop (`train.train`) with
the real `DiskCheckpointer`, once with asynchronous saves and once with
synchronous ones (`async_save=False`), saving every `--interval` steps:
by default as many steps as take `--seconds_between_saves` (timed on a few
steps first), so that an asynchronous write ends before the next save and
the stall is the save's own, not a wait for the previous write.

  pmap  this process (one device on a CPU machine): a float32 parameter
        array of `--size_mb` MB in `CHECKPOINT_ATTRS`, a copy on every
        local device (pmap style).
  fsdp  2 processes x 2 CPU devices (`checkpoint_stall_fsdp.py`, started
        here with `jax.distributed` on 127.0.0.1), sharded style: the same
        number of parameters as one [rows, 1024] array sharded over
        `sharding.data_parallel_mesh()` with `P("data", None)`, so each
        process holds half of it, and each process saves its own shards.

Every step rewrites the parameters in place (a jitted, donated update that
keeps them uniformly random, so they never compress), so each step costs a
steady few milliseconds and every save copies a changing array. The fsdp
step also takes the parameters' global mean, a cross-process reduction
that keeps the processes in step as FSDP's gathers do; without one the
two loops drift apart and a save's barriers would absorb the drift.

A periodic action placed before jaxline's checkpoint action timestamps
every step and looks for each save's step directory on disk, so it also
sees when an asynchronous save was committed. Per process the table gives:

  every         steps between saves;
  step          median step interval with no save in flight (async run),
                from the steps after the first half interval (which
                compile and settle) that neither hold a save nor run while
                an asynchronous one is being written;
  commit        median time from an async save call's return to its step
                directory appearing, seen at the next step's end;
  stall         median extra time of a step interval that holds a save,
                over the median interval with no save in flight, async and
                sync, and async as a percentage of sync;
  peak +MB      how much the process's peak resident memory grew during
                one save: buffers of 1 MB or more are always returned to
                the system when freed (`fix_mmap_threshold`), free heap
                memory is handed back (`malloc_trim`) and the peak is reset
                (`/proc/self/clear_refs`) just before the save; `VmHWM`
                from `/proc/self/status` is read once the save has committed
                (`wait_for_checkpointing_to_finish`) and the resident size
                just before the save is subtracted. The final save of the
                run is the one measured, so the wait stalls no timed step;
  x own         that growth over the bytes of the process's own shards
                (the whole array for pmap, half of it per fsdp process): a
                process that gathered the whole model would show about 2
                in the fsdp rows.

Usage:
  python benchmarks/checkpoint_stall.py
  python benchmarks/checkpoint_stall.py --size_mb 1000 --cases pmap

It prints the table and asserts nothing about timings; it exits 1 only if
an fsdp worker failed or outlived `--timeout`. The default run (100 MB)
takes about 2 minutes on a 2-core machine; the disk speed and other load on
the machine matter. `--size_mb 1000 --cases pmap` takes about 4 minutes
there.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from jaxline import base_config
from jaxline import checkpointing
from jaxline import devices
from jaxline import experiment
from jaxline import sharding as sharding_lib
from jaxline import train
# pylint: enable=g-import-not-at-top,wrong-import-position

MODES = ("async", "sync")
# A worker prints its result as one line starting with this.
RESULT_PREFIX = "CHECKPOINT_STALL_RESULT "
_FSDP_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "checkpoint_stall_fsdp.py")


def _status_kb(field):
  """A `VmRSS`/`VmHWM` line of /proc/self/status, in kB (None off Linux)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _trim_heap():
  """Returns freed heap memory to the system, so the baseline RSS is real.

  Without it, memory a previous save freed but glibc kept would be reused by
  the next save and hide from the peak.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def fix_mmap_threshold():
  """Makes glibc hand every freed buffer of 1 MB or more back at once.

  By default glibc raises its mmap threshold as large buffers are freed
  (up to 32 MB), then keeps freed ones for reuse, beyond `malloc_trim`'s
  reach: a save could then reuse an earlier save's copy and its peak would
  read low (by a shard at a time, varying from run to run). Call it before
  anything large is allocated.
  """
  try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    pass


def _reset_peak():
  """Resets VmHWM to the current RSS; False where the kernel refuses."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def rotate(x, shift=0.0):
  """A new array of the same uniform randomness: x + 0.618... modulo 1."""
  return jnp.mod(x + 0.6180339 + shift, 1.0)


class _BigParams(experiment.AbstractExperiment):
  """One large per-device parameter array, updated in place every step."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_steps": "steps"}
  SIZE_MB = 100

  def __init__(self, mode, init_rng=None):
    super().__init__(mode, init_rng)
    shape, layout = self._layout(jax.local_device_count(),
                                 self.SIZE_MB * 2**20 // 4)
    # Random values (a constant array would compress to nothing on disk),
    # made on the devices in the experiment's layout.
    self._params = {"w": jax.jit(
        lambda: jax.random.uniform(jax.random.key(0), shape),
        out_shardings=layout)()}
    self._steps = 0
    self._update = jax.jit(lambda p: jax.tree.map(rotate, p),
                           donate_argnums=0)

  def _layout(self, n, size):
    """The pmap style: the whole array on each of the `n` devices."""
    return (n, size), devices.per_device_sharding()

  def step(self, *, global_step, rng, writer):
    self._params = self._update(self._params)
    jax.block_until_ready(self._params)
    self._steps += 1
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


class _BigGlobalParams(_BigParams):
  """The same parameters as one global array (the sharded style)."""

  def _layout(self, n, size):
    """Split by rows over the `n` devices (one on a CPU machine)."""
    return (n, size // n), sharding_lib.batch_sharded()


class _TimedCheckpointer(checkpointing.DiskCheckpointer):
  """Times each `save` call; measures host memory of the save at one step."""

  def __init__(self, *args, clock, memory_step, **kwargs):
    super().__init__(*args, **kwargs)
    self.save_calls = []  # (global_step, start, end)
    self.memory = None  # {"rss_mb", "peak_mb", "growth_mb"} of memory_step.
    self._clock = clock
    self._memory_step = memory_step

  def save(self, ckpt_series):
    step = self.get_experiment_state(ckpt_series).global_step
    if step == self._memory_step:
      self._measured_save(ckpt_series)
      return
    start = time.perf_counter()
    super().save(ckpt_series)
    end = time.perf_counter()
    self.save_calls.append((step, start, end))
    self._clock.poll(end)  # A synchronous save is on disk already.

  def _measured_save(self, ckpt_series):
    self.wait_for_checkpointing_to_finish()  # Earlier saves are not counted.
    gc.collect()
    _trim_heap()
    reset = _reset_peak()
    rss = _status_kb("VmRSS")
    super().save(ckpt_series)
    self.wait_for_checkpointing_to_finish()  # Committed on disk.
    peak = _status_kb("VmHWM")
    if reset and rss is not None and peak is not None:
      self.memory = {"rss_mb": rss / 1024, "peak_mb": peak / 1024,
                     "growth_mb": max(peak - rss, 0) / 1024}


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


def choose_interval(experiment_class, size_mb, interval=0,
                    seconds_between_saves=0.0):
  """Steps between saves: `interval`, or enough steps for the seconds.

  The default, `max(3, size_mb / 40)` seconds, leaves an asynchronous write
  time to finish on a slow or busy disk. Every process of a job must then
  agree on one value (collective saves).
  """
  if interval > 0:
    return interval
  seconds = seconds_between_saves or max(3.0, size_mb / 40)
  trial = experiment_class("train")
  for _ in range(5):  # Compile and settle.
    trial.step(global_step=None, rng=None, writer=None)
  times = []
  for _ in range(30):
    start = time.perf_counter()
    trial.step(global_step=None, rng=None, writer=None)
    times.append(time.perf_counter() - start)
  del trial
  gc.collect()
  return max(10, math.ceil(seconds / statistics.median(times)))


def _config(directory, steps, interval, style):
  config = base_config.get_base_config()
  config.checkpoint_dir = directory
  config.training_steps = steps
  config.interval_type = "steps"
  config.save_checkpoint_interval = interval
  config.log_tensors_interval = None
  config.log_train_data_interval = None
  config.max_checkpoints_to_keep = 2
  config.experiment_style = style
  return config


def run(experiment_class, mode, *, saves, interval, root, style="pmap"):
  """One training run in `mode` ("async" or "sync"); its measurements.

  Every process of a multi-process job calls it with the same arguments.
  """
  directory = os.path.join(root, mode)
  warmup = interval  # Compile, settle and time quiet steps first.
  steps = interval * saves + interval // 2  # Saves at interval, 2 interval...
  config = _config(directory, steps, interval, style)
  clock = _StepClock(os.path.join(directory, "checkpoints", "latest"))
  # The final save (train.train's, at a step no periodic save used).
  checkpointer = _TimedCheckpointer(config, "train", clock=clock,
                                    memory_step=steps,
                                    async_save=(mode == "async"))

  saved_steps = set(range(interval, steps + 1, interval))
  for step in saved_steps:
    clock.expect(step)
  train.train(experiment_class, config, checkpointer, None,
              periodic_actions=(clock,))
  clock.wait_to_finish()
  checkpointer.close()

  # Step intervals: times[s] - times[s - 1] is step s's duration, plus the
  # save made right after step s - 1 if there was one. The steps before the
  # first save, once compiled, are quiet ones even if every asynchronous
  # save is still being written when the next one starts.
  ordered = sorted(clock.times)
  gaps = {s: clock.times[s] - clock.times[s - 1] for s in ordered
          if s - 1 in clock.times and s > warmup // 2}
  save_calls = [c for c in checkpointer.save_calls if c[0] in saved_steps]
  saving_gaps = [gaps[s + 1] for s, _, _ in save_calls if s + 1 in gaps]
  in_flight = set()
  for s, _, end in save_calls:
    commit = clock.commits.get(s, end)
    in_flight |= {t for t in ordered if t > s and clock.times[t] <= commit}
  quiet = statistics.median(
      g for s, g in gaps.items()
      if s - 1 not in saved_steps and s not in in_flight)
  commits = [max(clock.commits[s] - end, 0.0) for s, _, end in save_calls
             if s in clock.commits]
  memory = checkpointer.memory or {}
  return {
      "mode": mode,
      "interval": interval,
      "saves": len(save_calls),
      "step_ms": quiet * 1e3,
      "stall_ms": ((statistics.median(saving_gaps) - quiet) * 1e3
                   if saving_gaps else None),
      "call_ms": (statistics.median(e - b for _, b, e in save_calls) * 1e3
                  if save_calls else None),
      "commit_ms": statistics.median(commits) * 1e3 if commits else None,
      "rss_mb": memory.get("rss_mb"),
      "peak_mb": memory.get("peak_mb"),
      "growth_mb": memory.get("growth_mb"),
  }


def summarize(case, process, model_mb, own_mb, results):
  """One table row (a dict) from a process's async and sync results."""
  by_mode = {r["mode"]: r for r in results}
  row = {"case": case, "process": process, "model_mb": model_mb,
         "own_mb": own_mb, "step_ms": by_mode["async"]["step_ms"],
         "interval": by_mode["async"]["interval"]}
  for mode in MODES:
    row[f"stall_{mode}_ms"] = by_mode[mode]["stall_ms"]
    row[f"growth_{mode}_mb"] = by_mode[mode]["growth_mb"]
    row[f"rss_{mode}_mb"] = by_mode[mode]["rss_mb"]
  row["commit_async_ms"] = by_mode["async"]["commit_ms"]
  row["interval_ms"] = row["step_ms"] * row["interval"]
  return row


def _run_in_process(args, root, experiment_class, case: str,
                    style: str = "pmap"):
  """Both modes of one experiment in this process; its table row."""
  experiment_class.SIZE_MB = args.size_mb
  interval = choose_interval(experiment_class, args.size_mb, args.interval,
                             args.seconds_between_saves)
  results = []
  for mode in MODES:
    print(f"{case}: running {mode}, a save every {interval} steps ...",
          flush=True)
    results.append(run(experiment_class, mode, saves=args.saves,
                       interval=interval, style=style,
                       root=os.path.join(root, case)))
  # pmap holds the model on every device; sharded splits it over them.
  own = args.size_mb * (jax.local_device_count() if style == "pmap" else 1)
  return [summarize(f"{case} 1x{jax.local_device_count()}", 0, args.size_mb,
                    own, results)]


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_fsdp(args, root, processes=2, devices=2):
  """Starts the fsdp workers; their table rows, or None if one failed."""
  print(f"fsdp: running async and sync in {processes} processes ...",
        flush=True)
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONUNBUFFERED"] = "1"
  address = f"127.0.0.1:{_free_port()}"
  directory = os.path.join(root, "fsdp")
  workers = []
  for i in range(processes):
    log = open(os.path.join(root, f"fsdp_{i}.log"), "w+")
    command = [sys.executable, _FSDP_WORKER, f"--size_mb={args.size_mb}",
               f"--saves={args.saves}", f"--interval={args.interval}",
               f"--seconds_between_saves={args.seconds_between_saves}",
               f"--dir={directory}", f"--coordinator={address}",
               f"--num_processes={processes}", f"--process_id={i}"]
    workers.append((subprocess.Popen(command, env=env, stdout=log,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True), log))
  deadline = time.monotonic() + args.timeout
  rows, failed = [], False
  for i, (process, log) in enumerate(workers):
    try:
      code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      code = f"killed after {args.timeout} s"
    log.seek(0)
    output = log.read()
    log.close()
    lines = [l for l in output.splitlines() if l.startswith(RESULT_PREFIX)]
    if code != 0 or not lines:
      failed = True
      print(f"fsdp process {i} failed ({code}); its output ends:\n"
            f"{output[-3000:]}", file=sys.stderr)
      continue
    rows.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
  return None if failed else rows


def _num(value, spec):
  return "-" if value is None else format(value, spec)


def _print_table(rows, args):
  """One table of every case and process, then what the chief's peak was."""
  print()
  print(f"Checkpoint of {args.size_mb} MB of float32 params, {args.saves} "
        "saves per run, jaxline's DiskCheckpointer in train.train.")
  header = (f"{'case':9} {'proc':>4} {'model MB':>8} {'own MB':>6} "
            f"{'every':>5} {'step ms':>7} {'commit ms':>9} {'stall async':>11} "
            f"{'stall sync':>10} {'async/sync':>10} {'peak +MB async':>14} "
            f"{'peak +MB sync':>13} {'x own async':>11} {'x own sync':>10}")
  print(header)
  print("-" * len(header))
  for r in rows:
    stall_a, stall_s = r["stall_async_ms"], r["stall_sync_ms"]
    ratio = (100 * stall_a / stall_s if None not in (stall_a, stall_s) and
             stall_s > 0 else None)
    grow_a, grow_s = r["growth_async_mb"], r["growth_sync_mb"]
    own = r["own_mb"]
    print(f"{r['case']:9} {r['process']:>4} {r['model_mb']:>8} "
          f"{_num(own, '.0f'):>6} {r['interval']:>5} "
          f"{_num(r['step_ms'], '.1f'):>7} "
          f"{_num(r['commit_async_ms'], '.0f'):>9} "
          f"{_num(stall_a, '.1f'):>11} {_num(stall_s, '.1f'):>10} "
          f"{_num(ratio, '.0f') + ' %':>10} {_num(grow_a, '.1f'):>14} "
          f"{_num(grow_s, '.1f'):>13} "
          f"{_num(None if grow_a is None else grow_a / own, '.2f'):>11} "
          f"{_num(None if grow_s is None else grow_s / own, '.2f'):>10}")
  print("every: steps between saves; step: ms per step with no save in "
        "flight; commit: ms from an async save call's return to its step "
        "directory on disk; stall: extra ms of a step interval holding a "
        "save; peak +MB: growth of the process's peak RSS during one save, "
        "until committed; x own: that growth over the process's own "
        "shards.")
  for r in rows:
    commit = r["commit_async_ms"]
    if commit is not None and commit > r["interval_ms"]:
      print(f"{r['case']} process {r['process']}: an async write ({commit:.0f}"
            f" ms) outlasts {r['interval']} steps ({r['interval_ms']:.0f} ms),"
            " so each async save first waits for the previous one; raise "
            "--seconds_between_saves to see the async stall alone.")
  for r in rows:
    if r["case"].startswith("fsdp") and r["process"] == 0:
      for mode in MODES:
        growth = r[f"growth_{mode}_mb"]
        if growth is not None:
          print(f"fsdp chief, {mode}: its peak grows by {growth:.0f} MB = "
                f"{growth / r['own_mb']:.2f}x its own shards "
                f"({r['own_mb']:.0f} MB), {growth / r['model_mb']:.2f}x the "
                f"model ({r['model_mb']} MB).")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size_mb", type=int, default=100)
  parser.add_argument("--saves", type=int, default=4)
  parser.add_argument("--interval", type=int, default=0,
                      help="steps between saves (default: from "
                      "--seconds_between_saves)")
  parser.add_argument("--seconds_between_saves", type=float, default=0.0,
                      help="default: max(3, size_mb / 40)")
  parser.add_argument("--cases", default="pmap,sharded,fsdp",
                      help="comma-separated: pmap, sharded, fsdp")
  parser.add_argument("--timeout", type=float, default=600,
                      help="seconds the fsdp workers may take")
  parser.add_argument("--dir", default="",
                      help="where to write (default: a temporary directory)")
  args = parser.parse_args()
  fix_mmap_threshold()
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  cases = args.cases.split(",")

  rows, failed = [], False
  with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
    if "pmap" in cases:
      rows += _run_in_process(args, root, _BigParams, "pmap")
    if "sharded" in cases:
      rows += _run_in_process(args, root, _BigGlobalParams, "sharded",
                              style="sharded")
    if "fsdp" in cases:
      fsdp = _run_fsdp(args, root)
      failed = fsdp is None
      rows += fsdp or []
  _print_table(rows, args)
  if failed:
    sys.exit("The fsdp case failed; see its output above.")


if __name__ == "__main__":
  main()
