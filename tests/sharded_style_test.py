"""The sharded (global-array) style, run for real through platform.main.

`tests/testdata/sharded_experiment.py` is one model in both calling
conventions. Sharded-style runs go through `sharded_no_pmap.py`, which makes
`jax.pmap` raise before anything is imported, so a passing run used no pmap
anywhere in the process. Each run appends a JSON line per `step`/`evaluate`
call (loss, key, what the harness passed, checkpointed values and where they
live) to a record file, which the tests read.
"""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import subprocess_env

_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "testdata")
_EXPERIMENT = os.path.join(_TESTDATA, "sharded_experiment.py")
_NO_PMAP = os.path.join(_TESTDATA, "sharded_no_pmap.py")
_NO_PMAP_MESSAGE = "jax.pmap was called in a run that must not use pmap"
_TIMEOUT_SECS = 180
_SEED = 42  # The base config's random_seed.
_RESTORED_RE = re.compile(r"Returned checkpoint latest with id (\d+)\.")
_SAVED_RE = re.compile(r"Saved checkpoint latest with id (\d+)\.")


def _run(args, num_devices, *, style="sharded", no_pmap=None):
  """Runs the experiment file in a subprocess; returns (returncode, output).

  Sharded-style runs go through the no-pmap launcher unless `no_pmap` says
  otherwise. The child is its own process group, killed on any failure.
  """
  if no_pmap is None:
    no_pmap = style == "sharded"
  config = _EXPERIMENT + (":pmap" if style == "pmap" else "")
  command = [sys.executable] + ([_NO_PMAP] if no_pmap else []) + [
      _EXPERIMENT, f"--config={config}"] + list(args)
  process = subprocess.Popen(
      command, cwd=_TESTDATA, env=subprocess_env(num_devices),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  try:
    output, _ = process.communicate(timeout=_TIMEOUT_SECS)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  return process.returncode, output


def _run_ok(args, num_devices, **kwargs):
  returncode, output = _run(args, num_devices, **kwargs)
  assert returncode == 0, output[-6000:]
  assert _NO_PMAP_MESSAGE not in output
  return output


def _records(path, kind):
  with open(path) as f:
    entries = [json.loads(line) for line in f]
  return [e for e in entries if e["kind"] == kind]


def _expected_step_keys(first_step, count):
  """The sharded style's keys: key = split(state)[0], state = split(state)[1].

  The state starts from train_key = split(PRNGKey(seed))[0].
  """
  state = jax.random.split(jax.random.PRNGKey(_SEED))[0]
  keys = []
  for _ in range(first_step + count):
    pair = jax.random.split(state)
    keys.append(np.asarray(pair[0]).tolist())
    state = pair[1]
  return keys[first_step:]


def _events(directory):
  accumulator = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return accumulator


def _assert_replicated_scalar(placement, num_devices, dtype):
  assert placement["shape"] == []
  assert placement["dtype"] == dtype
  assert placement["replicated"]
  assert placement["on_data_mesh"]
  assert placement["num_devices"] == num_devices


def _assert_on_mesh(placement, num_devices):
  """Checkpointed arrays: replicated params and key, a data-sharded row loss."""
  assert placement["params"]["on_data_mesh"]
  assert placement["params"]["spec"] == []
  assert placement["params"]["replicated"]
  assert placement["params"]["num_devices"] == num_devices
  assert placement["row_loss"]["on_data_mesh"]
  assert placement["row_loss"]["spec"] == ["data"]
  assert placement["row_loss"]["shape"] == [8]
  assert placement["row_loss"]["num_devices"] == num_devices
  assert placement["row_loss"]["replicated"] == (num_devices == 1)
  assert placement["aux_key"]["typed_key"]
  assert placement["aux_key"]["on_data_mesh"]
  assert placement["aux_key"]["replicated"]
  assert placement["aux_key"]["num_devices"] == num_devices


@pytest.mark.parametrize("num_devices", [1, 4])
def test_trains_evaluates_and_checkpoints_without_pmap(tmp_path, num_devices):
  record = tmp_path / "record.jsonl"
  common = [f"--config.checkpoint_dir={tmp_path / 'ckpt'}",
            f"--config.experiment_kwargs.config.record_path={record}"]
  output = _run_ok(["--jaxline_mode=train"] + common, num_devices)
  assert [int(s) for s in _SAVED_RE.findall(output)][:3] == [2, 4, 6]

  steps = _records(record, "step")
  assert [s["step"] for s in steps] == list(range(6))
  for entry in steps:
    # No device axis: one replicated step and one replicated key.
    _assert_replicated_scalar(entry["global_step"], num_devices, "int32")
    assert entry["rng"]["shape"] == [2]
    assert entry["rng"]["dtype"] == "uint32"
    assert entry["rng"]["replicated"]
    assert entry["rng"]["num_devices"] == num_devices
    assert entry["devices"] == num_devices
    _assert_on_mesh(entry["placement"], num_devices)
  assert [s["key"] for s in steps] == _expected_step_keys(0, 6)
  assert steps[-1]["loss"] < steps[0]["loss"]
  train_events = _events(tmp_path / "ckpt" / "train")
  assert [e.step for e in train_events.Scalars("loss")] == [2, 4, 6]
  np.testing.assert_allclose(
      [e.value for e in train_events.Scalars("loss")],
      [steps[1]["loss"], steps[3]["loss"], steps[5]["loss"]], rtol=1e-6)

  # A separate eval job restores the checkpoint, arrays placed on the mesh.
  output = _run_ok(["--jaxline_mode=eval", "--config.one_off_evaluate=True"]
                   + common, num_devices)
  assert _RESTORED_RE.findall(output) == ["6"]
  (evaluation,) = _records(record, "eval")
  assert evaluation["step"] == 6
  _assert_replicated_scalar(evaluation["global_step"], num_devices, "int32")
  # The eval key is PRNGKey(seed) itself, one replicated key.
  assert evaluation["key"] == [0, _SEED]
  assert evaluation["rng"]["replicated"]
  _assert_on_mesh(evaluation["placement"], num_devices)
  last = steps[-1]
  assert evaluation["params"] == last["params"]
  assert evaluation["row_loss"] == last["row_loss"]
  assert evaluation["aux_key"] == last["aux_key"]
  eval_events = _events(tmp_path / "ckpt" / "eval")
  assert [e.step for e in eval_events.Scalars("eval_loss")] == [6]


def test_restores_on_another_device_count(tmp_path):
  record = tmp_path / "record.jsonl"
  reference = tmp_path / "reference.jsonl"
  common = [f"--config.checkpoint_dir={tmp_path / 'ckpt'}",
            f"--config.experiment_kwargs.config.record_path={record}"]
  _run_ok(["--jaxline_mode=train"] + common, 4)
  saved = _records(record, "step")[-1]
  assert saved["step"] == 5

  # Saved on 4 devices, read back whole on 2: the sharded row loss is
  # re-split over the new mesh, not sliced or re-broadcast.
  output = _run_ok(["--jaxline_mode=eval", "--config.one_off_evaluate=True"]
                   + common, 2)
  assert _RESTORED_RE.findall(output) == ["6"]
  (evaluation,) = _records(record, "eval")
  _assert_on_mesh(evaluation["placement"], 2)
  assert evaluation["params"] == saved["params"]
  assert evaluation["row_loss"] == saved["row_loss"]
  assert evaluation["aux_key"] == saved["aux_key"]

  # Training resumes on 2 devices where it stopped, with the next keys, and
  # follows an uninterrupted run.
  output = _run_ok(["--jaxline_mode=train", "--config.training_steps=8"]
                   + common, 2)
  assert _RESTORED_RE.findall(output) == ["6"]
  resumed = _records(record, "step")[6:]
  assert [s["step"] for s in resumed] == [6, 7]
  assert [s["key"] for s in resumed] == _expected_step_keys(6, 2)
  for entry in resumed:
    _assert_on_mesh(entry["placement"], 2)
    _assert_replicated_scalar(entry["global_step"], 2, "int32")

  _run_ok(["--jaxline_mode=train", "--config.training_steps=8",
           f"--config.experiment_kwargs.config.record_path={reference}"], 4)
  uninterrupted = _records(reference, "step")
  assert [s["key"] for s in uninterrupted[6:]] == [s["key"] for s in resumed]
  np.testing.assert_allclose([s["loss"] for s in resumed],
                             [s["loss"] for s in uninterrupted[6:]],
                             rtol=1e-5)
  np.testing.assert_allclose(resumed[-1]["row_loss"],
                             uninterrupted[-1]["row_loss"], rtol=1e-5)
  assert resumed[-1]["aux_key"] == uninterrupted[-1]["aux_key"]


@pytest.mark.parametrize("pmap_devices,sharded_devices", [(2, 2), (4, 1)])
def test_same_loss_curve_as_pmap_style(tmp_path, pmap_devices,
                                       sharded_devices):
  pmap_record = tmp_path / "pmap.jsonl"
  sharded_record = tmp_path / "sharded.jsonl"
  _run_ok(["--config.training_steps=8",
           f"--config.experiment_kwargs.config.record_path={pmap_record}"],
          pmap_devices, style="pmap")
  _run_ok(["--config.training_steps=8",
           f"--config.experiment_kwargs.config.record_path={sharded_record}"],
          sharded_devices)
  pmap_steps = _records(pmap_record, "step")
  sharded_steps = _records(sharded_record, "step")
  assert [s["step"] for s in pmap_steps] == list(range(8))
  assert [s["step"] for s in sharded_steps] == list(range(8))
  # The pmap style passes per-device steps; the sharded style a scalar.
  assert pmap_steps[0]["global_step"]["shape"] == [pmap_devices]
  assert sharded_steps[0]["global_step"]["shape"] == []
  # With random_mode_train="same_host_same_device", every device's pmap key
  # is the sharded style's key.
  assert [s["key"] for s in pmap_steps] == [s["key"] for s in sharded_steps]
  np.testing.assert_allclose([s["loss"] for s in sharded_steps],
                             [s["loss"] for s in pmap_steps], rtol=1e-5)
  np.testing.assert_allclose(sharded_steps[-1]["params"],
                             pmap_steps[-1]["params"], rtol=1e-5, atol=1e-6)
  losses = [s["loss"] for s in sharded_steps]
  assert min(losses[-2:]) < losses[0]


def test_pmap_guard_catches_pmap():
  """The launcher really fails a run that calls jax.pmap."""
  returncode, output = _run(["--config.training_steps=2"], 2, style="pmap",
                            no_pmap=True)
  assert returncode != 0
  assert _NO_PMAP_MESSAGE in output


def test_train_eval_multithreaded_in_memory_without_pmap(tmp_path):
  record = tmp_path / "record.jsonl"
  _run_ok(["--jaxline_mode=train_eval_multithreaded",
           f"--config.experiment_kwargs.config.record_path={record}"], 2)
  steps = _records(record, "step")
  evaluations = _records(record, "eval")
  assert [s["step"] for s in steps] == list(range(6))
  assert evaluations, "evaluate never ran"
  last = evaluations[-1]
  assert last["step"] == 6
  assert last["mode"] == "train_eval_multithreaded"
  # The in-memory checkpoint brings the arrays back whole, on the mesh.
  _assert_on_mesh(last["placement"], 2)
  assert last["params"] == steps[-1]["params"]
  assert last["row_loss"] == steps[-1]["row_loss"]
  assert last["aux_key"] == steps[-1]["aux_key"]
