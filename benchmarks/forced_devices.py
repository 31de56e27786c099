"""`--devices N` for benchmark scripts: N forced CPU devices, set before JAX
is imported (XLA reads the flag once), or "native" for JAX's own devices."""

import os


def requested(argv, default: str) -> str:
  """The `--devices` value, read before argparse so JAX sees the env."""
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--devices="):
      return arg.split("=", 1)[1]
  return default


def force(count: int) -> None:
  """Sets the host-platform device count in XLA_FLAGS (replacing any)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={count}")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ["JAX_PLATFORMS"] = "cpu"
