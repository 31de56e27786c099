"""Several real processes on 127.0.0.1, joined through jax.distributed.

Every process runs `tests/testdata/multihost_experiment.py` (or
`multihost_helpers.py`) with the same flags and its own
`--jaxline_process_id`, with 2 CPU devices each and JAX's default CPU
collectives (gloo), started by `multiprocess_job.Job`: a free coordinator
port, each process its own process group, killed at the end of the test
whatever happens, and a deadline on every wait.

The experiment's loss is a mean over a global batch that each process holds
one slice of, so it depends on every host's data; runs are compared with a
single process over the same global batch. Each process appends what `step`
and `evaluate` saw to `<record_dir>/<mode>_p<i>.jsonl`.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_file_loader

import multiprocess_job as jobs

_EXPERIMENT = os.path.join(jobs.TESTDATA, "multihost_experiment.py")
_HELPERS = os.path.join(jobs.TESTDATA, "multihost_helpers.py")
_SEED = 42
_REFERENCE_STEPS = 10
_TRAIN_STEPS = 6
_WATCHDOG_MESSAGE = "stopped responding (died or hung)"
_COORDINATOR_LOST_MESSAGES = (
    "Lost contact with the jax.distributed coordinator",
    "another task died",
)
# Whichever notices a dead peer first ends the survivor: jaxline's watchdog
# (exit status 3) or JAX's own error polling (an abort); both name process 1.
_PEER_1_LOST_MESSAGES = (
    "Process(es) [1] of 2 stopped responding",
    "tasks are unhealthy (stopped sending heartbeats):\n1",
)
_RESTORED_RE = re.compile(r"Returned checkpoint latest with id (\d+)\.")
_SAVED = "Saved checkpoint latest with id"
_RENDEZVOUS_DONE = "[jaxline] rendezvous finished."
_INITIALIZING = "Initializing jax.distributed"


def _load_experiment_module():
  spec = importlib.util.spec_from_file_location("multihost_experiment",
                                                _EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run_job(log_dir, name, args, num_processes, script=_EXPERIMENT,
             distributed=True):
  """Runs a job to the end; every process must succeed. Returns outputs."""
  with jobs.Job(log_dir, name, script, args, num_processes,
                distributed=distributed) as job:
    codes = job.wait()
    assert all(c == 0 for c in codes.values()), job.describe()
    return job.outputs(), {i: p.pid for i, p in job.processes.items()}


def _experiment_args(record_dir, *, config_arg="", checkpoint_dir=None,
                     extra=()):
  config = _EXPERIMENT + (f":{config_arg}" if config_arg else "")
  args = [f"--config={config}",
          f"--config.experiment_kwargs.config.record_dir={record_dir}"]
  if checkpoint_dir is not None:
    args.append(f"--config.checkpoint_dir={checkpoint_dir}")
  return args + list(extra)


def _records(record_dir, mode, process_id):
  path = os.path.join(str(record_dir), f"{mode}_p{process_id}.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f]


def _losses(records):
  return [r["loss"] for r in records]


def _event_files(directory):
  return sorted(glob.glob(os.path.join(str(directory), "events.out.*")))


def _scalar_tags_by_step(path):
  """{step: [tags]} of the summaries in one event file (data only)."""
  found = {}
  for event in event_file_loader.EventFileLoader(path).Load():
    tags = [v.tag for v in event.summary.value]
    if tags:
      found.setdefault(event.step, []).extend(tags)
  return found


def _pid_of_event_file(path):
  # TensorBoard names files events.out.tfevents.<time>.<host>.<pid>.<n>.
  return int(os.path.basename(path).split(".")[-2])


def _expected_pmap_keys(step, process_id, num_local_devices):
  """0.0.8's unique_host_unique_device keys of `step` on one process."""
  state = jax.random.split(jax.random.PRNGKey(_SEED))[0]
  for _ in range(step):
    state = jax.random.split(state)[1]
  key = jax.random.split(state)[0]
  key = jax.random.fold_in(key, process_id)
  return [np.asarray(jax.random.fold_in(key, d)).tolist()
          for d in range(num_local_devices)]


def _expected_sharded_key(step):
  state = jax.random.split(jax.random.PRNGKey(_SEED))[0]
  for _ in range(step):
    state = jax.random.split(state)[1]
  return np.asarray(jax.random.split(state)[0]).tolist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process over the same global batch: the loss curve to match."""
  directory = tmp_path_factory.mktemp("reference")
  _run_job(directory, "reference",
           _experiment_args(directory, extra=[
               f"--config.training_steps={_REFERENCE_STEPS}"]),
           1, distributed=False)
  return _records(directory, "train", 0)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """A 2-process training run that checkpoints to disk."""
  directory = tmp_path_factory.mktemp("two_processes")
  checkpoint_dir = directory / "ckpt"
  outputs, pids = _run_job(
      directory, "train",
      _experiment_args(directory, checkpoint_dir=checkpoint_dir), 2)
  return dict(directory=directory, checkpoint_dir=checkpoint_dir,
              outputs=outputs, pids=pids,
              records={i: _records(directory, "train", i) for i in (0, 1)})


@pytest.fixture(scope="module")
def two_process_eval(tmp_path_factory, two_processes):
  """The eval job, run as 2 processes on a copy of the training checkpoint."""
  directory = tmp_path_factory.mktemp("two_process_eval")
  checkpoint_dir = directory / "ckpt"
  shutil.copytree(two_processes["checkpoint_dir"], checkpoint_dir)
  outputs, pids = _run_job(
      directory, "eval",
      _experiment_args(directory, checkpoint_dir=checkpoint_dir, extra=[
          "--jaxline_mode=eval", "--config.one_off_evaluate=True"]), 2)
  return dict(directory=directory, checkpoint_dir=checkpoint_dir,
              outputs=outputs, pids=pids,
              records={i: _records(directory, "eval", i) for i in (0, 1)})


def _copy_checkpoint(two_processes, tmp_path):
  checkpoint_dir = tmp_path / "ckpt"
  shutil.copytree(two_processes["checkpoint_dir"], checkpoint_dir)
  return checkpoint_dir


# ---------------------------------------------------------------------------
# Two processes: training, parity, keys, chief-only writes, rendezvous.


def test_two_processes_train_to_the_end(two_processes):
  for i in (0, 1):
    records = two_processes["records"][i]
    assert [r["step"] for r in records] == list(range(_TRAIN_STEPS))
    assert {(r["process"], r["processes"], r["devices"])
            for r in records} == {(i, 2, 4)}
    assert f"global_step: {_TRAIN_STEPS}," in two_processes["outputs"][i]


def test_loss_over_all_hosts_matches_single_process(two_processes,
                                                    reference):
  losses = [_losses(two_processes["records"][i]) for i in (0, 1)]
  # A pmean over every device of every process: the same on both hosts.
  assert losses[0] == losses[1]
  np.testing.assert_allclose(
      losses[0], _losses(reference[:_TRAIN_STEPS]), rtol=1e-5)
  np.testing.assert_allclose(two_processes["records"][0][-1]["params"],
                             reference[_TRAIN_STEPS - 1]["params"],
                             rtol=1e-5, atol=1e-6)
  # The first step's loss (zero parameters) is the mean of y**2 over the
  # global batch, which neither host's slice alone gives.
  module = _load_experiment_module()
  _, y = module.global_batch(0, 16)
  np.testing.assert_allclose(losses[0][0], np.mean(y ** 2), rtol=1e-5)
  for host_rows in (y[:8], y[8:]):
    assert not np.isclose(losses[0][0], np.mean(host_rows ** 2), rtol=1e-3)


def test_unique_host_keys_differ_across_hosts(two_processes, reference):
  records = two_processes["records"]
  for step in range(_TRAIN_STEPS):
    keys = records[0][step]["keys"] + records[1][step]["keys"]
    assert len({tuple(k) for k in keys}) == 4, keys  # Host and device.
    for i in (0, 1):
      assert records[i][step]["keys"] == _expected_pmap_keys(step, i, 2)
    # Process 0's keys are a single process's keys.
    assert records[0][step]["keys"] == reference[step]["keys"]


def test_every_process_saves_and_only_the_chief_logs(two_processes):
  outputs = two_processes["outputs"]
  for i in (0, 1):  # Saves are collective: each writes its own part.
    assert re.findall(r"Saved checkpoint latest with id (\d+)\.",
                      outputs[i]) == ["2", "4", "6"]
  # Every TensorBoard summary comes from the chief.
  chief_pid = two_processes["pids"][0]
  data = {}
  for path in _event_files(two_processes["checkpoint_dir"] / "train"):
    tags = _scalar_tags_by_step(path)
    if tags:
      assert _pid_of_event_file(path) == chief_pid, path
      data.update(tags)
  assert sorted(data) == [2, 4, 6]
  assert all("loss" in tags for tags in data.values())


def test_the_runner_starts_processes_with_the_same_flags(tmp_path):
  """`python -m jaxline` takes the --jaxline_* process flags too."""
  checkpoint_dir = tmp_path / "ckpt"
  outputs, _ = _run_job(
      tmp_path, "runner", _experiment_args(
          tmp_path, checkpoint_dir=checkpoint_dir, extra=[
              "--config.training_steps=2",
              "--config.experiment_class=multihost_experiment:Experiment"]),
      2, script=["-m", "jaxline"])
  for i in (0, 1):
    assert _INITIALIZING in outputs[i]
    assert re.findall(r"Saved checkpoint latest with id (\d+)\.",
                      outputs[i])[-1] == "2"
  assert len(_records(tmp_path, "train", 1)) == 2  # Process 1 trained.
  # The chief alone keeps the run's config.
  with open(checkpoint_dir / "config.json") as f:
    assert json.load(f)["training_steps"] == 2
  assert "The resolved config is in" in outputs[0]
  assert "The resolved config is in" not in outputs[1]


def test_non_chief_processes_create_no_tensorboard_files(two_processes,
                                                         two_process_eval):
  for run, mode in ((two_processes, "train"), (two_process_eval, "eval")):
    pids = {_pid_of_event_file(p)
            for p in _event_files(run["checkpoint_dir"] / mode)}
    assert pids == {run["pids"][0]}, (mode, pids, run["pids"])


def test_every_process_joins_the_final_rendezvous(two_processes):
  for i in (0, 1):
    assert _RENDEZVOUS_DONE in two_processes["outputs"][i]


def test_sharding_helpers_and_rendezvous_across_processes(tmp_path):
  _run_job(tmp_path, "helpers", [f"--out={tmp_path}"], 2, script=_HELPERS)
  module_rows = np.arange(8, dtype=np.float32)
  everything = np.stack([module_rows, 10 * module_rows], axis=1)
  for i in (0, 1):
    with open(tmp_path / f"helpers_p{i}.json") as f:
      result = json.load(f)
    assert result["joined"]
    assert (result["process"], result["processes"]) == (i, 2)
    assert (result["devices"], result["local_devices"]) == (4, 2)
    assert result["mesh_devices"] == result["all_devices"]
    # Each process gave its own 4 rows; the global batch has all 8.
    assert result["batch_shape"] == [8, 2]
    assert not result["batch_fully_addressable"]
    assert result["local_row_starts"] == [4 * i, 4 * i + 2]
    np.testing.assert_array_equal(result["batch_on_host"], everything)
    np.testing.assert_array_equal(result["double_buffered_on_host"],
                                  [everything, 2 * everything])
    assert result["total"] == float(everything.sum())
    assert result["replicated_w"] == [1.0, 2.0]
    assert result["replicated_n"] == 7
    assert result["replicated_everywhere"]
    np.testing.assert_array_equal(result["sharded_on_host"], everything)
    assert result["key_impl"] == "threefry2x32"
    assert result["key_data"] == [0, 5]
    # The rendezvous returned only once the late process had arrived.
    assert result["saw_late_process"]


# ---------------------------------------------------------------------------
# Restoring: the same step everywhere, and in a single process.


def test_every_process_restores_the_same_step(two_processes, reference,
                                              tmp_path):
  checkpoint_dir = _copy_checkpoint(two_processes, tmp_path)
  outputs, _ = _run_job(
      tmp_path, "resume",
      _experiment_args(tmp_path, checkpoint_dir=checkpoint_dir, extra=[
          f"--config.training_steps={_REFERENCE_STEPS}"]), 2)
  for i in (0, 1):
    assert _RESTORED_RE.findall(outputs[i]) == [str(_TRAIN_STEPS)]
    records = _records(tmp_path, "train", i)
    assert [r["step"] for r in records] == list(
        range(_TRAIN_STEPS, _REFERENCE_STEPS))
    for r in records:
      assert r["keys"] == _expected_pmap_keys(r["step"], i, 2)
    # The run goes on as if it had never stopped.
    np.testing.assert_allclose(_losses(records),
                               _losses(reference[_TRAIN_STEPS:]), rtol=1e-5)


def test_eval_job_with_two_processes(two_process_eval, two_processes):
  trained = two_processes["records"][0][-1]
  results = []
  for i in (0, 1):
    assert _RESTORED_RE.findall(two_process_eval["outputs"][i]) == [
        str(_TRAIN_STEPS)]
    (record,) = two_process_eval["records"][i]
    assert record["step"] == _TRAIN_STEPS
    assert record["host_steps"] == _TRAIN_STEPS
    assert record["processes"] == 2
    assert record["params"] == trained["params"]
    results.append(record["eval_loss"])
  # A pmean over both hosts' halves of the eval batch: one value.
  assert results[0] == results[1]


def test_checkpoint_restores_in_a_single_process(two_processes, reference,
                                                 tmp_path):
  checkpoint_dir = _copy_checkpoint(two_processes, tmp_path)
  outputs, _ = _run_job(tmp_path, "single", _experiment_args(
      tmp_path, checkpoint_dir=checkpoint_dir, extra=[
          f"--config.training_steps={_REFERENCE_STEPS}"]), 1,
                        distributed=False)
  assert _RESTORED_RE.findall(outputs[0]) == [str(_TRAIN_STEPS)]
  records = _records(tmp_path, "train", 0)
  assert [r["step"] for r in records] == list(
      range(_TRAIN_STEPS, _REFERENCE_STEPS))
  assert {(r["processes"], r["devices"]) for r in records} == {(1, 2)}
  # The key state came back too: process 0's keys carry on.
  assert [r["keys"] for r in records] == [
      r["keys"] for r in reference[_TRAIN_STEPS:]]
  np.testing.assert_allclose(_losses(records),
                             _losses(reference[_TRAIN_STEPS:]), rtol=1e-5)


def test_every_process_writes_its_part_of_each_checkpoint(tmp_path):
  # With or without train_checkpoint_all_hosts: saves are collective.
  with jobs.Job(tmp_path, "all_hosts", _EXPERIMENT, _experiment_args(
      tmp_path, checkpoint_dir=tmp_path / "ckpt", extra=[
          "--config.training_steps=2",
          "--config.train_checkpoint_all_hosts=True"]), 2) as job:
    codes = job.wait(timeout=60)
    outputs = job.outputs()
  assert codes == {0: 0, 1: 0}, job.describe()
  for i in (0, 1):
    assert _SAVED in outputs[i]
  root = tmp_path / "ckpt" / "checkpoints"
  assert sorted(os.listdir(root)) == ["latest"]  # The claim was released.
  step = root / "latest" / "2"
  # (Orbax >= 0.12.3 adds its own commit_success.txt there.)
  assert sorted(n for n in os.listdir(step / "host")
                if n != "commit_success.txt") == [
                    "process_0.json", "process_1.json"]
  hosts = [json.loads((step / "host" / f"process_{i}.json").read_text())
           for i in (0, 1)]
  # Each process recorded its own host state (its own step count).
  assert [h["process_index"] for h in hosts] == [0, 1]
  assert all(h["fields"]["global_step"] == {"t": "py", "v": 2}
             for h in hosts)
  meta = json.loads((step / "meta" / "metadata").read_text())
  assert meta["process_count"] == 2 and "params" in meta["entries"]
  with ocp.StandardCheckpointer() as reader:
    arrays = reader.metadata(step / "arrays")
  # Orbax < 0.11.22 returns the tree itself; later ones wrap it.
  arrays = getattr(arrays, "item_metadata", arrays)
  arrays = getattr(arrays, "tree", arrays)
  referenced = re.findall(r'"i": "(\d+)"', json.dumps(meta["entries"]))
  assert referenced and sorted(arrays) == sorted(set(referenced))


# ---------------------------------------------------------------------------
# Four processes, and the sharded style across processes.


def test_four_processes(tmp_path, reference):
  outputs, _ = _run_job(
      tmp_path, "four",
      _experiment_args(tmp_path, checkpoint_dir=tmp_path / "ckpt"), 4)
  keys = set()
  for i in range(4):
    records = _records(tmp_path, "train", i)
    assert [r["step"] for r in records] == list(range(_TRAIN_STEPS))
    assert {(r["processes"], r["devices"]) for r in records} == {(4, 8)}
    np.testing.assert_allclose(_losses(records),
                               _losses(reference[:_TRAIN_STEPS]), rtol=1e-5)
    keys.update(tuple(k) for k in records[0]["keys"])
    assert _SAVED in outputs[i]  # Every process writes its part.
    assert _RENDEZVOUS_DONE in outputs[i]
  assert len(keys) == 8  # Every device of every host has its own key.


def test_sharded_style_across_processes(tmp_path, reference):
  checkpoint_dir = tmp_path / "ckpt"
  _run_job(tmp_path, "sharded",
           _experiment_args(tmp_path, config_arg="sharded",
                            checkpoint_dir=checkpoint_dir), 2)
  records = {i: _records(tmp_path, "train", i) for i in (0, 1)}
  for i in (0, 1):
    assert [r["step"] for r in records[i]] == list(range(_TRAIN_STEPS))
    # One key per step, the same on every host: split(state)[0].
    assert [r["keys"] for r in records[i]] == [
        [_expected_sharded_key(s)] for s in range(_TRAIN_STEPS)]
    np.testing.assert_allclose(_losses(records[i]),
                               _losses(reference[:_TRAIN_STEPS]), rtol=1e-5)
  assert records[0] == [dict(r, process=0) for r in records[1]]

  # The multi-process checkpoint restores in one process, on its mesh.
  outputs, _ = _run_job(tmp_path, "sharded_eval", _experiment_args(
      tmp_path, config_arg="sharded", checkpoint_dir=checkpoint_dir, extra=[
          "--jaxline_mode=eval", "--config.one_off_evaluate=True"]), 1,
                        distributed=False)
  assert _RESTORED_RE.findall(outputs[0]) == [str(_TRAIN_STEPS)]
  (evaluation,) = _records(tmp_path, "eval", 0)
  assert evaluation["params"] == records[0][-1]["params"]


# ---------------------------------------------------------------------------
# Failures: a dead process, and processes that never connect.


@pytest.mark.parametrize("victim", [1, 0], ids=["non_chief", "chief"])
def test_killed_process_fails_the_others_within_60s(tmp_path, victim):
  args = _experiment_args(tmp_path, extra=[
      "--config.training_steps=1000",
      "--config.experiment_kwargs.config.step_sleep_secs=0.3"])
  with jobs.Job(tmp_path, "kill", _EXPERIMENT, args, 2) as job:
    jobs.wait_for_text(job, victim, "step 3 done", timeout=120)
    # SIGKILL of the python process itself: no chance to say goodbye.
    os.kill(job.processes[victim].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = 1 - victim
    ended = jobs.exit_times(job, [survivor], timeout=90)
    elapsed = ended[survivor] - killed_at
    code = job.processes[survivor].returncode
    output = job.output(survivor)
  assert code != 0, output[-4000:]
  assert elapsed < 60, (elapsed, output[-4000:])
  if victim == 0:
    # The coordinator is gone: the watchdog or JAX itself says so.
    assert any(m in output for m in _COORDINATOR_LOST_MESSAGES), output[-4000:]
  else:
    assert any(m in output for m in _PEER_1_LOST_MESSAGES), output[-4000:]


def test_process_that_raises_fails_the_others_within_60s(tmp_path):
  args = _experiment_args(tmp_path, extra=[
      "--config.training_steps=1000",
      "--config.experiment_kwargs.config.step_sleep_secs=0.3",
      "--config.experiment_kwargs.config.fail_at_step=3",
      "--config.experiment_kwargs.config.fail_process=1"])
  with jobs.Job(tmp_path, "raise", _EXPERIMENT, args, 2) as job:
    jobs.wait_for_text(job, 1, "Deliberate failure at step 3", timeout=120)
    failed_at = time.monotonic()
    ended = jobs.exit_times(job, [0, 1], timeout=60)
    outputs = job.outputs()
    codes = {i: p.returncode for i, p in job.processes.items()}
  assert codes[1] != 0, outputs[1][-4000:]
  assert codes[0] != 0, outputs[0][-4000:]
  assert any(m in outputs[0] for m in _PEER_1_LOST_MESSAGES), outputs[0][-4000:]
  assert ended[0] - failed_at < 60


def test_too_few_processes_fail_at_start_up(tmp_path):
  # Three processes announced, two started: both give up at start-up.
  args = _experiment_args(tmp_path, extra=["--config.training_steps=2"])
  with jobs.Job(tmp_path, "few", _EXPERIMENT, args, 3,
                start_ids=[0, 1]) as job:
    started = {}
    for i in (0, 1):
      jobs.wait_for_text(job, i, _INITIALIZING, timeout=120)
      started[i] = time.monotonic()
    ended = jobs.exit_times(job, [0, 1], timeout=100)
    elapsed = {i: ended[i] - started[i] for i in (0, 1)}
    outputs = job.outputs()
    codes = {i: p.returncode for i, p in job.processes.items()}
  for i in (0, 1):
    assert codes[i] != 0, outputs[i][-4000:]
    # Start-up gives up after initialization_timeout (50 s), plus JAX's
    # own few seconds of RPC deadline: within the 60 s.
    assert elapsed[i] < 60, (i, elapsed[i], outputs[i][-4000:])
    assert "for 3 processes" in outputs[i]
    assert "DEADLINE_EXCEEDED" in outputs[i], outputs[i][-4000:]
    assert "Training with config" not in outputs[i]
