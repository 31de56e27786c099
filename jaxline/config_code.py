"""A resolved config written back out as a Python `get_config()`.

`--jaxline_print_config`, the copy of the config that every run keeps under
its `checkpoint_dir` and the golden files of `jaxline.golden_configs` all use
this one form, so that what a run did can be read, diffed and run again
(`--config=<the printed file>`). Each line holds one leaf, in sorted order,
and says where its value came from when that is not the config file itself:
the command line, a jaxline default, or another key through a
`FieldReference` (printed as its value, since the file is a record of one
run). A value that Python cannot write as a literal is named by its import
path where it has one (and rebuilt from it), and otherwise marked.
"""

import importlib
import keyword
import math
import re
from typing import Any, Collection, Dict, List, Mapping, Optional, Tuple

from ml_collections import config_dict
import numpy as np

FieldReference = config_dict.FieldReference

COMMAND_LINE = "set on the command line"
JAXLINE_DEFAULT = "jaxline default"
NOT_CODE = "NOT CODE"
# Small arrays are written out; a larger one is not a config value.
_MAX_ARRAY_SIZE = 64
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_IMPORTED = '''

def _imported(path):
  """The object at "module:qualified.name"; the config held it itself."""
  module, _, name = path.partition(":")
  value = importlib.import_module(module)
  for part in name.split("."):
    value = getattr(value, part)
  return value
'''


def import_path(value: Any) -> Optional[str]:
  """"module:qualname" when importing that gives back `value` itself."""
  module = getattr(value, "__module__", None)
  name = getattr(value, "__qualname__", None)
  if not isinstance(module, str) or not isinstance(name, str):
    return None
  if "<" in name or module == "__main__":
    return None  # A local or lambda, or a module run as a script.
  try:
    found = importlib.import_module(module)
    for part in name.split("."):
      found = getattr(found, part)
  except Exception:  # pylint: disable=broad-except
    return None
  return f"{module}:{name}" if found is value else None


class _Writer:
  """Turns values into code, recording which imports that needs."""

  def __init__(self):
    self.needs_numpy = False
    self.needs_imported = False

  def code(self, value: Any) -> Optional[str]:
    """Python that evaluates to `value`, or None when there is none."""
    if value is None or isinstance(value, (bool, str, bytes)):
      return repr(value)
    if type(value) is int:  # pylint: disable=unidiomatic-typecheck
      return repr(value)
    if type(value) is float:  # pylint: disable=unidiomatic-typecheck
      return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    if isinstance(value, (np.generic, np.ndarray, np.dtype)):
      return self._numpy(value)
    if isinstance(value, config_dict.ConfigDict):
      inner = self.code(value.to_dict())
      return None if inner is None else f"config_dict.ConfigDict({inner})"
    if type(value) in (list, tuple, set, frozenset):  # pylint: disable=unidiomatic-typecheck
      items = [self.code(v) for v in value]
      if any(i is None for i in items):
        return None
      if type(value) is tuple:  # pylint: disable=unidiomatic-typecheck
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
      if type(value) is list:  # pylint: disable=unidiomatic-typecheck
        return f"[{', '.join(items)}]"
      body = f"[{', '.join(sorted(items))}]"
      return f"{type(value).__name__}({body if items else ''})"
    if type(value) is dict:  # pylint: disable=unidiomatic-typecheck
      pairs = [(self.code(k), self.code(v)) for k, v in value.items()]
      if any(k is None or v is None for k, v in pairs):
        return None
      return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
    path = import_path(value)
    if path is not None:
      self.needs_imported = True
      return f"_imported({path!r})"
    return None

  def _numpy(self, value: Any) -> Optional[str]:
    if isinstance(value, np.dtype):
      if value.fields is not None:
        return None
      self.needs_numpy = True
      return f"np.dtype({value.name!r})"
    if value.dtype.kind not in "biufc" or value.size > _MAX_ARRAY_SIZE:
      return None
    self.needs_numpy = True
    if isinstance(value, np.generic):
      return f"np.{value.dtype.name}({value.item()!r})"
    return f"np.array({value.tolist()!r}, dtype=np.{value.dtype.name})"


def without_address(text: str) -> str:
  """A repr without the object's address, which differs in every process.

  Without it, a record is reproducible and an unchanged object does not
  show up as a change.
  """
  return _ADDRESS.sub("", text)


def describe(value: Any) -> str:
  """What a value that is not code is, for the mark on its line."""
  kind = type(value)
  text = without_address(repr(value).split("\n", 1)[0])
  if len(text) > 80:
    text = text[:77] + "..."
  return f"{kind.__module__}.{kind.__qualname__}: {text}"


def _leaves(config: Any, prefix: str = "",
            extra: Optional[Mapping[str, Any]] = None
            ) -> List[Tuple[str, Any, Optional[FieldReference]]]:
  """(dotted key, value, reference or None), each ConfigDict before its keys.

  `extra` holds top-level keys to add (jaxline's defaults), so that the
  config itself is never copied or changed: it may hold uncopyable objects.
  """
  held_items = dict(config.items(preserve_field_references=True))
  held_items.update(extra or {})
  out = []
  for key in sorted(held_items, key=str):
    held = held_items[key]
    name = f"{prefix}{key}"
    reference = held if isinstance(held, FieldReference) else None
    value = held.get() if reference is not None else held
    out.append((name, value, reference))
    if isinstance(value, config_dict.ConfigDict):
      out.extend(_leaves(value, name + "."))
  return out


def _target(name: str) -> str:
  """`config.a.b`, with item access where a key is not a plain attribute."""
  text = "config"
  for part in name.split("."):
    if (part.isidentifier() and not keyword.iskeyword(part) and
        not hasattr(config_dict.ConfigDict, part)):
      text += f".{part}"
    else:
      text += f"[{part!r}]"
  return text


def _sources(reference: FieldReference,
             named: Collection[int]) -> List[FieldReference]:
  """The named references a computed one reads, through any unnamed ones."""
  found, pending = [], [reference]
  while pending:
    item = pending.pop()
    # FieldReference has no public view of what it reads.
    value, ops = item._value, item._ops  # pylint: disable=protected-access
    parts = [value] + [a for op in ops for a in op.args]
    for part in parts:
      if not isinstance(part, FieldReference):
        continue
      if id(part) in named:
        found.append(part)
      else:
        pending.append(part)
  return found


def _references(leaves, command_line: Collection[str]
                ) -> Tuple[Dict[str, str], Dict[str, str]]:
  """(key -> "computed ..." mark, key -> the key it is linked to).

  Keys that share one reference are linked. Which of them was set is not
  recorded, so the one overridden on the command line counts as set, else
  the shallowest (the first, on a tie), and the others as linked to it. A
  value computed by operations on references is only marked: it is written
  as its value.
  """
  by_id: Dict[int, List[str]] = {}
  for name, _, reference in leaves:
    if reference is not None:
      by_id.setdefault(id(reference), []).append(name)
  owner = {ref_id: min(names, key=lambda n: (n not in command_line,
                                             n.count("."), n))
           for ref_id, names in by_id.items()}
  marks, links = {}, {}
  for name, value, reference in leaves:
    if reference is None:
      continue
    if owner[id(reference)] != name:
      marks[name] = f"computed: linked to config.{owner[id(reference)]}"
      if not isinstance(value, config_dict.ConfigDict):
        links[name] = owner[id(reference)]
      continue
    sources = _sources(reference, owner)
    if reference._ops or sources:  # pylint: disable=protected-access
      named = sorted({f"config.{owner[id(s)]}" for s in sources
                      if id(s) in owner})
      marks[name] = ("computed from " + ", ".join(named) if named else
                     "computed (a FieldReference)")
  return marks, links


def _get_ref(name: str) -> str:
  """Code for the reference held at dotted key `name`."""
  parent, _, key = name.rpartition(".")
  holder = _target(parent) if parent else "config"
  return f"{holder}.get_ref({key!r})"


def _placeholder(reference: Optional[FieldReference],
                 writer: _Writer) -> Optional[str]:
  """`config_dict.placeholder(T)` for a typed None, so overrides parse."""
  if reference is None or reference.get() is not None:
    return None
  field_type = reference.get_type()
  if field_type is None or field_type is type(None):
    return None
  if field_type in (int, float, str, bool, list, tuple, dict):
    type_code = field_type.__name__
  else:
    type_code = writer.code(field_type)
    if type_code is None:
      return None
  return f"config_dict.placeholder({type_code})"


def as_python(config: config_dict.ConfigDict, *,
              command_line: Collection[str] = (),
              defaults: Optional[Mapping[str, Any]] = None,
              title: str = "A resolved jaxline config.",
              notes: Collection[str] = ()) -> str:
  """The config as a config file whose `get_config()` rebuilds it.

  Args:
    config: the resolved config.
    command_line: dotted keys whose values came from `--config.<key>=`.
    defaults: top-level keys that the config lacks, with the values jaxline
      uses for them (`base_config.missing_defaults`); written and marked.
    title: the first line of the file's docstring.
    notes: further docstring lines, such as the command that printed it.
  """
  writer = _Writer()
  defaults = defaults or {}
  leaves = _leaves(config, extra=defaults)
  marks, links = _references(leaves, command_line)
  body, linked, not_code = [], [], []
  for name, value, reference in leaves:
    why = []
    if name in links:
      code = _get_ref(links[name])
    elif isinstance(value, config_dict.ConfigDict):
      code = "config_dict.ConfigDict()"
    else:
      code = _placeholder(reference, writer) or writer.code(value)
      if code is None:
        code = "None"
        not_code.append(name)
        why.append(f"{NOT_CODE}, set it by hand: {describe(value)}")
      elif code.startswith("_imported("):
        why.append("an object, by its import path")
    if name in command_line:
      why.append(COMMAND_LINE)
    if name in marks:
      why.append(marks[name])
    if name in defaults:
      why.append(JAXLINE_DEFAULT)
    line = f"  {_target(name)} = {code}"
    line += f"  # {'; '.join(why)}" if why else ""
    # Links come last, once the keys they point to exist.
    (linked if name in links else body).append(line)
  doc = [title] + ([""] + list(notes) if notes else [])
  if not_code:
    doc += ["", f"{len(not_code)} value(s) could not be written as code and "
            f"are None here ({NOT_CODE}): " + ", ".join(not_code) + "."]
  lines = ['r"""' + "\n".join(doc).rstrip() + '\n"""', ""]
  if writer.needs_imported:
    lines.append("import importlib")
    lines.append("")
  lines.append("from ml_collections import config_dict")
  if writer.needs_numpy:
    lines.append("import numpy as np")
  if writer.needs_imported:
    lines.append(_IMPORTED.rstrip("\n"))
  lines += ["", "", "def get_config():",
            "  config = config_dict.ConfigDict()"]
  lines += body
  if linked:
    lines.append("  # Keys that share one value (FieldReferences): an "
                 "override of one sets all.")
    lines += linked
  lines.append("  return config")
  return "\n".join(lines) + "\n"
