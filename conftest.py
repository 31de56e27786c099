"""Shared test settings: warnings policy and environments for subprocesses.

JAX deprecation warnings are errors everywhere, in this process and in every
subprocess a test starts (through `subprocess_env`). The single ignore is
ml_collections' config loader, which uses importlib's deprecated
`load_module()`; that is not ours to fix.
"""

import os
import signal
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

PYTHONWARNINGS = ",".join([
    "error::DeprecationWarning",
    "error::FutureWarning",
    "ignore:the load_module() method is deprecated:DeprecationWarning",
])


def subprocess_env(num_devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment for a test subprocess with `num_devices` CPU devices."""
  env = dict(os.environ)
  env["PYTHONWARNINGS"] = PYTHONWARNINGS
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  env["PYTHONUNBUFFERED"] = "1"
  # Python tracebacks of every thread on a fatal signal; see run_python.
  env["PYTHONFAULTHANDLER"] = "1"
  env.update(extra)
  return env


def run_python(command: list[str], *, timeout: float,
               **popen_kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run(command)` with text output, failing the test on a hang.

  A command still running after `timeout` seconds gets SIGABRT, so that its
  faulthandler (on through `subprocess_env`) prints where every thread is,
  and the test fails with that output instead of a bare timeout.
  """
  process = subprocess.Popen(command, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             **popen_kwargs)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGABRT)
    try:
      stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()
      stdout, stderr = process.communicate()
    pytest.fail(f"Still running after {timeout} s, so stopped: {command}\n"
                f"stdout:\n{stdout[-3000:]}\nstderr (with the stacks):\n"
                f"{stderr[-20000:]}")
  return subprocess.CompletedProcess(command, process.returncode, stdout,
                                     stderr)


def read_events(directory):
  """The event files under `directory`, read with TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0,
                                     event_accumulator.TENSORS: 0,
                                     event_accumulator.IMAGES: 0})
  accumulator.Reload()
  return accumulator


def pytest_configure(config):
  config.addinivalue_line(
      "filterwarnings",
      "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def fresh_jaxline_state():
  """Parsed absl flags and an empty in-memory checkpoint store.

  Tests that run `train`/`evaluate`/`platform.main` in this process share
  `utils.GLOBAL_CHECKPOINT_DICT`; modules opt in with
  `pytestmark = pytest.mark.usefixtures("fresh_jaxline_state")`.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxline import utils  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  utils.GLOBAL_CHECKPOINT_DICT = {}
  yield
  utils.GLOBAL_CHECKPOINT_DICT = {}


@pytest.fixture
def python_executable() -> str:
  return sys.executable
