"""Runs an experiment file as `__main__` with `jax.pmap` made to raise.

  python sharded_no_pmap.py <experiment.py> --config=<experiment.py> [flags]

`jax.pmap` is replaced before jaxline or the experiment is imported, so a
call from anywhere (the harness, the experiment, a name bound by `from jax
import pmap`) fails the run with `NO_PMAP_MESSAGE`.
"""

import runpy
import sys

import jax

NO_PMAP_MESSAGE = "jax.pmap was called in a run that must not use pmap"


def _no_pmap(*args, **kwargs):
  del args, kwargs
  raise AssertionError(NO_PMAP_MESSAGE)


def _forbid_pmap():
  jax.pmap = _no_pmap
  # The module jax.pmap comes from, in case code looks it up there.
  module = sys.modules.get(getattr(_real_pmap, "__module__", ""), None)
  if module is not None and getattr(module, "pmap", None) is _real_pmap:
    module.pmap = _no_pmap


_real_pmap = jax.pmap

if __name__ == "__main__":
  _forbid_pmap()
  script = sys.argv[1]
  sys.argv = sys.argv[1:]
  runpy.run_path(script, run_name="__main__")
