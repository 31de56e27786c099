"""Naming the experiment class: what imports, and the errors for what not."""

import functools
import sys

import pytest

from jaxline import experiment
from jaxline import runner


class Experiment(experiment.AbstractExperiment):

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}

  class Inner:
    pass


# A module-level partial (jax_privacy's way) is an experiment class too.
make_experiment = functools.partial(Experiment)


@pytest.mark.parametrize("name,expected", [
    ("jaxline.runner_test:Experiment", Experiment),
    ("jaxline.runner_test.Experiment", Experiment),
    ("jaxline.runner_test:Experiment.Inner", Experiment.Inner),
    ("jaxline.runner_test:make_experiment", make_experiment),
])
def test_a_class_imports_by_its_module_and_name(name, expected):
  assert runner.import_experiment_class(name) is expected


@pytest.mark.parametrize("name,message", [
    ("Experiment", "does not name a module and a class"),
    ("jaxline/runner_test.py:Experiment", "not a file path"),
    ("jaxline.runner_test:", "does not name a module and a class"),
    ("jaxline.runner_test:Experimant",
     r"has no attribute 'Experimant'. Experiment classes it defines: "
     r"\['Experiment'\]"),
    ("jaxline.no_such_module:Experiment",
     "there is no module 'jaxline.no_such_module'"),
    ("no_such_package.mod:Experiment", "there is no module 'no_such_package'"),
    ("jaxline.runner_test:pytest", "names a module, not a class"),
    ("jaxline.runner:KEY", "names a str, not a class"),
])
def test_what_cannot_be_imported_is_named(name, message):
  with pytest.raises(runner.ExperimentClassError, match=message) as info:
    runner.import_experiment_class(name)
  assert repr(name) in str(info.value)


def test_an_error_inside_the_module_is_raised_with_a_note(tmp_path,
                                                          monkeypatch):
  (tmp_path / "broken_experiment_module.py").write_text(
      "raise RuntimeError('bad module')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(RuntimeError, match="bad module") as info:
    runner.import_experiment_class("broken_experiment_module:Experiment")
  assert any("raised while importing 'broken_experiment_module'" in note
             for note in info.value.__notes__)
  sys.modules.pop("broken_experiment_module", None)
