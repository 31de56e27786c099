r"""Golden files for configs: a test that fails when a config changes a run.

A config is code: a changed default, reference or preset changes what a run
does without any test failing. Each config file (and each of its variants)
is resolved as `--config=` would resolve it, written as the `get_config()`
that `--jaxline_print_config` prints, and compared with its golden file, so
that every change shows up as a diff in review. One test covers a project:

    from jaxline import golden_configs

    def test_configs_match_golden_files():
      golden_configs.check(["configs/*.py"], golden_dir="configs/golden")

A mismatch fails with the diff and the command that rewrites the files:

    JAXLINE_UPDATE_GOLDEN=1 python -m pytest configs_test.py
    python -m jaxline.golden_configs --update --golden_dir=configs/golden \
        'configs/*.py'

Variants are found by themselves: a config module's `GOLDEN_VARIANTS` or
`PRESETS` sequence, else the `<file>.py:<variant>` commands its docstring
shows; `path.py:variant` in the list names one explicitly. Golden files are
`<name>_<variant>.py` (`default` for `get_config()`), where the name is the
file's, or its directory's for a file called `config.py`. Each is itself a
config file that runs.
"""

import argparse
import dataclasses
import difflib
import glob
import importlib.util
import os
import re
import sys
from typing import Any, List, Optional, Sequence, Union

from ml_collections import config_dict

from jaxline import base_config
from jaxline import config_code

UPDATE_ENV = "JAXLINE_UPDATE_GOLDEN"
DEFAULT_VARIANT = "default"
# The first line of every golden file; only such files count as stale.
_MARK = "Golden config of "


@dataclasses.dataclass(frozen=True)
class Result:
  """What `check` looked at and, when updating, changed."""
  checked: List["ConfigId"]
  written: List[str]
  removed: List[str]


@dataclasses.dataclass(frozen=True)
class ConfigId:
  """One resolvable config: a file and a variant (None: `get_config()`)."""
  path: str  # As given, relative to the root where it was.
  variant: Optional[str]
  name: str

  @property
  def golden_name(self) -> str:
    return f"{self.name}_{self.variant or DEFAULT_VARIANT}.py"

  def __str__(self) -> str:
    return f"{self.path}:{self.variant}" if self.variant else self.path


def load_module(path: str) -> Any:
  """Imports a config file by path, as `--config=` does."""
  stem = re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(f"_golden_{stem}", path)
  if spec is None:
    raise ValueError(f"{path} is not a Python file.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(config_id: ConfigId, *, root: str = ".") -> config_dict.ConfigDict:
  """Calls get_config as `--config=<path>[:<variant>]` would."""
  module = load_module(os.path.join(root, config_id.path))
  if config_id.variant is None:
    return module.get_config()
  return module.get_config(config_id.variant)


def render(config_id: ConfigId, *, root: str = ".") -> str:
  """The golden text of one config: its resolved `get_config()`."""
  config = load(config_id, root=root)
  return config_code.as_python(
      config, defaults=base_config.missing_defaults(config),
      title=f"{_MARK}{config_id}, resolved.",
      notes=["Written by jaxline.golden_configs; do not edit by hand."])


def _variants(module: Any, path: str) -> List[str]:
  for attribute in ("GOLDEN_VARIANTS", "PRESETS"):
    names = getattr(module, attribute, None)
    if names is not None:
      return list(names)
  pattern = re.escape(os.path.basename(path)) + r":([A-Za-z0-9_][\w.\-]*)"
  found = re.findall(pattern, module.__doc__ or "")
  return sorted(set(v.rstrip(".") for v in found))


def _name(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  if stem == "config":
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
  return stem


def discover(patterns: Union[str, Sequence[str]], *,
             root: str = ".") -> List[ConfigId]:
  """Every config and variant that `patterns` name, in a stable order.

  A variant whose config equals the default's (a preset naming the
  default) gets no file of its own.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  ids = []
  for pattern in patterns:
    pattern, _, variant = pattern.partition(".py:")
    if variant:
      path = pattern + ".py"
      ids.append(ConfigId(path, variant, _name(path)))
      continue
    paths = sorted(glob.glob(pattern, root_dir=root))
    if not paths:
      raise ValueError(f"No config file matches {pattern!r} under "
                       f"{os.path.abspath(root)}.")
    for path in paths:
      default = ConfigId(path, None, _name(path))
      ids.append(default)
      text = _body(render(default, root=root))
      module = load_module(os.path.join(root, path))
      for name in _variants(module, path):
        config_id = ConfigId(path, name, default.name)
        if (config_id.golden_name != default.golden_name and
            _body(render(config_id, root=root)) != text):
          ids.append(config_id)
  seen = {}
  for config_id in ids:
    other = seen.setdefault(config_id.golden_name, config_id)
    if other.path != config_id.path:
      raise ValueError(
          f"{other} and {config_id} would share the golden file "
          f"{config_id.golden_name}: check them with two calls, each with "
          "its own golden_dir.")
  return list(dict.fromkeys(ids))


def _body(text: str) -> str:
  """The code without its docstring, which names the config."""
  return text.split('"""', 2)[-1]


def _update_commands(golden_dir: str, patterns: Sequence[str]) -> List[str]:
  commands = []
  test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
  if test:
    commands.append(f"{UPDATE_ENV}=1 python -m pytest '{test}'")
  commands.append("python -m jaxline.golden_configs --update "
                  f"--golden_dir={golden_dir} " +
                  " ".join(f"'{p}'" for p in patterns))
  return commands


def check(patterns: Union[str, Sequence[str]], golden_dir: str, *,
          update: Optional[bool] = None, root: str = ".") -> Result:
  """Checks (or rewrites) the golden file of every config `patterns` name.

  Args:
    patterns: config files, glob patterns, or `path.py:variant` entries,
      relative to `root`.
    golden_dir: the directory of the golden files, relative to `root`.
    update: rewrite the files instead of checking them. By default, when the
      environment variable JAXLINE_UPDATE_GOLDEN is set to a non-empty value
      other than 0.
    root: the directory the paths are relative to (the project root).

  Returns:
    The configs checked, and the golden files written and removed.

  Raises:
    AssertionError: a config differs from its golden file, or a golden file
      has no config; the message holds the diffs and the command that
      rewrites the files.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  if update is None:
    update = os.environ.get(UPDATE_ENV, "") not in ("", "0")
  directory = os.path.join(root, golden_dir)
  config_ids = discover(patterns, root=root)
  problems, written, removed = [], [], []
  for config_id in config_ids:
    current = render(config_id, root=root)
    path = os.path.join(directory, config_id.golden_name)
    golden = _read(path)
    if golden == current:
      continue
    if update:
      os.makedirs(directory, exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write(current)
      written.append(path)
    elif golden is None:
      problems.append(f"{path} is missing: {config_id} has no golden file.")
    else:
      problems.append(f"{path} no longer matches {config_id}:\n" + "".join(
          difflib.unified_diff(
              golden.splitlines(keepends=True),
              current.splitlines(keepends=True),
              fromfile=f"{config_id.golden_name} (golden)",
              tofile=f"{config_id} (now)")))
  for path in stale_files(config_ids, directory):
    if update:
      os.remove(path)
      removed.append(path)
    else:
      problems.append(f"{path} is stale: no config produces it.")
  if problems:
    raise AssertionError(
        "\n".join(problems) + "\nIf the change is intended, rewrite the "
        "golden files and review their diff:\n  " +
        "\n  ".join(_update_commands(golden_dir, patterns)))
  return Result(config_ids, written, removed)


def _read(path: str) -> Optional[str]:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


def stale_files(config_ids: Sequence[ConfigId], directory: str) -> List[str]:
  """Golden files in `directory` that none of `config_ids` produces."""
  wanted = {c.golden_name for c in config_ids}
  stale = []
  for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
    text = _read(path) or ""
    if os.path.basename(path) not in wanted and _MARK in text.split(
        "\n", 1)[0]:
      stale.append(path)
  return stale


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxline.golden_configs",
      description="Check (or, with --update, rewrite) the golden files of "
      "config files.")
  parser.add_argument("patterns", nargs="+",
                      help="Config files, globs or path.py:variant entries.")
  parser.add_argument("--golden_dir", required=True,
                      help="Where the golden files are.")
  parser.add_argument("--update", action="store_true",
                      help="Rewrite the golden files from the configs.")
  args = parser.parse_args(argv)
  try:
    result = check(args.patterns, args.golden_dir, update=args.update)
  except AssertionError as e:
    print(e)
    return 1
  for path in result.written:
    print(f"Wrote {path}")
  for path in result.removed:
    print(f"Removed {path}: no config produces it.")
  print(f"{len(result.checked)} configs checked, "
        f"{len(result.written) + len(result.removed)} golden files changed.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
