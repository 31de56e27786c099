"""Runs the experiment that a config names (see jaxline.runner).

  python -m jaxline --config=path/to/config.py [--config.<key>=<value> ...]
      [--jaxline_mode=train|eval|train_eval_multithreaded]
      [--jaxline_print_config] [--jaxline_dry_run]

The config sets `config.experiment_class = "package.module:Class"`. Every
flag: --helpfull.
"""

from jaxline import runner

if __name__ == "__main__":
  runner.run()
