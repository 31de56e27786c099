"""Start-up time and peak memory of the MNIST example, and whether TF loads.

Runs `python -m examples.mnist.experiment` (train mode, 20 steps, a fresh
`checkpoint_dir`) `--repeats` times in child processes and reports, per run:

  first step s   wall time from launch to the first progress line, which
                 is logged after the first step (imports, data, writer,
                 checkpointer, compile, one step);
  total s        wall time of the whole run, including the final save;
  peak MB        the child's peak resident memory (ru_maxrss);
  tensorflow     whether the child imported TensorFlow (a sitecustomize
                 probe records real imports, not `find_spec` probes).

`--repo DIR` runs another checkout (e.g. a `git worktree` of an older
commit) to compare before and after. It prints numbers, exits 0, and never
asserts on them. Run it on a quiet machine: other load moves the times.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repo", default=_REPO)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  has_tf = ("installed" if importlib.util.find_spec("tensorflow") else
            "NOT installed (the comparison needs it)")
  print(f"repo {args.repo}; TensorFlow {has_tf}")
  with tempfile.TemporaryDirectory() as probe_dir:
    with open(os.path.join(probe_dir, "sitecustomize.py"), "w") as f:
      f.write(_PROBE)
    print(f"{'run':>3} {'first step s':>12} {'total s':>8} {'peak MB':>8} "
          "tensorflow")
    for i in range(args.repeats):
      r = _run_once(args.repo, probe_dir, args.steps)
      print(f"{i:>3} {r['first']:>12.2f} {r['total']:>8.2f} "
            f"{r['peak_mb']:>8.0f} "
            f"{'imported' if r['tf'] else 'not imported'}")


if __name__ == "__main__":
  main()
