"""Forged and old checkpoints, restored through the real `DiskCheckpointer`.

A checkpoint is untrusted input: a file from a colleague, a bucket, a
download. Each test writes a genuine checkpoint with Orbax, edits its JSON
items (`meta/metadata`, `host/process_0.json`) or its directory entries as
an attacker could, and restores it. A payload that would run code touches a
marker file if it ran; the marker must stay absent, and the restore must
refuse naming what it refused (or, for damage, fall back to the checkpoint
before). The last test restores a checkpoint that jaxline 0.1.0 wrote.
"""

import base64
import dataclasses
import importlib.util
import json
import logging as pylogging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import uuid

from conftest import run_python
from conftest import subprocess_env
# The classes a forged checkpoint names are looked up only in modules that
# are loaded; this one is, so that its refusal is the allow-list's.
import etils.epy.lazy_imports_utils  # pylint: disable=unused-import
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxline import base_config
from jaxline import checkpointing
from jaxline import experiment
from jaxline import serialization
from jaxline import utils

_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "testdata")
_V010 = os.path.join(_TESTDATA, "checkpoint_v0_1_0")
_LAZY_MODULE = "etils.epy.lazy_imports_utils:LazyModule"


class _Exp(experiment.AbstractExperiment):
  """Optimizer state in CHECKPOINT_ATTRS, a host dict beside it."""

  CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_host": "host_state"}

  def __init__(self, mode, init_rng=None):
    super().__init__(mode=mode, init_rng=init_rng)
    self._params = None
    self._opt_state = None
    self._host = None

  def fill(self, seed):
    params = {"linear": {"w": jnp.full((3, 2), seed, jnp.float32),
                         "b": jnp.arange(2, dtype=jnp.float32) + seed}}
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    _, opt_state = optimizer.update(
        jax.tree.map(jnp.ones_like, params), opt_state, params)
    self._params = utils.bcast_local_devices(params)
    self._opt_state = utils.bcast_local_devices(opt_state)
    self._host = {"seed": seed, "seen": np.arange(seed + 1, dtype=np.int32),
                  "pair": (seed, "x")}

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


pytestmark = pytest.mark.usefixtures("fresh_jaxline_state")


def _config(root, **overrides):
  config = base_config.get_base_config()
  config.checkpoint_dir = str(root)
  config.max_checkpoints_to_keep = 5
  for key, value in overrides.items():
    config[key] = value
  return config


def _open(config, mode="train", exp_class=_Exp, key=None):
  """A checkpointer and experiment as `train.train` sets them up."""
  checkpointer = checkpointing.DiskCheckpointer(config, mode,
                                                async_save=False)
  exp = exp_class(mode)
  state = checkpointer.get_experiment_state("latest")
  state.global_step = 0
  state.experiment_module = exp
  state.train_step_rng = exp.initialize_train_step_rng(
      jax.random.PRNGKey(0) if key is None else key)
  return checkpointer, exp, state


def _save(config, seed, step):
  checkpointer, exp, state = _open(config)
  try:
    exp.fill(seed)
    state.global_step = step
    checkpointer.save("latest")
  finally:
    checkpointer.close()


def _series(root):
  return os.path.join(str(root), "checkpoints", "latest")


def _steps_on_disk(root):
  return sorted(n for n in os.listdir(_series(root)))


@pytest.fixture(scope="module")
def _genuine(tmp_path_factory):
  """A run with steps 1 and 2, written once and copied by each test."""
  root = tmp_path_factory.mktemp("genuine") / "run"
  config = _config(root)
  _save(config, seed=1, step=1)
  _save(config, seed=2, step=2)
  return root


@pytest.fixture
def run(tmp_path, _genuine):
  root = tmp_path / "run"
  shutil.copytree(_genuine, root, symlinks=True)
  return root


def _edit(path, change):
  with open(path) as f:
    data = json.load(f)
  change(data)
  with open(path, "w") as f:
    json.dump(data, f)


def _meta_path(root, step=2):
  return os.path.join(_series(root), str(step), "meta", "metadata")


def _host_path(root, step=2):
  return os.path.join(_series(root), str(step), "host", "process_0.json")


def _plant(root, location, node, step=2):
  """Puts `node` into the step's `meta` (optax state) or `host` item."""
  if location == "meta":
    def change(meta):  # In place of the ScaleByAdamState node.
      assert meta["entries"]["opt_state"]["c"][0]["t"] == "namedtuple"
      meta["entries"]["opt_state"]["c"][0] = node
    _edit(_meta_path(root, step), change)
  else:
    def change(host):
      entry = host["entries"]["host_state"]
      entry["k"].append(["str", f"planted_{len(entry['k'])}"])
      entry["c"].append(node)
    _edit(_host_path(root, step), change)


def _assert_untouched(exp, state):
  assert exp._params is None and exp._opt_state is None
  assert exp._host is None and state.global_step == 0


def _assert_reader_gets_step_2(run):
  """An eval reader picks, and restores, the run's own step 2."""
  reader, exp, state = _open(_config(run), mode="eval")
  try:
    assert reader.restore_path("latest").endswith(os.sep + "2")
    reader.restore("latest")
  finally:
    reader.close()
  _assert_step(exp, state, seed=2, step=2)


def _assert_step(exp, state, seed, step):
  assert state.global_step == step
  assert exp._host["seed"] == seed
  w = np.asarray(utils.get_first(exp._params)["linear"]["w"])
  np.testing.assert_array_equal(w, np.full((3, 2), seed, np.float32))


# --- Payloads that would run code --------------------------------------------


def _py(value):
  if isinstance(value, list):
    return {"t": "list", "c": [_py(v) for v in value]}
  if value is None:
    return {"t": "none"}
  if value == {}:
    return {"t": "dict", "cls": None, "k": [], "c": []}
  return {"t": "py", "v": value}


def _module_file(tmp_path, marker):
  """A module on sys.path, never imported, whose import touches `marker`."""
  name = "jaxline_forged_" + uuid.uuid4().hex
  (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""\
      import dataclasses
      import typing
      open({str(marker)!r}, "w").close()

      class Point(typing.NamedTuple):
        x: typing.Any
        y: typing.Any

      @dataclasses.dataclass
      class Box:
        x: typing.Any
        y: typing.Any
      """))
  return name


_TARGETS = ["os:system", "subprocess:Popen", "builtins:eval", "module",
            "lazy_module"]


def _payload(kind, target, marker, module):
  """(class name, node) for one forged node of `kind` naming `target`."""
  if target == "os:system":
    fields = {"command": f"touch {marker}"}
  elif target == "subprocess:Popen":
    fields = {"args": ["touch", str(marker)]}
  elif target == "builtins:eval":
    fields = {"source": f"open({str(marker)!r}, 'w')"}
  elif target == "module":
    target = f"{module}:{'Box' if kind == 'dataclass' else 'Point'}"
    fields = {"x": 1, "y": 2}
  else:
    target = _LAZY_MODULE
    fields = {"module_name": module, "adhoc_kwargs": None,
              "error_callback": None, "success_callback": None,
              "_submodules": {}}
  children = [_py(v) for v in fields.values()]
  node = {"namedtuple": {"t": "namedtuple", "cls": target, "c": children},
          "dataclass": {"t": "dataclass", "cls": target, "f": list(fields),
                        "c": children},
          "dict": {"t": "dict", "cls": target,
                   "k": [["str", f] for f in fields], "c": children}}[kind]
  return target, node


def _poke(value):
  """Uses a restored value as an experiment would: attributes, repr."""
  seen = [value]
  while seen:
    x = seen.pop()
    repr(x)
    for name in ("Point", "x", "shape", "dtype"):
      try:
        getattr(x, name)
      except Exception:  # pylint: disable=broad-except
        pass
    if isinstance(x, dict):
      seen.extend(x.values())
    elif isinstance(x, (list, tuple)):
      seen.extend(x)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
      seen.extend(vars(x).values())


def _restore_refused(root, marker, **config_overrides):
  """Restores in train mode; returns the refusal. The marker stays absent."""
  checkpointer, exp, state = _open(_config(root, **config_overrides))
  refusal = None
  try:
    checkpointer.restore("latest")
  except serialization.RestoreRefusedError as e:
    refusal = e
  finally:
    checkpointer.close()
  if refusal is None:  # Whatever came back is used, as training would.
    _poke([exp._host, exp._opt_state, exp._params])
  assert not marker.exists(), "restoring ran code named by the checkpoint"
  assert refusal is not None, "the forged checkpoint was restored"
  _assert_untouched(exp, state)
  return str(refusal)


@pytest.mark.parametrize("location", ["host", "meta"])
@pytest.mark.parametrize("kind", ["dataclass", "namedtuple", "dict"])
@pytest.mark.parametrize("target", _TARGETS)
def test_forged_class_node_is_refused_without_running_code(
    run, tmp_path, monkeypatch, location, kind, target):
  marker = tmp_path / "marker"
  module = _module_file(tmp_path, marker)
  monkeypatch.syspath_prepend(str(tmp_path))
  name, node = _payload(kind, target, marker, module)
  _plant(run, location, node)
  message = _restore_refused(run, marker)
  assert repr(name) in message
  # Refused by the allow-list (which says how to allow a class), not by a
  # later check that a permissive lookup would have to get past.
  assert "allow-list" in message and "register_checkpoint_class" in message
  assert module not in sys.modules


@pytest.mark.parametrize("target", _TARGETS)
def test_payloads_touch_the_marker_when_run(tmp_path, monkeypatch, target):
  """The payloads above are live: built as a permissive decoder would."""
  marker = tmp_path / "marker"
  module = _module_file(tmp_path, marker)
  monkeypatch.syspath_prepend(str(tmp_path))
  kind = "dataclass" if target == "lazy_module" else "namedtuple"
  name, node = _payload(kind, target, marker, module)
  module_name, qualname = name.split(":")
  cls = getattr(importlib.import_module(module_name), qualname)
  args = [_plain(c) for c in node["c"]]
  try:
    if target == "lazy_module":  # Filled in as decode fills a dataclass.
      lazy = object.__new__(cls)
      for field, value in zip(node["f"], args):
        object.__setattr__(lazy, field, value)
      getattr(lazy, "Point")
    else:
      result = cls(*args)
      if hasattr(result, "wait"):
        result.wait()
    assert marker.exists()
  finally:
    sys.modules.pop(module, None)


def _plain(node):
  """The Python value of a payload child node."""
  if node["t"] == "py":
    return node["v"]
  if node["t"] == "list":
    return [_plain(c) for c in node["c"]]
  return {} if node["t"] == "dict" else None


class _OpensOnUnpickle:
  """Unpickling it calls `open(marker, "w")`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("location", ["host", "meta"])
def test_pickle_payload_is_refused_without_the_flag(run, tmp_path, location):
  marker = tmp_path / "marker"
  payload = base64.b64encode(pickle.dumps(_OpensOnUnpickle(marker))).decode()
  _plant(run, location, {"t": "pickle", "b64": payload})
  message = _restore_refused(run, marker)
  assert "checkpoint_allow_pickle" in message
  # The payload is live: a user who opts in to pickle runs it.
  checkpointer, exp, _ = _open(_config(run, checkpoint_allow_pickle=True))
  try:
    checkpointer.restore("latest")
  except Exception:  # pylint: disable=broad-except
    assert location == "meta"  # A file object is no optax state.
  finally:
    checkpointer.close()
  assert marker.exists()
  if location == "host":
    exp._host["planted_3"].close()  # The file that unpickling opened.


def test_refusal_is_raised_in_eval_mode_too(run, tmp_path):
  marker = tmp_path / "marker"
  _, node = _payload("namedtuple", "os:system", marker, "unused")
  _plant(run, "host", node)
  reader, exp, state = _open(_config(run), mode="eval")
  try:
    assert reader.restore_path("latest").endswith(os.sep + "2")
    with pytest.raises(serialization.RestoreRefusedError,
                       match="os:system.*allow-list"):
      reader.restore("latest")
  finally:
    reader.close()
  _assert_untouched(exp, state)
  assert not marker.exists()


# --- Symbolic links and odd step entries -------------------------------------


def _outside_copy(root, tmp_path, step, name):
  """Moves a genuine step out of checkpoint_dir, with a sentinel file in it."""
  outside = tmp_path / name
  shutil.move(os.path.join(_series(root), str(step)), outside)
  (outside / "sentinel").write_text("keep me")
  return outside, sorted(p.name for p in outside.iterdir())


def test_symlinked_steps_are_never_read_and_only_unlinked(run, tmp_path):
  # A newer step, written by another run (seed 9), linked in from outside;
  # an older genuine step replaced by a link to where it was moved.
  other = tmp_path / "other_run"
  _save(_config(other), seed=9, step=5)
  newer, newer_files = _outside_copy(other, tmp_path, 5, "outside_newer")
  older, older_files = _outside_copy(run, tmp_path, 1, "outside_older")
  os.symlink(newer, os.path.join(_series(run), "5"))
  os.symlink(older, os.path.join(_series(run), "1"))

  # A reader does not follow them (nor remove them: it only reads).
  _assert_reader_gets_step_2(run)
  assert os.path.islink(os.path.join(_series(run), "5"))

  # A trainer resumes from step 2 and saves on; rotation (keep 2) would
  # delete steps 1 and 2 and reach into the links.
  config = _config(run, max_checkpoints_to_keep=2)
  writer, exp, state = _open(config)
  try:
    writer.restore("latest")
    _assert_step(exp, state, seed=2, step=2)
    for step in (6, 7, 8):
      exp.fill(step)
      state.global_step = step
      writer.save("latest")
    writer.wait_for_checkpointing_to_finish()
  finally:
    writer.close()
  assert _steps_on_disk(run) == ["7", "8"]
  for target, files in ((newer, newer_files), (older, older_files)):
    assert sorted(p.name for p in target.iterdir()) == files
    assert (target / "sentinel").read_text() == "keep me"
    assert os.path.isdir(target / "meta") and os.path.isdir(target / "arrays")


def test_odd_step_entries_are_ignored(run, tmp_path):
  """A relative link out of the series, and names that are not steps."""
  other = tmp_path / "other_run"
  _save(_config(other), seed=9, step=9)
  outside = run / "outside"
  shutil.move(os.path.join(_series(other), "9"), outside)
  (outside / "sentinel").write_text("keep me")
  os.symlink("../../outside", os.path.join(_series(run), "9"))
  for name in ("..9", "9..", "..."):
    shutil.copytree(outside, os.path.join(_series(run), name))
  _assert_reader_gets_step_2(run)

  writer, exp, state = _open(_config(run, max_checkpoints_to_keep=2))
  try:
    writer.restore("latest")
    _assert_step(exp, state, seed=2, step=2)
    for step in (10, 11):
      exp.fill(step)
      state.global_step = step
      writer.save("latest")
  finally:
    writer.close()
  assert not os.path.lexists(os.path.join(_series(run), "9"))
  assert (outside / "sentinel").read_text() == "keep me"
  assert os.path.isdir(outside / "arrays")
  assert {"10", "11"} <= set(_steps_on_disk(run))
  assert "2" not in _steps_on_disk(run)


# --- Damage that must not allocate or crash ----------------------------------

_ABSURD_INLINE = [
    {"t": "np", "shape": [2**40, 2**20], "dtype": "float32",
     "b64": base64.b64encode(b"\0" * 8).decode()},
    {"t": "jax", "shape": [2**40, 2**20], "dtype": "float32", "key": None,
     "per_device": False, "spec": None,
     "b64": base64.b64encode(b"\0" * 8).decode()},
    {"t": "np", "empty": [[2**40, 2**20], "float32"]},
    {"t": "np", "empty": [[2**16, 2**16], "float32"]},
]


def _deep(depth):
  """A skeleton `depth` lists deep, as JSON text (json.dumps would recurse)."""
  return '{"t": "list", "c": [' * depth + '{"t": "none"}' + "]}" * depth


def _plant_deep(root, location, depth):
  path = _meta_path(root) if location == "meta" else _host_path(root)
  with open(path) as f:
    text = f.read()
  key = '"opt_state": ' if location == "meta" else '"host_state": '
  assert text.count(key) == 1
  with open(path, "w") as f:
    f.write(text.replace(key, key + _deep(depth) + ', "was_' +
                         key.strip(' :"') + '": ', 1))


def _restore_falls_back(root, caplog):
  checkpointer, exp, state = _open(_config(root))
  try:
    with caplog.at_level(pylogging.WARNING):
      checkpointer.restore("latest")
  finally:
    checkpointer.close()
  _assert_step(exp, state, seed=1, step=1)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == pylogging.WARNING and "step 2" in r.getMessage()]
  assert any("falling back" in m for m in warnings), caplog.text
  return warnings


@pytest.mark.parametrize("node", _ABSURD_INLINE,
                         ids=["np", "jax", "empty-absurd", "empty-16GiB"])
def test_absurd_inline_shapes_fall_back_without_allocating(run, caplog, node):
  _plant(run, "host", node)
  warnings = _restore_falls_back(run, caplog)
  assert any("DamagedCheckpointError" in m for m in warnings), warnings
  assert not any("MemoryError" in m for m in warnings), warnings


@pytest.mark.parametrize("location", ["meta", "host"])
def test_absurdly_deep_skeleton_falls_back_without_crashing(run, caplog,
                                                            location):
  _plant_deep(run, location, 100000)
  _restore_falls_back(run, caplog)
  # An eval job skips that step instead of dying.
  reader, exp, _ = _open(_config(run), mode="eval")
  try:
    assert reader.restore_path("latest").endswith(os.sep + "2")
    with pytest.raises(checkpointing.CheckpointUnavailableError):
      reader.restore("latest")
  finally:
    reader.close()
  assert exp._params is None


_LIMITED_RESTORE = """
import resource, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[2])
import forged_checkpoint_test as t
config = t._config(sys.argv[1])
checkpointer, exp, state = t._open(config)
jax.block_until_ready(state.train_step_rng)
with open("/proc/self/status") as f:
  vm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize")][0]
limit = vm + 2**30  # 1 GiB more than now: no absurd array fits.
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
  np.ones(2**31, np.uint8)
except MemoryError:
  print("limit works")
checkpointer.restore("latest")
checkpointer.close()
print("restored step", state.global_step, "seed", exp._host["seed"])
"""


def test_absurd_shapes_fail_under_an_address_space_limit(run):
  """In a process that cannot allocate 1 GiB more, the restore still works."""
  for node in _ABSURD_INLINE:
    _plant(run, "host", node)
  result = run_python(
      [sys.executable, "-c", _LIMITED_RESTORE, str(run),
       os.path.dirname(os.path.abspath(__file__))],
      timeout=180, env=subprocess_env(), cwd=os.path.dirname(_TESTDATA))
  assert result.returncode == 0, result.stderr[-5000:]
  assert "limit works" in result.stdout
  assert "restored step 1 seed 1" in result.stdout
  assert "falling back" in result.stderr
  assert "MemoryError" not in result.stderr


# --- Genuine checkpoints that must restore -----------------------------------


class _MixedKeys(_Exp):

  def fill(self, seed):
    super().fill(seed)
    self._host = {"name": "a", 3: np.arange(2, dtype=np.int32)}


def _save_then_restore(tmp_path, exp_class, *, seed):
  """Saves `exp_class` filled with `seed` at step 1; restores it anew."""
  config = _config(tmp_path / "run")
  checkpointer, exp, state = _open(config, exp_class=exp_class)
  try:
    exp.fill(seed)
    state.global_step = 1
    checkpointer.save("latest")
  finally:
    checkpointer.close()
  reader, exp, state = _open(config, exp_class=exp_class)
  try:
    reader.restore("latest")
  finally:
    reader.close()
  return exp, state


def test_host_dict_with_int_and_str_keys_restores(tmp_path):
  exp, state = _save_then_restore(tmp_path, _MixedKeys, seed=1)
  assert state.global_step == 1
  assert exp._host["name"] == "a"
  np.testing.assert_array_equal(exp._host[3], [0, 1])


def _v010_module():
  spec = importlib.util.spec_from_file_location(
      "jaxline_write_with_0_1_0",
      os.path.join(_V010, "write_with_0_1_0.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _V010Exp(experiment.AbstractExperiment):
  """The experiment of `write_with_0_1_0.py`, state created lazily."""

  CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_host": "host_state",
                                    "_position": "data_position"}

  def __init__(self, mode, init_rng=None):
    super().__init__(mode=mode, init_rng=init_rng)
    self._params = self._opt_state = self._host = None
    self._position = 0

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def _assert_bits(actual, expected, where):
  assert type(actual) is type(expected) or (
      isinstance(actual, jax.Array) and isinstance(expected, jax.Array)), (
          where, type(actual), type(expected))
  if jax.dtypes.issubdtype(getattr(expected, "dtype", None),
                           jax.dtypes.prng_key):
    assert jax.random.key_impl(actual) == jax.random.key_impl(expected)
    actual, expected = (jax.random.key_data(actual),
                        jax.random.key_data(expected))
  if isinstance(expected, (jax.Array, np.ndarray, np.generic)):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), (
        where, actual.dtype, expected.dtype)
    assert actual.tobytes() == expected.tobytes(), where
  else:
    assert actual == expected, where


def _assert_same(actual, expected, where="value"):
  """Same containers (types, keys, order) and leaves (types, dtypes, bits)."""
  if isinstance(expected, dict):
    assert type(actual) is type(expected), where
    assert list(actual) == list(expected), where
    for key in expected:
      _assert_same(actual[key], expected[key], f"{where}[{key!r}]")
  elif isinstance(expected, (list, tuple)):
    assert type(actual) is type(expected), (where, type(actual))
    assert len(actual) == len(expected), where
    for i, (a, e) in enumerate(zip(actual, expected)):
      _assert_same(a, e, f"{where}[{i}]")
  else:
    _assert_bits(actual, expected, where)


def _restore_v010(tmp_path, mode):
  root = tmp_path / "old_run"
  shutil.copytree(_V010, root)
  writer = _v010_module()
  checkpointer, exp, state = _open(_config(root), mode=mode,
                                   exp_class=_V010Exp, key=jax.random.key(0))
  try:
    if mode == "eval":
      assert checkpointer.restore_path("latest").endswith(
          os.sep + str(writer.STEP))
    checkpointer.restore("latest")
  finally:
    checkpointer.close()
  return writer, exp, state


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoint_written_by_0_1_0_restores_bit_identical(tmp_path, mode):
  writer, exp, state = _restore_v010(tmp_path, mode)
  params, opt_state, host = writer.values()
  assert state.global_step == writer.STEP and type(state.global_step) is int
  _assert_same(utils.get_first(exp._params), params, "params")
  _assert_same(utils.get_first(exp._opt_state), opt_state, "opt_state")
  seen = host.pop("seen")  # Its dtype: see the test below.
  np.testing.assert_array_equal(exp._host.pop("seen"), seen)
  _assert_same(exp._host, host, "host_state")
  assert exp._position == 42 and type(exp._position) is int
  assert utils.get_first(exp._params)["mlp/~/linear_1"]["w"].dtype == (
      ml_dtypes.bfloat16)
  assert type(utils.get_first(exp._opt_state)[1][0]).__name__ == (
      "ScaleByAdamState")
  # Per-device values are back on every local device.
  for leaf in jax.tree.leaves(exp._params):
    assert leaf.shape[0] == jax.local_device_count()
  keys = state.train_step_rng
  assert jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(keys)[0], [0, 5])


# Numpy leaves must come back as numpy with their saved dtype: read as
# jax.Arrays they would be 32-bit without jax_enable_x64.


def test_checkpoint_written_by_0_1_0_keeps_numpy_int64(tmp_path):
  writer, exp, _ = _restore_v010(tmp_path, "train")
  _assert_same(exp._host["seen"], writer.values()[2]["seen"], "seen")


class _ShardedNumpy(_Exp):
  """Sharded style: CHECKPOINT_ATTRS values are saved and restored as is."""

  _jaxline_experiment_style = "sharded"
  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {}

  def fill(self, seed):
    self._params = {"ids": np.arange(3, dtype=np.int64) + 2**40 + seed}


def test_numpy_int64_in_checkpoint_attrs_keeps_its_values(tmp_path):
  exp, state = _save_then_restore(tmp_path, _ShardedNumpy, seed=0)
  assert state.global_step == 1
  ids = exp._params["ids"]
  assert type(ids) is np.ndarray and ids.dtype == np.int64
  np.testing.assert_array_equal(ids, np.arange(3) + 2**40)
