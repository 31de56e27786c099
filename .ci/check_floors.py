"""Checks that the lowest-versions run really runs at the declared floors.

    python .ci/check_floors.py .ci/constraints-lowest.txt

Fails (exit 1, naming each problem) when a requirement's `>=` floor in
pyproject.toml (the core dependencies and the extras the run installs) is
not pinned at exactly that version in the constraints file, or when the
installed version differs from the pin. So raising a floor without updating
the constraints, or pip drifting from them, cannot pass unnoticed.
"""

import importlib.metadata
import os
import sys
import tomllib

from packaging import requirements
from packaging import utils
from packaging import version

# The extras installed by .ci/lowest; `examples` and `plot` list only
# packages that `test` lists too, at the same floors. A requirement whose
# environment marker is false here (TensorFlow's wheel for other platforms)
# is skipped.
CHECKED_EXTRAS = ("test", "examples", "plot", "tfds")


def _pins(path):
  pins = {}
  with open(path) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        req = requirements.Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line}: constraints pin with =="
        pins[utils.canonicalize_name(req.name)] = spec.version
  return pins


def main(constraints_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  declared = list(project["dependencies"])
  for extra in CHECKED_EXTRAS:
    declared += project["optional-dependencies"][extra]
  pins = _pins(constraints_path)
  problems = []
  for line in declared:
    req = requirements.Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
      continue
    name = utils.canonicalize_name(req.name)
    floors = [s.version for s in req.specifier if s.operator == ">="]
    if not floors:
      problems.append(f"{line}: no >= floor to test")
      continue
    pin = pins.get(name)
    if pin is None or version.Version(pin) != version.Version(floors[0]):
      problems.append(f"{line}: the constraints pin {name}=={pins.get(name)}, "
                      f"not the floor {floors[0]}")
  for name, pin in pins.items():
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue  # Pinned for an extra this run does not install.
    if version.Version(installed) != version.Version(pin):
      problems.append(f"{name}: {installed} installed, {pin} pinned")
  for problem in problems:
    print(f"check_floors: {problem}", file=sys.stderr)
  if problems:
    return 1
  print(f"check_floors: {len(declared)} requirements run at their floors.")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
