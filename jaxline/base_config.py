"""The base config every jaxline experiment extends, and its validation.

The 24 keys below are the ones jaxline 0.0.8 defined, with the same defaults
and types, so that existing config files keep working. Optional keys added
since (see ``OPTIONAL_KEYS``) are read with ``config.get(key, default)`` and
are never required.
"""

import numbers
import re
from typing import Any, Dict, Mapping, Optional, Sequence

from ml_collections import config_dict

# Keys the harness reads with a default; configs may omit them.
OPTIONAL_KEYS: Mapping[str, Any] = {
    # "package.module:Class": the experiment `python -m jaxline` runs.
    "experiment_class": None,
    # Root of TensorBoard logs and on-disk checkpoints; "" keeps both off.
    "checkpoint_dir": "",
    # Seconds the eval loop sleeps between polls for a new checkpoint.
    "eval_poll_interval_secs": 10.0,
    # "pmap": per-device values with a leading device axis (0.0.8's style).
    # "sharded": global jax.Arrays over jaxline.sharding.data_parallel_mesh().
    "experiment_style": "pmap",
    # With a checkpoint_dir: "disk" (Orbax, resumable) or "memory" (only in
    # utils.GLOBAL_CHECKPOINT_DICT, as 0.0.8 kept them; the dir gets logs).
    "checkpoint_backend": "disk",
    # Let disk checkpoints hold objects that need pickle (and load them).
    "checkpoint_allow_pickle": False,
    # Eval jobs evaluate every committed checkpoint in step order, instead of
    # only the newest one at each poll.
    "eval_every_checkpoint": False,
    # Stop with an error when a scalar from step() is NaN or infinite, and
    # never save that state.
    "terminate_on_nan": True,
    # Exit with every thread's stack when no step ends for this long (the
    # first step, which compiles, is exempt). None: off.
    "step_timeout_secs": None,
    # After SIGTERM/SIGUSR1/SIGINT, exit if the running step has not ended
    # within this many seconds. None: wait for it forever.
    "preemption_grace_secs": 60.0,
    # Trace steps [profile_start_step, +profile_num_steps) with jax.profiler
    # into <checkpoint_dir>/profile. None: off.
    "profile_start_step": None,
    "profile_num_steps": 5,
}

_INTERVAL_TYPES = ("secs", "steps")
# "package.module:Class" (or "package.module.Class").
_CLASS_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*"
                         r"(\.[A-Za-z_]\w*)*)?")
# An extra key this close to a known key is taken for a misspelling of it.
_MAX_TYPO_EDITS = 2
_RNG_MODES = ("unique_host_unique_device", "unique_host_same_device",
              "same_host_unique_device", "same_host_same_device")


def get_base_config() -> config_dict.ConfigDict:
  """Returns a fresh, unlocked config with every required key and default."""
  config = config_dict.ConfigDict()
  config.experiment_kwargs = config_dict.ConfigDict()
  config.training_steps = 10000
  config.interval_type = "secs"
  config.save_checkpoint_interval = 300
  config.log_tensors_interval = 60
  config.periodic_action_growth_ratios = None
  config.log_train_data_interval = 120.0
  config.log_async = True
  config.log_all_hosts = False
  config.logging_interval_type = None
  config.checkpoint_interval_type = None
  config.save_initial_train_checkpoint = False
  config.train_checkpoint_all_hosts = False
  config.best_checkpoint_all_hosts = False
  config.log_all_train_data = False
  config.eval_initial_weights = False
  config.one_off_evaluate = False
  config.max_checkpoints_to_keep = 5
  config.random_seed = 42
  config.random_mode_train = "unique_host_unique_device"
  config.random_mode_eval = "same_host_same_device"
  config.legacy_random_seed_behavior = False
  config.best_model_eval_metric = ""
  config.best_model_eval_metric_higher_is_better = True
  return config


def validate_keys(base_cfg: Mapping[str, Any],
                  config: Mapping[str, Any],
                  base_filename: str = "base_config.py") -> None:
  """Raises ValueError if `config` lacks a key that `base_cfg` has.

  Extra keys in `config` are allowed: real configs carry project keys.
  """
  for key in base_cfg.keys():
    if key not in config:
      raise ValueError(
          f"Key {key!r} missing from config. This config is required to have "
          f"keys: {list(base_cfg.keys())}. See {base_filename} for more "
          "details.")
    if (isinstance(base_cfg[key], config_dict.ConfigDict) and
        config[key] is not None):
      validate_keys(base_cfg[key], config[key], base_filename)


def _effective(config: Mapping[str, Any], override_key: str) -> Optional[str]:
  return config[override_key] or config["interval_type"]


def _checkpoint_action_created(config: Mapping[str, Any]) -> bool:
  interval = config["save_checkpoint_interval"]
  return interval is not None and interval > 0


def check_constraints(config: Mapping[str, Any]) -> None:
  """Raises ValueError for settings whose combination cannot work."""
  checkpoint_type = _effective(config, "checkpoint_interval_type")
  logging_type = _effective(config, "logging_interval_type")
  if config["train_checkpoint_all_hosts"] and checkpoint_type != "steps":
    raise ValueError(
        "train_checkpoint_all_hosts=True needs step-based checkpointing, so "
        "that every host saves at the same step: set "
        "checkpoint_interval_type='steps' (or interval_type='steps').")
  if config["periodic_action_growth_ratios"] is not None:
    typed = [("logging_interval_type", logging_type)]
    if _checkpoint_action_created(config):
      typed.append(("checkpoint_interval_type", checkpoint_type))
    for key, interval_type in typed:
      if interval_type != "steps":
        raise ValueError(
            "periodic_action_growth_ratios only work with step intervals, but "
            f"the effective {key} is {interval_type!r}: set {key}='steps' "
            "(or interval_type='steps'), or periodic_action_growth_ratios="
            "None.")


_NUMBER = (numbers.Real,)
_INT = (numbers.Integral,)
_BOOL = (bool, numbers.Integral)  # numpy's bool_ is checked by name.
# Key -> (accepted types, None allowed, what to write instead). Bools accept
# ints too, since Python reads them alike; strings there are a bug ("False").
_TYPES = {
    "training_steps": (_INT, True, "a whole number of steps"),
    "interval_type": ((str,), True, "'secs' or 'steps'"),
    "save_checkpoint_interval": (_NUMBER, True, "a number (<= 0: off)"),
    "log_tensors_interval": (_NUMBER, True, "a number > 0, or None"),
    "periodic_action_growth_ratios": ((list, tuple), True,
                                      "a list of numbers, or None"),
    "log_train_data_interval": (_NUMBER, True, "a number > 0, or None"),
    "logging_interval_type": ((str,), True, "'secs', 'steps' or None"),
    "checkpoint_interval_type": ((str,), True, "'secs', 'steps' or None"),
    "max_checkpoints_to_keep": (_INT, False, "a whole number"),
    "random_seed": (_INT, False, "a whole number"),
    "random_mode_train": ((str,), False, "an RNG mode name"),
    "random_mode_eval": ((str,), False, "an RNG mode name"),
    "best_model_eval_metric": ((str,), True, "a key evaluate() returns"),
    "experiment_kwargs": ((Mapping, config_dict.ConfigDict,
                           config_dict.FrozenConfigDict), True,
                          "a ConfigDict"),
    "checkpoint_backend": ((str,), False, "'disk' or 'memory'"),
    "experiment_class": ((str,), True, "'package.module:Class', or None"),
    "terminate_on_nan": (_BOOL, False, "True or False"),
    "step_timeout_secs": (_NUMBER, True, "seconds > 0, or None"),
    "preemption_grace_secs": (_NUMBER, True, "seconds > 0, or None"),
    "profile_start_step": (_INT, True, "a step >= 0, or None"),
    "profile_num_steps": (_INT, False, "a number of steps > 0"),
}
_BOOLS = ("log_async", "log_all_hosts", "save_initial_train_checkpoint",
          "train_checkpoint_all_hosts", "best_checkpoint_all_hosts",
          "log_all_train_data", "eval_initial_weights", "one_off_evaluate",
          "legacy_random_seed_behavior",
          "best_model_eval_metric_higher_is_better")
# Keys that must be > 0 when set (0.0.8 divided by them or spun on them).
_POSITIVE = ("log_tensors_interval", "log_train_data_interval",
             "step_timeout_secs", "preemption_grace_secs",
             "profile_num_steps")


def _check_types(config: Mapping[str, Any]) -> None:
  """Names a key whose value has the wrong type, before anything runs."""
  types = dict(_TYPES)
  types.update({k: (_BOOL, True, "True or False") for k in _BOOLS})
  for key, (accepted, none_ok, want) in types.items():
    if key not in config:
      continue
    value = config[key]
    if value is None and none_ok:
      continue
    if accepted is _BOOL and type(value).__name__ == "bool_":
      continue
    if (accepted is _INT and isinstance(value, numbers.Real) and
        not isinstance(value, bool) and float(value).is_integer()):
      continue  # 1e6 steps works as it did in 0.0.8.
    bad_bool = isinstance(value, bool) and bool not in accepted
    if bad_bool or not isinstance(value, accepted):
      raise ValueError(
          f"config.{key}={value!r} ({type(value).__name__}) has the wrong "
          f"type; set it to {want}.")
  for key in _POSITIVE:
    value = config.get(key, None) if hasattr(config, "get") else None
    if value is not None and value <= 0:
      raise ValueError(f"config.{key}={value!r} must be > 0; set a positive "
                       "number" + (", or None to turn it off." if _TYPES.get(
                           key, (0, False))[1] else "."))
  start = config.get("profile_start_step", None)
  if start is not None:
    if start < 0:
      raise ValueError(f"config.profile_start_step={start} is negative; set "
                       "the first step to trace (>= 0), or None.")
    if not config.get("checkpoint_dir", ""):
      raise ValueError("config.profile_start_step is set, but "
                       "config.checkpoint_dir is not: traces go to "
                       "<checkpoint_dir>/profile. Set checkpoint_dir.")


def _check_values(config: Mapping[str, Any]) -> None:
  """Rejects values that 0.0.8 could not use, naming the key."""
  for key in ("random_mode_train", "random_mode_eval"):
    if config[key] not in _RNG_MODES:
      raise ValueError(f"config.{key}={config[key]!r} is not a valid RNG "
                       f"mode; use one of {list(_RNG_MODES)}.")
  backend = config.get("checkpoint_backend", "disk")
  if backend not in ("disk", "memory"):
    raise ValueError(f"config.checkpoint_backend={backend!r}; use 'disk' "
                     "(Orbax checkpoints under checkpoint_dir) or 'memory' "
                     "(in-memory checkpoints, as jaxline 0.0.8 kept them).")
  experiment_class = config.get("experiment_class", None)
  if experiment_class is not None and not _CLASS_NAME.fullmatch(
      experiment_class):
    raise ValueError(
        f"config.experiment_class={experiment_class!r} is not a class name; "
        "set it to 'package.module:Class' (the module as you would import "
        "it, not a file path), e.g. 'examples.mnist.experiment:Experiment'.")
  steps = config["training_steps"]
  if steps is not None and steps < 0:
    raise ValueError(f"config.training_steps={steps} is negative; use a "
                     "count of steps >= 0 (or None with a custom "
                     "should_run_step).")
  # A `None` interval means that action is not created, so its type is free.
  logging_created = (config["log_tensors_interval"] is not None or
                     config["log_train_data_interval"] is not None)
  actions = [("logging_interval_type", logging_created),
             ("checkpoint_interval_type", _checkpoint_action_created(config))]
  for key, created in actions:
    value = _effective(config, key)
    if created and value not in _INTERVAL_TYPES:
      raise ValueError(
          f"The effective {key} is {value!r}; set {key} or interval_type to "
          f"one of {list(_INTERVAL_TYPES)}.")


def _edit_distance(a: str, b: str) -> int:
  """Optimal string alignment distance: edits, with swaps of neighbours."""
  prev2, prev = None, list(range(len(b) + 1))
  for i in range(1, len(a) + 1):
    row = [i] + [0] * len(b)
    for j in range(1, len(b) + 1):
      cost = a[i - 1] != b[j - 1]
      row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
      if (i > 1 and j > 1 and a[i - 1] == b[j - 2] and
          a[i - 2] == b[j - 1]):
        row[j] = min(row[j], prev2[j - 2] + 1)
    prev2, prev = prev, row
  return prev[-1]


def _check_misspellings(base_cfg: Mapping[str, Any],
                        config: Mapping[str, Any]) -> None:
  """Rejects an extra top-level key that is a near-miss of a known key.

  A typo such as `traning_steps` would otherwise be ignored silently while the
  default runs. Other extra keys stay allowed: only keys within
  `_MAX_TYPO_EDITS` edits count as typos, so that project keys such as
  `num_training_steps` or `checkpoint_interval` pass.
  """
  known = list(base_cfg.keys()) + list(OPTIONAL_KEYS)
  for key in config.keys():
    if key in known or not isinstance(key, str):
      continue
    distance, close = min((_edit_distance(key, k), k) for k in known)
    if distance <= _MAX_TYPO_EDITS:
      raise ValueError(
          f"Config key {key!r} is not a jaxline key; did you mean "
          f"{close!r}? Rename it (or, if it is your own key, give it a "
          "name less like a jaxline key).")


def validate_config(config: Mapping[str, Any]) -> None:
  """Checks a user config before anything is built or compiled."""
  base = get_base_config()
  validate_keys(base, config)
  _check_misspellings(base, config)
  _check_types(config)
  check_constraints(config)
  _check_values(config)


# The value type of each optional key whose default is None, so that a
# command-line override of it parses.
_OPTIONAL_NONE_TYPES = {"experiment_class": str, "step_timeout_secs": float,
                        "profile_start_step": int}


def add_optional_keys(config: config_dict.ConfigDict,
                      keys: Sequence[str]) -> None:
  """Adds the named optional keys that `config` lacks, with their defaults.

  A key whose default is None gets a typed placeholder, so that
  `--config.step_timeout_secs=600` parses as a float. Other keys are ignored.
  """
  missing = [k for k in dict.fromkeys(keys)
             if k in OPTIONAL_KEYS and k not in config]
  if not missing:
    return
  with config.unlocked():
    for key in missing:
      default = OPTIONAL_KEYS[key]
      if default is None:
        default = config_dict.placeholder(_OPTIONAL_NONE_TYPES[key])
      config[key] = default


def missing_defaults(config: Mapping[str, Any]) -> Dict[str, Any]:
  """The optional keys `config` lacks, with the values jaxline uses for them.

  A default of None comes as a typed placeholder, as `add_optional_keys`
  adds it, so that a config written from these values takes overrides.
  """
  missing = {}
  for key, default in OPTIONAL_KEYS.items():
    if key not in config:
      missing[key] = (config_dict.placeholder(_OPTIONAL_NONE_TYPES[key])
                      if default is None else default)
  return missing


def resolve(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Fills the optional keys in place, so the printed config is complete.

  Works on locked configs, since kfac-jax and others lock theirs.
  """
  with config.unlocked():
    for key, default in missing_defaults(config).items():
      config[key] = default
  return config
