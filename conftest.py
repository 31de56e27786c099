"""Shared test settings: warnings policy and environments for subprocesses.

JAX deprecation warnings are errors everywhere, in this process and in every
subprocess a test starts (through `subprocess_env`). The single ignore is
ml_collections' config loader, which uses importlib's deprecated
`load_module()`; that is not ours to fix.
"""

import os
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
  env.update(extra)
  return env


def pytest_configure(config):
  config.addinivalue_line(
      "filterwarnings",
      "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def python_executable() -> str:
  return sys.executable
