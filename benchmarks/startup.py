"""Start-up cost: what jaxline adds to a plain script's time to its first step.

Issue 12 asks that importing jaxline and starting a run add at most 2% to a
plain script's time to the end of its first step. By default this runs two
child processes `--repeats` times, alternating which goes first:

  plain     `startup_plain.py`: imports JAX, builds a tiny MLP and a jitted
            SGD update, puts one batch on the device, runs one step and
            waits for it;
  jaxline   `startup_jaxline.py`: the same model and update as an
            `AbstractExperiment` (sharded style, so the step is the same
            `jax.jit` call), run by `platform.main` as a user runs an
            experiment file: train mode, 1 CPU device, no `checkpoint_dir`.

Each child prints the seconds from just before the parent started it (a
`time.time()` passed in `STARTUP_T0`) to the end of its imports and to the
end of its first step (after `block_until_ready`). The summary gives the
median and minimum of each, and what jaxline adds, in seconds and as a
percentage of the plain script's time.

`--mnist` instead times the MNIST example (train mode, `--steps` steps, a
fresh `checkpoint_dir`), per run:

  first step s   wall time from launch to the first progress line, which
                 is logged after the first step (imports, data, writer,
                 checkpointer, compile, one step);
  total s        wall time of the whole run, including the final save;
  peak MB        the child's peak resident memory (ru_maxrss);
  tensorflow     whether the child imported TensorFlow (a sitecustomize
                 probe records real imports, not `find_spec` probes).

`--repo DIR` runs another checkout's jaxline (for example an export of an
older commit) to compare before and after. It prints numbers, exits 0, and
never asserts on them. Run it on a quiet machine: other load moves the times.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
_CHILDREN = {
    "plain": ["startup_plain.py"],
    "jaxline": ["startup_jaxline.py", "--config=startup_jaxline.py"],
}
_CHILD_TIMEOUT_SECS = 300
_PROBE = '''
import atexit, os, sys
class _Probe:
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow":
      frame = sys._getframe(1)
      while frame is not None:
        if frame.f_code.co_name == "_find_and_load":
          open(os.environ["TF_PROBE_LOG"], "a").write("import\\n")
          break
        frame = frame.f_back
    return None
sys.meta_path.insert(0, _Probe())
'''


def _run_once(repo: str, probe_dir: str, steps: int) -> dict:
  with tempfile.TemporaryDirectory() as run_dir:
    log = os.path.join(run_dir, "tf_probe.log")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_PROBE_LOG=log,
               PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([probe_dir, repo]))
    command = [sys.executable, "-m", "examples.mnist.experiment",
               "--config=examples/mnist/config.py",
               f"--config.checkpoint_dir={run_dir}/run",
               f"--config.training_steps={steps}",
               "--config.log_tensors_interval=1"]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=repo, env=env, text=True,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    first = None
    for line in process.stdout:
      if first is None and "global_step: 1," in line:
        first = time.monotonic() - start
    # wait4 gives this child's own peak (ru_maxrss, KiB on Linux).
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    total = time.monotonic() - start
    if process.returncode:
      raise RuntimeError(f"{command} exited with {process.returncode}")
    return {"first": first, "total": total, "peak_mb": usage.ru_maxrss / 1024,
            "tf": os.path.exists(log)}


def _time_child(name: str, repo: str) -> Dict[str, float]:
  """Runs one child; returns its `IMPORTED` and `FIRST_STEP` times in s."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(
                 [repo] + [p for p in os.environ.get("PYTHONPATH", "").split(
                     os.pathsep) if p]))
  env.pop("XLA_FLAGS", None)  # One CPU device, as the plain script has.
  command = [sys.executable] + _CHILDREN[name]
  env["STARTUP_T0"] = repr(time.time())
  process = subprocess.Popen(command, cwd=_HERE, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    output, _ = process.communicate(timeout=_CHILD_TIMEOUT_SECS)
  except subprocess.TimeoutExpired:
    process.kill()
    output, _ = process.communicate()
  times = {}
  for line in output.splitlines():
    words = line.split()
    if len(words) == 2 and words[0] in ("IMPORTED", "FIRST_STEP"):
      times[words[0]] = float(words[1])
  if process.returncode or "FIRST_STEP" not in times:
    raise RuntimeError(f"{command} exited with {process.returncode}:\n"
                       f"{output[-3000:]}")
  return times


def _summary_line(label: str, values: List[float]) -> str:
  return (f"{label:<28} {statistics.median(values):>8.3f} "
          f"{min(values):>8.3f}")


def _added_line(label: str, plain: List[float], jaxline: List[float],
                base: Optional[List[float]] = None) -> str:
  """jaxline - plain, for the medians and for the minima."""
  base = base or plain
  parts = []
  for pick in (statistics.median, min):
    added = pick(jaxline) - pick(plain)
    parts.append(f"{added:>+8.3f} s {100 * added / pick(base):>+6.1f}%")
  return f"{label:<28} {parts[0]}   {parts[1]}"


def compare_with_plain(repo: str, repeats: int) -> None:
  """The issue's measurement: plain JAX vs the same step through jaxline."""
  print(f"repo {repo}; JAX_PLATFORMS=cpu, 1 device; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print("Seconds from process start (parent's clock before Popen):")
  print(f"{'run':>3} {'order':<15} {'plain import':>12} {'plain step':>10} "
        f"{'jaxline import':>14} {'jaxline step':>12}")
  runs = {"plain": [], "jaxline": []}
  for i in range(repeats):
    order = ("plain", "jaxline") if i % 2 == 0 else ("jaxline", "plain")
    for name in order:
      runs[name].append(_time_child(name, repo))
    plain, jaxline = runs["plain"][-1], runs["jaxline"][-1]
    print(f"{i:>3} {'-'.join(order):<15} {plain['IMPORTED']:>12.3f} "
          f"{plain['FIRST_STEP']:>10.3f} {jaxline['IMPORTED']:>14.3f} "
          f"{jaxline['FIRST_STEP']:>12.3f}")
  column = {name: {key: [r[key] for r in results]
                   for key in ("IMPORTED", "FIRST_STEP")}
            for name, results in runs.items()}
  print(f"\n{'':<28} {'median':>8} {'min':>8}")
  for name in ("plain", "jaxline"):
    print(_summary_line(f"{name}: end of imports", column[name]["IMPORTED"]))
    print(_summary_line(f"{name}: end of first step",
                        column[name]["FIRST_STEP"]))
  plain_step = column["plain"]["FIRST_STEP"]
  print("\njaxline adds (% of the plain script's time to its first step):")
  print(f"{'':<28} {'median':>17}   {'min':>17}")
  print(_added_line("by the end of imports", column["plain"]["IMPORTED"],
                    column["jaxline"]["IMPORTED"], base=plain_step))
  print(_added_line("by the end of first step", plain_step,
                    column["jaxline"]["FIRST_STEP"]))
  print(f"load average after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def time_mnist(repo: str, repeats: int, steps: int) -> None:
  """The MNIST example's start-up, whole run, peak memory and TF import."""
  has_tf = ("installed" if importlib.util.find_spec("tensorflow") else
            "NOT installed (the comparison needs it)")
  print(f"repo {repo}; TensorFlow {has_tf}")
  with tempfile.TemporaryDirectory() as probe_dir:
    with open(os.path.join(probe_dir, "sitecustomize.py"), "w") as f:
      f.write(_PROBE)
    print(f"{'run':>3} {'first step s':>12} {'total s':>8} {'peak MB':>8} "
          "tensorflow")
    for i in range(repeats):
      r = _run_once(repo, probe_dir, steps)
      print(f"{i:>3} {r['first']:>12.2f} {r['total']:>8.2f} "
            f"{r['peak_mb']:>8.0f} "
            f"{'imported' if r['tf'] else 'not imported'}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repo", default=_REPO,
                      help="the checkout whose jaxline the children import")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--mnist", action="store_true",
                      help="time the MNIST example instead")
  parser.add_argument("--steps", type=int, default=20,
                      help="with --mnist: training steps")
  args = parser.parse_args()
  repo = os.path.abspath(args.repo)
  if args.mnist:
    time_mnist(repo, args.repeats, args.steps)
  else:
    compare_with_plain(repo, args.repeats)


if __name__ == "__main__":
  main()
