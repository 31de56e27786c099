"""What importing jaxline imports (issue 12: start-up cost).

Importing jaxline and starting a run should add little to a plain JAX
script's time to its first step, so Orbax, tensorboardX, PIL and chex load
only when a run needs them (a disk checkpointer, a TensorBoard writer,
--jaxline_disable_pmap_jit), and TensorFlow and matplotlib never with a
run. Each check runs in a fresh interpreter: this test process has long
imported all of them.
"""

import json
import sys

import chex
import pytest

from conftest import run_python
from conftest import subprocess_env
from jaxline import checkpointing
from jaxline import platform
from jaxline import utils
from jaxline import writers

_TIMEOUT_SECS = 120
_HEAVY = ("orbax", "tensorboardX", "PIL", "tensorflow", "matplotlib", "chex")


def _run(code: str) -> dict:
  """Runs `code` in a fresh interpreter; returns the JSON it printed last."""
  result = run_python([sys.executable, "-c", code], timeout=_TIMEOUT_SECS,
                      env=subprocess_env())
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


_LOADED = f"[m for m in {_HEAVY!r} if m in sys.modules]"


def test_importing_jaxline_loads_no_heavy_modules():
  loaded = _run(
      "import json, sys\n"
      "from jaxline import platform, experiment, train, utils\n"
      f"print(json.dumps({_LOADED}))\n")
  assert loaded == []


def test_heavy_modules_load_when_a_run_needs_them():
  # The default factories with a checkpoint_dir: TensorBoard and Orbax.
  seen = _run(
      "import json, sys, tempfile\n"
      "from jaxline import base_config, platform\n"
      "config = base_config.get_base_config()\n"
      "config.checkpoint_dir = tempfile.mkdtemp()\n"
      f"before = {_LOADED}\n"
      "writer = platform.create_writer(config, 'train')\n"
      f"with_writer = {_LOADED}\n"
      "checkpointer = platform.create_checkpointer(config, 'train')\n"
      f"with_checkpointer = {_LOADED}\n"
      "writer.close(); checkpointer.close()\n"
      "print(json.dumps(dict(before=before, with_writer=with_writer,\n"
      "    with_checkpointer=with_checkpointer,\n"
      "    writer=type(writer).__name__,\n"
      "    checkpointer=type(checkpointer).__name__)))\n")
  assert seen == dict(before=[], with_writer=["tensorboardX", "PIL"],
                      with_checkpointer=["orbax", "tensorboardX", "PIL"],
                      writer="TensorBoardLogger",
                      checkpointer="DiskCheckpointer")


def test_module_attributes_loaded_on_first_use_are_the_modules():
  assert platform.checkpointing is checkpointing
  assert platform.chex is chex
  assert utils.chex is chex
  assert platform.TensorBoardLogger is writers.TensorBoardLogger
  for module in (platform, utils):
    with pytest.raises(AttributeError, match="no_such_name"):
      getattr(module, "no_such_name")
