"""`python -m jaxline` in real subprocesses: every mode, the run's config.

The experiment lives in a package of its own (`myproject`) in a temporary
directory, as a user's would, with a flag of its own; the runner is started
from that directory, so only the config says what runs.
"""

import glob
import json
import os
import re
import sys
import textwrap

from ml_collections import config_dict
import pytest

import conftest
from jaxline import base_config
from jaxline import golden_configs

_TIMEOUT_SECS = 240

_EXPERIMENT = '''
from absl import flags
import jax
import jax.numpy as jnp
from jaxline import experiment
from jaxline import utils
import numpy as np

# A flag of the experiment's own: the runner must accept it.
_SCALE = flags.DEFINE_float("myproject_scale", 1.0, "Scales the loss.")


class Experiment(experiment.AbstractExperiment):
  CHECKPOINT_ATTRS = {"_w": "w"}

  def __init__(self, mode, init_rng, config):
    super().__init__(mode=mode, init_rng=init_rng)
    self._lr = config.lr
    self._w = utils.bcast_local_devices(jnp.zeros([2]))
    self._update = jax.pmap(self._update_fn, axis_name="i")

  def _update_fn(self, w, rng):
    x = jax.random.normal(rng, [8, 2])
    loss, grad = jax.value_and_grad(
        lambda w: jnp.mean((x @ w - x @ jnp.array([1.0, -1.0])) ** 2))(w)
    return w - self._lr * jax.lax.pmean(grad, "i"), jax.lax.pmean(loss, "i")

  def step(self, *, global_step, rng, writer):
    self._w, loss = self._update(self._w, rng)
    return {"loss": utils.get_first(loss) * _SCALE.value,
            "scale": np.float32(_SCALE.value)}

  def evaluate(self, *, global_step, rng, writer):
    return {"w0": utils.get_first(self._w)[0]}
'''

_CONFIG = '''
"""python -m jaxline --config=myproject/config.py"""
from jaxline import base_config
from ml_collections import config_dict


def get_config():
  config = base_config.get_base_config()
  config.experiment_class = "myproject.experiment:Experiment"
  config.training_steps = 4
  config.interval_type = "steps"
  config.save_checkpoint_interval = 2
  config.log_tensors_interval = 1
  config.log_train_data_interval = 1
  config.eval_poll_interval_secs = 0.2
  config.checkpoint_dir = "runs/my"
  config.experiment_kwargs = config_dict.ConfigDict({"config": {"lr": 0.1}})
  config.experiment_kwargs.config.steps = config.get_ref("training_steps")
  return config
'''


@pytest.fixture
def project(tmp_path):
  package = tmp_path / "myproject"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "experiment.py").write_text(textwrap.dedent(_EXPERIMENT))
  (package / "config.py").write_text(textwrap.dedent(_CONFIG))
  return tmp_path


def _runner(cwd, *args, timeout=_TIMEOUT_SECS):
  return conftest.run_python(
      [sys.executable, "-m", "jaxline", "--config=myproject/config.py",
       *args], timeout=timeout, cwd=cwd, env=conftest.subprocess_env(1))


def _ok(result):
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
  return result.stdout + result.stderr


def _metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _steps(run_dir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(
      str(run_dir / "checkpoints" / "latest" / "[0-9]*")))


def test_train_then_eval_then_resume_with_a_changed_key(project):
  run_dir = project / "runs" / "my"
  _ok(_runner(project, "--myproject_scale=2"))
  train = _metrics(run_dir / "train" / "metrics.jsonl")
  assert [m["step"] for m in train] == [1, 2, 3, 4]
  assert all(m["scale"] == 2.0 for m in train)  # Its own flag, parsed.
  assert _steps(run_dir)[-1] == 4

  # The saved config, read back: JSON for programs, Python for people.
  with open(run_dir / "config.json") as f:
    saved = json.load(f)
  assert saved["experiment_class"] == "myproject.experiment:Experiment"
  assert saved["training_steps"] == 4
  assert saved["experiment_kwargs"] == {"config": {"lr": 0.1, "steps": 4}}
  assert saved["terminate_on_nan"] is True  # Defaults filled in.
  module = golden_configs.load_module(str(run_dir / "config.py"))
  original = golden_configs.load(
      golden_configs.ConfigId("myproject/config.py", None, "myproject"),
      root=str(project))
  assert _typed_leaves(module.get_config()) == _typed_leaves(
      base_config.resolve(original))

  # A separate eval job follows the finished training and says which of
  # its keys differ from the training's.
  output = _ok(_runner(project, "--jaxline_mode=eval",
                       "--config.experiment_kwargs.config.lr=0.5"))
  assert re.search(r"The eval job's config is not the training job's: 1 "
                   r"config key\(s\) differ .*experiment_kwargs\.config\.lr: "
                   r"0\.1 -> 0\.5", output), output
  evals = _metrics(run_dir / "eval" / "metrics.jsonl")
  assert evals and evals[-1]["step"] == 4
  with open(run_dir / "eval" / "config.json") as f:
    assert json.load(f)["experiment_kwargs"]["config"]["lr"] == 0.5
  with open(run_dir / "config.json") as f:
    assert json.load(f) == saved  # Training's record is untouched.

  # Resuming with more steps logs each changed key with both values and
  # keeps the replaced record.
  output = _ok(_runner(project, "--config.training_steps=6"))
  assert re.search(
      r"config changed since the last run in runs/my: 2 config key\(s\) "
      r"differ from "
      r".*config\.json \(old -> new\): experiment_kwargs\.config\.steps: "
      r"4 -> 6; training_steps: 4 -> 6", output), output
  assert _steps(run_dir)[-1] == 6
  kept = sorted(glob.glob(str(run_dir / "config.*.json")))
  assert len(kept) == 1 and len(glob.glob(str(run_dir / "config.*.py"))) == 1
  with open(kept[0]) as f:
    assert json.load(f) == saved
  with open(run_dir / "config.py") as f:
    assert "config.training_steps = 6  # set on the command line" in f.read()


def test_train_eval_multithreaded(project):
  output = _ok(_runner(project, "--jaxline_mode=train_eval_multithreaded",
                       "--config.checkpoint_dir=runs/both"))
  run_dir = project / "runs" / "both"
  assert [m["step"] for m in _metrics(run_dir / "train" / "metrics.jsonl")
          ] == [1, 2, 3, 4]
  assert _metrics(run_dir / "eval" / "metrics.jsonl")[-1]["step"] == 4
  assert os.path.exists(run_dir / "config.json")
  # One job, one record: the eval thread does not write a second.
  assert not os.path.exists(run_dir / "eval" / "config.json")
  assert "differ" not in output


def test_dry_run_writes_nothing(project):
  output = _ok(_runner(project, "--jaxline_dry_run"))
  assert "dry run" in output.lower()
  assert not os.path.exists(project / "runs")


def test_print_config_marks_command_line_and_round_trips(project):
  result = _runner(project, "--jaxline_print_config",
                   "--config.training_steps=9")
  _ok(result)
  stdout = result.stdout
  assert "config.training_steps = 9  # set on the command line" in stdout
  assert ("config.experiment_kwargs.config.steps = config.get_ref("
          "'training_steps')  # computed: linked to config.training_steps"
          ) in stdout
  assert "config.terminate_on_nan = True  # jaxline default" in stdout
  assert not os.path.exists(project / "runs")
  # Saved as a file, it runs as the config and prints the same config.
  (project / "printed.py").write_text(stdout)
  again = conftest.run_python(
      [sys.executable, "-m", "jaxline", "--config=printed.py",
       "--jaxline_print_config"], timeout=_TIMEOUT_SECS, cwd=project,
      env=conftest.subprocess_env(1))
  _ok(again)
  body = lambda text: text.split('"""', 2)[2]
  unmarked = re.sub(r"  # (set on the command line|jaxline default)$", "",
                    body(stdout), flags=re.M)
  assert body(again.stdout) == unmarked


def test_the_existing_main_pattern_still_runs(project):
  (project / "myproject" / "main.py").write_text(textwrap.dedent('''
      import functools
      from absl import app
      from absl import flags
      from jaxline import platform
      from myproject.experiment import Experiment

      if __name__ == "__main__":
        flags.mark_flag_as_required("config")
        app.run(functools.partial(platform.main, Experiment))
      '''))
  result = conftest.run_python(
      [sys.executable, "-m", "myproject.main", "--config=myproject/config.py",
       "--config.checkpoint_dir=runs/main"], timeout=_TIMEOUT_SECS,
      cwd=project, env=conftest.subprocess_env(1))
  _ok(result)
  assert _steps(project / "runs" / "main")[-1] == 4
  assert os.path.exists(project / "runs" / "main" / "config.py")


@pytest.mark.parametrize("value,expected", [
    ("myproject.experiment:Experimnt",
     "module 'myproject.experiment' .* has no attribute 'Experimnt'\\. "
     "Experiment classes it defines: \\['Experiment'\\]"),
    ("myproject.nothing:Experiment",
     "there is no module 'myproject\\.nothing'.*run from the directory that "
     "holds 'myproject'"),
    ("myproject/experiment.py:Experiment",
     "does not name a module and a class.*not a file path"),
    ("myproject.experiment:jax", "names a module, not a class"),
])
def test_a_class_that_cannot_be_imported_is_one_clear_error(
    project, value, expected):
  result = _runner(project, f"--config.experiment_class={value}")
  assert result.returncode == 1
  assert re.search(expected, result.stderr), result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(project / "runs")


def test_an_error_inside_the_module_keeps_its_traceback(project):
  (project / "myproject" / "broken.py").write_text("import not_installed_x\n")
  result = _runner(project,
                   "--config.experiment_class=myproject.broken:Experiment")
  assert result.returncode != 0
  assert "Traceback" in result.stderr
  assert "No module named 'not_installed_x'" in result.stderr
  assert "raised while importing 'myproject.broken'" in result.stderr


def test_a_config_without_a_class_says_how_to_name_one(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(textwrap.dedent('''
      from jaxline import base_config
      def get_config():
        return base_config.get_base_config()
      '''))
  result = conftest.run_python(
      [sys.executable, "-m", "jaxline", f"--config={config}"],
      timeout=_TIMEOUT_SECS, cwd=tmp_path, env=conftest.subprocess_env(1))
  assert result.returncode == 1
  assert "config.experiment_class is not set" in result.stderr
  assert str(config) in result.stderr
  # Printing the config needs no class.
  printed = conftest.run_python(
      [sys.executable, "-m", "jaxline", f"--config={config}",
       "--jaxline_print_config"], timeout=_TIMEOUT_SECS, cwd=tmp_path,
      env=conftest.subprocess_env(1))
  assert printed.returncode == 0, printed.stderr
  assert "def get_config():" in printed.stdout


def _typed_leaves(config, prefix=""):
  leaves = []
  for key, value in sorted(config.items()):
    if isinstance(value, config_dict.ConfigDict):
      leaves += _typed_leaves(value, f"{prefix}{key}.")
    else:
      leaves.append((f"{prefix}{key}", type(value).__name__, repr(value)))
  return leaves


_EXAMPLES = golden_configs.discover("examples/*/config.py",
                                    root=conftest.REPO_ROOT)


@pytest.mark.parametrize("config_id", _EXAMPLES, ids=str)
def test_printed_example_config_rebuilds_the_same_config(config_id, tmp_path):
  result = conftest.run_python(
      [sys.executable, "-m", "jaxline", f"--config={config_id}",
       "--jaxline_print_config"], timeout=_TIMEOUT_SECS,
      cwd=conftest.REPO_ROOT, env=conftest.subprocess_env(1))
  assert result.returncode == 0, result.stderr[-5000:]
  path = tmp_path / "printed.py"
  path.write_text(result.stdout)
  rebuilt = golden_configs.load_module(str(path)).get_config()
  original = base_config.resolve(
      golden_configs.load(config_id, root=conftest.REPO_ROOT))
  assert _typed_leaves(rebuilt) == _typed_leaves(original)
