"""The config each run keeps under its `checkpoint_dir`, and what changed.

"What did I run?" must have an answer from a run's directory alone. At
start-up the chief writes the resolved config (jaxline's defaults filled in,
command-line overrides applied) twice: `config.json` for programs and
`config.py`, a `get_config()` that runs again with `--config=`. Training
keeps it at the top of `checkpoint_dir`; an eval job beside its logs, in
`checkpoint_dir/<mode>`. A resume under another config, or an eval job whose
config is not the training's, logs every changed key with both values, and a
resume keeps the replaced pair as `config.<time written>.json` and `.py`.

These files are records, never inputs: nothing here runs or imports them,
and the JSON is only ever compared.
"""

import datetime
import json
import os
from typing import Any, Dict, List, Mapping, Optional

from absl import logging
from etils import epath
from ml_collections import config_dict
import numpy as np

from jaxline import config_code

CONFIG_JSON = "config.json"
CONFIG_PY = "config.py"
# Changed keys listed in one log line; the files hold the rest.
_MAX_LOGGED = 40


def json_value(value: Any) -> Any:
  """A config leaf as JSON: objects by import path or address-free repr."""
  if isinstance(value, config_dict.FieldReference):
    value = value.get()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return [json_value(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  name = getattr(value, "__qualname__", None)
  if name is not None and getattr(value, "__module__", None):
    return f"{value.__module__}.{name}"  # A function or a class.
  return config_code.without_address(repr(value))


def to_json(config: Any, *,
            defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """A ConfigDict or dict as nested JSON values; `defaults` added on top."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}
  items = dict(config or {})
  items.update(defaults or {})
  for key in sorted(items, key=str):
    value = items[key]
    if hasattr(value, "to_dict") or isinstance(value, dict):
      out[str(key)] = to_json(value)
    else:
      out[str(key)] = json_value(value)
  return out


def flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
  """A ConfigDict or (JSON) dict as {"a.b": JSON value}, for diffs."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  flat = {}
  for key, value in (config or {}).items():
    name = f"{prefix}{key}"
    if hasattr(value, "to_dict") or isinstance(value, dict):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = json_value(value)
  return flat


def changed_keys(saved: Mapping[str, Any],
                 current: Mapping[str, Any]) -> List[str]:
  """`key: old -> new` for every key that differs, sorted."""
  absent = "(absent)"
  # By repr, so that NaN equals NaN and 1 differs from 1.0 and True.
  return [f"{key}: {saved.get(key, absent)!r} -> {current.get(key, absent)!r}"
          for key in sorted(set(saved) | set(current))
          if repr(saved.get(key, absent)) != repr(current.get(key, absent))]


def _read(path: epath.Path) -> Optional[Dict[str, Any]]:
  """A recorded config, or None where there is none that can be read."""
  try:
    if not path.exists():
      return None
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    logging.warning("Could not read the recorded config %s (%s); it is "
                    "replaced.", path, e)
    return None
  return saved if isinstance(saved, dict) else None


def _write(path: epath.Path, text: str) -> None:
  """Writes through a temporary file, so a reader never sees half a file."""
  temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
  temporary.write_text(text)
  temporary.replace(path)


def _log_changes(what: str, path: epath.Path, saved: Dict[str, Any],
                 current: Dict[str, Any]) -> bool:
  changes = changed_keys(flatten(saved), flatten(current))
  if not changes:
    return False
  shown = changes[:_MAX_LOGGED]
  more = len(changes) - len(shown)
  logging.warning(
      "%s: %d config key(s) differ from %s (old -> new): %s%s", what,
      len(changes), path, "; ".join(shown),
      f"; and {more} more" if more else "")
  return True


def record(config: Any, *, mode: str, python_text: str,
           defaults: Optional[Mapping[str, Any]] = None) -> Optional[str]:
  """Writes the run's config files and logs what changed; the chief only.

  Returns the directory written to, or None when the config has no
  `checkpoint_dir`. A failure to write is logged, never fatal: the record
  must not cost a run.
  """
  root = config.get("checkpoint_dir", "")
  if not root:
    return None
  current = to_json(config, defaults=defaults)
  training = not mode.startswith("eval")
  directory = epath.Path(root) if training else epath.Path(root) / mode
  json_path = directory / CONFIG_JSON
  try:
    directory.mkdir(parents=True, exist_ok=True)
    if training:
      saved = _read(json_path)
      what = f"The config changed since the last run in {root}"
      if saved is not None and _log_changes(what, json_path, saved, current):
        _keep_previous(directory)
    else:
      saved = _read(epath.Path(root) / CONFIG_JSON)
      if saved is not None:
        _log_changes(f"The {mode} job's config is not the training job's",
                     epath.Path(root) / CONFIG_JSON, saved, current)
    _write(json_path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    _write(directory / CONFIG_PY, python_text)
  except OSError as e:
    logging.warning("Could not record the config in %s: %s", directory, e)
    return None
  logging.info("The resolved config is in %s and %s.", json_path,
               directory / CONFIG_PY)
  return os.fspath(directory)


def _keep_previous(directory: epath.Path) -> None:
  """Renames the replaced pair after the time it was written."""
  json_path = directory / CONFIG_JSON
  written = datetime.datetime.fromtimestamp(json_path.stat().mtime,
                                            tz=datetime.timezone.utc)
  stamp = written.strftime("%Y%m%d-%H%M%S")
  for name in (CONFIG_JSON, CONFIG_PY):
    old = directory / name
    if old.exists():
      stem, suffix = name.rsplit(".", 1)
      old.replace(directory / f"{stem}.{stamp}.{suffix}")
