"""Runs multihost_experiment.py as if JAX had moved its private modules.

jaxline asks `jax._src.clusters` whether the run is a cluster job and
`jax._src.distributed` for the coordination client its watchdog polls. This
launcher makes both imports fail, as they would in a JAX release that moved
them. JAX's own code bound both modules when `jax` was imported, so JAX
itself keeps working: only jaxline's lookups see the change.
"""

import os
import runpy
import sys

import jax  # pylint: disable=unused-import  # JAX binds its modules first.

for _name in ("jax._src.clusters", "jax._src.distributed"):
  sys.modules[_name] = None  # `import` of it now raises ImportError.

if __name__ == "__main__":
  here = os.path.dirname(os.path.abspath(__file__))
  script = os.path.join(here, "multihost_experiment.py")
  sys.argv[0] = script
  runpy.run_path(script, run_name="__main__")
