"""A config written as code must rebuild the same config, and say what it is."""

import importlib.util
import math

import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import optax
import pytest

from jaxline import base_config
from jaxline import config_code


def _load(text, tmp_path, name="printed"):
  path = tmp_path / f"{name}.py"
  path.write_text(text)
  spec = importlib.util.spec_from_file_location(f"_test_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _leaves(config, prefix=""):
  out = []
  for key, value in sorted(config.items(), key=lambda kv: str(kv[0])):
    if isinstance(value, config_dict.ConfigDict):
      out.append((f"{prefix}{key}", "ConfigDict", ""))
      out += _leaves(value, f"{prefix}{key}.")
    elif isinstance(value, float) and math.isnan(value):
      out.append((f"{prefix}{key}", "float", "nan"))
    elif isinstance(value, (set, frozenset)):
      # A set's repr follows its insertion order and string hashes.
      out.append((f"{prefix}{key}", type(value).__name__,
                  repr(sorted(value))))
    else:
      out.append((f"{prefix}{key}", type(value).__name__, repr(value)))
  return out


def _line(text, target):
  found = [l.strip() for l in text.splitlines()
           if l.strip().startswith(target + " = ")]
  assert len(found) == 1, (target, text)
  return found[0]


def _rich_config():
  config = config_dict.ConfigDict()
  config.steps = 100
  config.rate = 1e-3
  config.name = "run"
  config.raw = b"\x00x"
  config.flag = False
  config.nothing = None
  config.typed_none = config_dict.placeholder(int)
  config.shape = (3, 4)
  config.single = (7,)
  config.empty_tuple = ()
  config.layers = [16, 32]
  config.tags = {"b", "a"}
  config.nested_list = [{"a": 1, "b": (2.5,)}]
  config.inf = float("inf")
  config.nan = float("nan")
  config.np_scalar = np.float32(0.5)
  config.np_array = np.arange(4, dtype=np.int32)
  config.dtype = np.dtype("bfloat16") if hasattr(np, "bfloat16") else (
      np.dtype("float16"))
  config.jnp_type = jnp.float32
  config.optimizer = optax.adam
  config.model = config_dict.ConfigDict()
  config.model.width = 8
  config.model.empty = config_dict.ConfigDict()
  config.model["key with space"] = 1
  config.model["items"] = 2  # A ConfigDict method's name.
  config.model["class"] = 3  # A Python keyword.
  config.model.double = config.get_ref("steps") * 2 + 1
  config.model.steps = config.get_ref("steps")
  return config


def test_every_kind_of_value_round_trips(tmp_path):
  config = _rich_config()
  text = config_code.as_python(config)
  rebuilt = _load(text, tmp_path)
  assert _leaves(rebuilt) == _leaves(config)
  assert rebuilt.optimizer is optax.adam
  assert rebuilt.jnp_type is jnp.float32
  assert "NOT CODE" not in text


def test_lines_are_sorted_and_parents_come_first():
  text = config_code.as_python(_rich_config())
  body = text.split("def get_config():")[1].splitlines()
  targets = [l.split(" = ")[0].strip() for l in body if " = " in l]
  assert targets.index("config.model") < targets.index("config.model.width")
  top = [t for t in targets if t.count(".") == 1 and "[" not in t
         and t != "config.model.steps"]
  assert top == sorted(top)
  assert "config.model['key with space'] = 1" in text
  assert "config.model['items'] = 2" in text
  assert "config.model['class'] = 3" in text


def test_references_are_marked_and_links_survive(tmp_path):
  config = _rich_config()
  text = config_code.as_python(config)
  assert _line(text, "config.model.double").endswith(
      "= 201  # computed from config.steps")
  assert _line(text, "config.model.steps") == (
      "config.model.steps = config.get_ref('steps')  # computed: linked to "
      "config.steps")
  rebuilt = _load(text, tmp_path)
  rebuilt.steps = 5  # As --config.steps=5 would.
  assert rebuilt.model.steps == 5
  assert rebuilt.model.double == 201  # Written as its value: fixed.


def test_the_key_set_on_the_command_line_owns_a_link():
  config = config_dict.ConfigDict()
  config.a = 1
  config.b = config.get_ref("a")
  text = config_code.as_python(config, command_line={"b"})
  assert _line(text, "config.b") == "config.b = 1  # set on the command line"
  assert _line(text, "config.a") == (
      "config.a = config.get_ref('b')  # computed: linked to config.b")


def test_values_that_are_not_code_are_marked_and_listed(tmp_path):

  class Local:
    pass

  config = config_dict.ConfigDict()
  config.obj = Local()
  config.fn = lambda x: x
  config.big = np.zeros(1000)
  config.fine = 1
  text = config_code.as_python(config)
  for key in ("obj", "fn", "big"):
    assert _line(text, f"config.{key}").startswith(
        f"config.{key} = None  # NOT CODE, set it by hand: ")
  assert "<locals>.Local: " in _line(text, "config.obj")
  assert "0x" not in text  # No addresses: a record is reproducible.
  assert "3 value(s) could not be written as code" in text
  assert "big, fn, obj" in text
  rebuilt = _load(text, tmp_path)
  assert rebuilt.fine == 1 and rebuilt.obj is None


def test_objects_are_named_by_their_import_path():
  text = config_code.as_python(config_dict.ConfigDict({"opt": optax.sgd}))
  assert _line(text, "config.opt") == (
      f"config.opt = _imported('{optax.sgd.__module__}:sgd')  # an object, "
      "by its import path")
  assert config_code.import_path(optax.sgd) == f"{optax.sgd.__module__}:sgd"
  assert config_code.import_path(lambda: 0) is None
  assert config_code.import_path(3) is None


def test_typed_placeholders_take_overrides(tmp_path):
  config = config_dict.ConfigDict()
  config.data_dir = config_dict.placeholder(str)
  text = config_code.as_python(config)
  assert "config.data_dir = config_dict.placeholder(str)" in text
  rebuilt = _load(text, tmp_path)
  rebuilt.data_dir = "/data"
  with pytest.raises(TypeError):
    rebuilt.data_dir = 3  # Still typed, as the original was.


def test_jaxline_defaults_are_written_and_marked(tmp_path):
  config = base_config.get_base_config()
  text = config_code.as_python(
      config, defaults=base_config.missing_defaults(config),
      title="Title line.", notes=["From: here"])
  assert text.startswith('r"""Title line.\n\nFrom: here\n"""')
  assert _line(text, "config.terminate_on_nan") == (
      "config.terminate_on_nan = True  # jaxline default")
  assert _line(text, "config.step_timeout_secs") == (
      "config.step_timeout_secs = config_dict.placeholder(float)  # jaxline "
      "default")
  assert "# jaxline default" not in _line(text, "config.training_steps")
  assert "terminate_on_nan" not in config  # The config itself is unchanged.
  rebuilt = _load(text, tmp_path)
  assert _leaves(rebuilt) == _leaves(base_config.resolve(config))
