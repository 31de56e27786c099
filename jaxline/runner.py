"""`python -m jaxline --config=...`: one command for every experiment.

The config names its experiment (`config.experiment_class =
"package.module:Class"`), so a config file alone is a runnable experiment:
no `if __name__ == "__main__"` block, and an experiment inside a package
runs from any directory where the package imports. Every `--jaxline_*` flag
means what it means through an experiment's own `__main__`, because both end
in `platform.main`.

The class's module is imported after the config is read and before the rest
of the command line is parsed, so flags that module defines are accepted.
"""

import functools
import importlib
import inspect
import os
import sys
from typing import Any, List, Optional, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxline import experiment as experiment_lib
from jaxline import platform

FLAGS = flags.FLAGS
KEY = "experiment_class"


class ExperimentClassError(ValueError):
  """`config.experiment_class` names nothing that can be run."""


def _split(name: str) -> tuple[str, str]:
  if ":" in name:
    module, _, attribute = name.partition(":")
  else:
    module, _, attribute = name.rpartition(".")
  if not module or not attribute or module.endswith(".py") or "/" in module:
    raise ExperimentClassError(
        f"config.{KEY}={name!r} does not name a module and a class. Write "
        "'package.module:Class', with the module as you would import it (not "
        "a file path), e.g. 'examples.mnist.experiment:Experiment'.")
  return module, attribute


def _experiment_classes(module: Any) -> List[str]:
  """The experiment classes a module defines, to suggest one."""
  return sorted(
      name for name, value in vars(module).items()
      if inspect.isclass(value) and value.__module__ == module.__name__ and
      issubclass(value, experiment_lib.AbstractExperiment))


def import_experiment_class(name: str) -> Any:
  """The experiment class that `name` ("package.module:Class") names.

  Any callable passes, as `platform.main` takes any: a class, or a
  module-level `functools.partial` of one.

  Raises:
    ExperimentClassError: the module is not on sys.path, or has no such
      class. An error raised inside the module itself propagates as it is,
      with a note naming the key.
  """
  module_name, attribute = _split(name)
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    missing = e.name or ""
    if missing and (module_name == missing or
                    module_name.startswith(missing + ".")):
      raise ExperimentClassError(
          f"config.{KEY}={name!r}: there is no module {missing!r}. Modules "
          f"are found on sys.path, which starts with the current directory "
          f"({os.getcwd()}): run from the directory that holds "
          f"{module_name.split('.')[0]!r}, or install its package.") from None
    e.add_note(f"(raised while importing {module_name!r}, which "
               f"config.{KEY}={name!r} names)")
    raise
  except Exception as e:
    e.add_note(f"(raised while importing {module_name!r}, which "
               f"config.{KEY}={name!r} names)")
    raise
  value = module
  for part in attribute.split("."):
    if not hasattr(value, part):
      found = _experiment_classes(module)
      raise ExperimentClassError(
          f"config.{KEY}={name!r}: module {module_name!r} "
          f"({getattr(module, '__file__', '?')}) has no attribute "
          f"{attribute!r}. Experiment classes it defines: "
          f"{found or 'none'}.")
    value = getattr(value, part)
  if inspect.ismodule(value) or not callable(value):
    raise ExperimentClassError(
        f"config.{KEY}={name!r} names a {type(value).__name__}, not a class: "
        "name the experiment class (a subclass of "
        "jaxline.experiment.AbstractExperiment), or a callable that builds "
        "one, such as a functools.partial.")
  return value


def _fatal(message: str) -> None:
  sys.stderr.write(f"FATAL {message}\n")
  sys.stderr.flush()
  sys.exit(1)


def _parse_flags(argv: Sequence[str], found: List[Any]) -> Any:
  """Reads the config, imports its class, then parses the whole line."""
  try:
    rest = FLAGS(list(argv), known_only=True)
  except flags.Error as e:
    _fatal(f"Flags parsing error: {e}\n"
           "Pass --helpshort or --helpfull to see help on flags.")
  config = FLAGS.config
  name = config.get(KEY, None) if config is not None else None
  if name:
    try:
      found.append(import_experiment_class(name))
    except ExperimentClassError as e:
      _fatal(str(e))
  elif config is not None and not FLAGS.jaxline_print_config:
    source = config_flags.get_config_filename(FLAGS["config"])
    _fatal(
        f"config.{KEY} is not set, so `python -m jaxline` cannot tell which "
        f"experiment to run. Add `config.{KEY} = \"package.module:Class\"` "
        f"to get_config() in {source}, or pass --config.{KEY}="
        "package.module:Class (or run the experiment's own file).")
  return app.parse_flags_with_usage(rest)


def run(argv: Optional[Sequence[str]] = None) -> None:
  """The body of `python -m jaxline`."""
  flags.mark_flag_as_required("config")
  found: List[Any] = []

  def main(args):
    # Without a class, only --jaxline_print_config (or an error about the
    # config itself) gets this far.
    platform.main(found[0] if found else None, args)

  app.run(main, argv=list(argv) if argv is not None else None,
          flags_parser=functools.partial(_parse_flags, found=found))
