"""Tests for jaxline.base_config.

Config files written for jaxline 0.0.8 must keep validating, with the same
defaults and types (ConfigDict is type-safe, so a float default rejects what an
int default accepts), while typos and impossible combinations fail early.
"""

from absl.testing import absltest
from absl.testing import parameterized
from ml_collections import config_dict
import numpy as np

from jaxline import base_config

# (key, default, type of the default), in the order 0.0.8 defined them.
_EXPECTED = (
    ("experiment_kwargs", None, config_dict.ConfigDict),
    ("training_steps", 10000, int),
    ("interval_type", "secs", str),
    ("save_checkpoint_interval", 300, int),
    ("log_tensors_interval", 60, int),
    ("periodic_action_growth_ratios", None, type(None)),
    ("log_train_data_interval", 120.0, float),
    ("log_async", True, bool),
    ("log_all_hosts", False, bool),
    ("logging_interval_type", None, type(None)),
    ("checkpoint_interval_type", None, type(None)),
    ("save_initial_train_checkpoint", False, bool),
    ("train_checkpoint_all_hosts", False, bool),
    ("best_checkpoint_all_hosts", False, bool),
    ("log_all_train_data", False, bool),
    ("eval_initial_weights", False, bool),
    ("one_off_evaluate", False, bool),
    ("max_checkpoints_to_keep", 5, int),
    ("random_seed", 42, int),
    ("random_mode_train", "unique_host_unique_device", str),
    ("random_mode_eval", "same_host_same_device", str),
    ("legacy_random_seed_behavior", False, bool),
    ("best_model_eval_metric", "", str),
    ("best_model_eval_metric_higher_is_better", True, bool),
)
_KEYS = [key for key, _, _ in _EXPECTED]


def _steps_config(**overrides):
  """A valid config whose actions all count steps, as growth ratios need."""
  config = base_config.get_base_config()
  config.interval_type = "steps"
  config.update(overrides)
  return config


class GetBaseConfigTest(parameterized.TestCase):

  def test_has_exactly_the_24_keys(self):
    config = base_config.get_base_config()
    self.assertLen(_KEYS, 24)
    self.assertCountEqual(config.keys(), _KEYS)

  def test_keys_are_defined_in_the_0_0_8_order(self):
    # ConfigDict.keys() sorts; the definition order is only visible in the
    # underlying field dict, which printing with sort_keys=False also uses.
    config = base_config.get_base_config()
    fields = config._fields  # pylint: disable=protected-access
    self.assertEqual(list(fields), _KEYS)

  @parameterized.named_parameters(
      (key, key, default, kind) for key, default, kind in _EXPECTED)
  def test_default_value_and_type(self, key, default, kind):
    value = base_config.get_base_config()[key]
    self.assertIs(type(value), kind)
    if kind is config_dict.ConfigDict:
      self.assertEmpty(value.keys())
    else:
      self.assertEqual(value, default)

  def test_default_types_decide_what_overrides_are_accepted(self):
    # A user config relies on these: ints widen into float fields, but a
    # float cannot go into an int field and strings do not become numbers.
    config = base_config.get_base_config()
    config.log_train_data_interval = 30
    self.assertEqual(config.log_train_data_interval, 30.0)
    self.assertIsInstance(config.log_train_data_interval, float)
    with self.assertRaises(TypeError):
      config.save_checkpoint_interval = 1.5
    with self.assertRaises(TypeError):
      config.log_tensors_interval = 2.5
    with self.assertRaises(TypeError):
      config.training_steps = "100"
    # None defaults accept any type.
    config.periodic_action_growth_ratios = [1, 2, 5]
    config.logging_interval_type = "steps"

  def test_returns_a_fresh_unlocked_config_each_call(self):
    first = base_config.get_base_config()
    second = base_config.get_base_config()
    self.assertIsNot(first, second)
    self.assertIsNot(first.experiment_kwargs, second.experiment_kwargs)
    self.assertFalse(first.is_locked)
    first.training_steps = 1
    first.experiment_kwargs.config = config_dict.ConfigDict({"lr": 0.1})
    first.new_project_key = "allowed while unlocked"
    self.assertEqual(second.training_steps, 10000)
    self.assertEmpty(second.experiment_kwargs.keys())
    self.assertNotIn("new_project_key", second)
    self.assertEqual(base_config.get_base_config().training_steps, 10000)

  def test_holds_no_field_references(self):
    # A FieldReference would tie two keys together: overriding one on the
    # command line would silently change the other.
    config = base_config.get_base_config()
    for key, value in config.items(preserve_field_references=True):
      self.assertNotIsInstance(value, config_dict.FieldReference, msg=key)

  def test_base_config_validates(self):
    base_config.validate_config(base_config.get_base_config())


class ValidateKeysTest(parameterized.TestCase):

  @parameterized.parameters("training_steps", "random_seed",
                            "best_model_eval_metric_higher_is_better",
                            "experiment_kwargs")
  def test_missing_key_is_named_with_the_required_keys(self, missing):
    base = base_config.get_base_config()
    config = base_config.get_base_config()
    del config[missing]
    with self.assertRaisesRegex(ValueError, repr(missing)) as cm:
      base_config.validate_keys(base, config)
    message = str(cm.exception)
    for key in _KEYS:
      self.assertIn(key, message)
    self.assertIn("base_config.py", message)

  def test_message_names_the_base_file(self):
    with self.assertRaisesRegex(ValueError, "my_base.py"):
      base_config.validate_keys({"a": 1}, {}, base_filename="my_base.py")

  def test_extra_keys_are_allowed(self):
    config = base_config.get_base_config()
    config.experiment = "mnist"
    config.checkpoint_dir = "/tmp/x"
    base_config.validate_keys(base_config.get_base_config(), config)

  def test_recurses_into_nested_config_dicts(self):
    base = config_dict.ConfigDict(
        {"outer": {"inner": {"leaf": 1, "other": 2}}, "top": 3})
    config = config_dict.ConfigDict(
        {"outer": {"inner": {"leaf": 1}}, "top": 3})
    with self.assertRaisesRegex(ValueError, "'other'"):
      base_config.validate_keys(base, config)
    config.outer.inner.other = 5
    base_config.validate_keys(base, config)

  def test_nested_extra_keys_are_allowed(self):
    base = config_dict.ConfigDict({"outer": {"leaf": 1}})
    config = config_dict.ConfigDict({"outer": {"leaf": 1, "extra": 2}})
    base_config.validate_keys(base, config)

  def test_none_user_value_stops_recursion(self):
    base = config_dict.ConfigDict({"outer": {"leaf": 1}})
    config = config_dict.ConfigDict({"outer": None})
    base_config.validate_keys(base, config)

  def test_user_experiment_kwargs_are_not_checked_against_the_empty_base(self):
    config = base_config.get_base_config()
    config.experiment_kwargs = config_dict.ConfigDict(
        {"config": {"lr": 0.1}, "seed_offset": 3})
    base_config.validate_keys(base_config.get_base_config(), config)

  def test_accepts_plain_mappings(self):
    base_config.validate_keys({"a": 1, "b": 2}, {"a": 0, "b": 0, "c": 0})
    with self.assertRaisesRegex(ValueError, "'b'"):
      base_config.validate_keys({"a": 1, "b": 2}, {"a": 0})

  def test_validate_config_requires_every_base_key(self):
    config = base_config.get_base_config()
    del config["max_checkpoints_to_keep"]
    with self.assertRaisesRegex(ValueError, "max_checkpoints_to_keep"):
      base_config.validate_config(config)

  def test_validate_config_does_not_require_optional_keys(self):
    config = base_config.get_base_config()
    for key in base_config.OPTIONAL_KEYS:
      self.assertNotIn(key, config)
    base_config.validate_config(config)


class CheckConstraintsTest(parameterized.TestCase):

  def test_defaults_pass(self):
    base_config.check_constraints(base_config.get_base_config())

  @parameterized.named_parameters(
      ("secs_everywhere", "secs", None),
      ("override_secs", "steps", "secs"),
      ("no_type_at_all", None, None),
  )
  def test_train_checkpoint_all_hosts_needs_steps(self, interval_type,
                                                  checkpoint_type):
    config = base_config.get_base_config()
    config.train_checkpoint_all_hosts = True
    config.interval_type = interval_type
    config.checkpoint_interval_type = checkpoint_type
    with self.assertRaisesRegex(ValueError, "train_checkpoint_all_hosts"):
      base_config.check_constraints(config)

  @parameterized.named_parameters(
      ("interval_type", "steps", None),
      ("override", "secs", "steps"),
      ("override_without_default", None, "steps"),
  )
  def test_train_checkpoint_all_hosts_with_steps_passes(self, interval_type,
                                                        checkpoint_type):
    config = base_config.get_base_config()
    config.train_checkpoint_all_hosts = True
    config.interval_type = interval_type
    config.checkpoint_interval_type = checkpoint_type
    config.logging_interval_type = "secs"
    base_config.check_constraints(config)

  def test_growth_ratios_with_secs_fail_without_all_hosts_checkpointing(self):
    # F10: 0.0.8 only checked under train_checkpoint_all_hosts and otherwise
    # failed later, inside PeriodicAction, on an assert.
    config = base_config.get_base_config()
    config.periodic_action_growth_ratios = [1, 2, 5]
    self.assertFalse(config.train_checkpoint_all_hosts)
    with self.assertRaisesRegex(ValueError, "periodic_action_growth_ratios"):
      base_config.check_constraints(config)

  def test_growth_ratios_with_steps_pass(self):
    base_config.check_constraints(
        _steps_config(periodic_action_growth_ratios=[1, 2, 5]))

  def test_growth_ratios_with_overrides_and_no_interval_type_pass(self):
    # kfac-jax: interval_type=None with every action overridden to steps.
    # 0.0.8 tested the bare interval_type and rejected this.
    config = base_config.get_base_config()
    config.interval_type = None
    config.logging_interval_type = "steps"
    config.checkpoint_interval_type = "steps"
    config.training_steps = None
    config.periodic_action_growth_ratios = [1, 2, 5]
    config.train_checkpoint_all_hosts = True
    base_config.check_constraints(config)

  def test_growth_ratios_with_secs_logging_override_fail(self):
    config = _steps_config(periodic_action_growth_ratios=[1, 2, 5],
                           logging_interval_type="secs")
    with self.assertRaisesRegex(ValueError, "logging_interval_type"):
      base_config.check_constraints(config)

  def test_growth_ratios_with_secs_checkpoints_fail(self):
    config = _steps_config(periodic_action_growth_ratios=[1, 2, 5],
                           checkpoint_interval_type="secs")
    with self.assertRaisesRegex(ValueError, "checkpoint_interval_type"):
      base_config.check_constraints(config)

  @parameterized.parameters(0, -1, None)
  def test_growth_ratios_ignore_checkpoint_type_when_saving_is_off(
      self, interval):
    config = base_config.get_base_config()
    config.interval_type = "secs"
    config.logging_interval_type = "steps"
    config.save_checkpoint_interval = interval
    config.periodic_action_growth_ratios = [1, 2, 5]
    base_config.check_constraints(config)

  def test_validate_config_runs_the_constraints(self):
    config = base_config.get_base_config()
    config.periodic_action_growth_ratios = [1, 2]
    with self.assertRaisesRegex(ValueError, "periodic_action_growth_ratios"):
      base_config.validate_config(config)


class MisspelledKeyTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("dropped_letter", "traning_steps", "training_steps"),
      ("swapped_letters", "trainnig_steps", "training_steps"),
      ("plural", "random_seeds", "random_seed"),
      ("extra_letter", "max_checkpoints_to_keeep", "max_checkpoints_to_keep"),
      ("two_edits", "log_tensor_intervl", "log_tensors_interval"),
      ("optional_key", "checkpoint_dri", "checkpoint_dir"),
  )
  def test_near_miss_names_the_intended_key(self, typo, intended):
    config = base_config.get_base_config()
    config[typo] = 1
    with self.assertRaisesRegex(ValueError, repr(typo)) as cm:
      base_config.validate_config(config)
    self.assertIn(f"did you mean {intended!r}", str(cm.exception))

  @parameterized.parameters(
      "checkpoint_dir", "eval_specific_checkpoint_dir", "restore_path",
      "training_steps_per_run", "experiment", "eval_poll_interval_secs",
      # Project keys that merely share a word with a jaxline key.
      "num_training_steps", "checkpoint_interval", "train_steps", "seed",
      "logging_interval", "eval_interval_type")
  def test_real_world_extra_keys_pass(self, key):
    config = base_config.get_base_config()
    config[key] = "value"
    base_config.validate_config(config)

  def test_nested_keys_are_not_checked_for_typos(self):
    config = base_config.get_base_config()
    config.experiment_kwargs.traning_steps = 3
    base_config.validate_config(config)


class StricterValueChecksTest(parameterized.TestCase):

  @parameterized.parameters("random_mode_train", "random_mode_eval")
  def test_unknown_rng_mode_names_the_key(self, key):
    config = base_config.get_base_config()
    config[key] = "unique_everything"
    with self.assertRaisesRegex(ValueError, key):
      base_config.validate_config(config)

  @parameterized.parameters(
      "unique_host_unique_device", "unique_host_same_device",
      "same_host_unique_device", "same_host_same_device")
  def test_every_rng_mode_passes(self, mode):
    config = base_config.get_base_config()
    config.random_mode_train = mode
    config.random_mode_eval = mode
    base_config.validate_config(config)

  def test_negative_training_steps_names_the_key(self):
    config = base_config.get_base_config()
    config.training_steps = -1
    with self.assertRaisesRegex(ValueError, "training_steps"):
      base_config.validate_config(config)

  @parameterized.parameters(0, 1, None)
  def test_zero_one_and_none_training_steps_pass(self, steps):
    config = base_config.get_base_config()
    config.training_steps = steps
    base_config.validate_config(config)

  def test_unknown_interval_type_names_the_key(self):
    config = base_config.get_base_config()
    config.interval_type = "epochs"
    with self.assertRaisesRegex(ValueError, "logging_interval_type"):
      base_config.validate_config(config)
    config.logging_interval_type = "steps"
    with self.assertRaisesRegex(ValueError, "checkpoint_interval_type"):
      base_config.validate_config(config)
    config.checkpoint_interval_type = "secs"
    base_config.validate_config(config)

  def test_unknown_override_type_names_the_key(self):
    config = base_config.get_base_config()
    config.checkpoint_interval_type = "minutes"
    with self.assertRaisesRegex(ValueError, "checkpoint_interval_type"):
      base_config.validate_config(config)

  @parameterized.parameters(0, -1, None)
  def test_checkpoint_type_is_free_when_no_checkpoint_action(self, interval):
    # c3 sets save_checkpoint_interval=-1; the action is then never built.
    config = base_config.get_base_config()
    config.interval_type = None
    config.logging_interval_type = "secs"
    config.save_checkpoint_interval = interval
    base_config.validate_config(config)

  def test_logging_type_is_free_when_no_logging_action(self):
    # A None interval turns an action off (F4), so its type is never used.
    config = base_config.get_base_config()
    config.interval_type = None
    config.checkpoint_interval_type = "steps"
    config.log_tensors_interval = None
    config.log_train_data_interval = None
    base_config.validate_config(config)
    config.log_train_data_interval = 10.0
    with self.assertRaisesRegex(ValueError, "logging_interval_type"):
      base_config.validate_config(config)

  def test_kfac_jax_pattern_passes_on_a_locked_config(self):
    config = base_config.get_base_config()
    config.training_steps = None
    config.interval_type = None
    config.logging_interval_type = "steps"
    config.checkpoint_interval_type = "steps"
    config.lock()
    base_config.validate_config(config)


class ResolveTest(absltest.TestCase):

  def test_fills_optional_keys_in_place_on_a_locked_config(self):
    config = base_config.get_base_config()
    config.lock()
    resolved = base_config.resolve(config)
    self.assertIs(resolved, config)
    self.assertTrue(config.is_locked)
    self.assertEqual(config.checkpoint_dir, "")
    self.assertIsInstance(config.checkpoint_dir, str)
    self.assertEqual(config.eval_poll_interval_secs, 10.0)
    self.assertIsInstance(config.eval_poll_interval_secs, float)
    for key, default in base_config.OPTIONAL_KEYS.items():
      self.assertEqual(config[key], default)
    # Still locked: new keys are refused after resolving.
    with self.assertRaises(AttributeError):
      config.not_a_key = 1

  def test_keeps_values_the_user_set(self):
    config = base_config.get_base_config()
    config.checkpoint_dir = "/tmp/run"
    config.eval_poll_interval_secs = 0.5
    base_config.resolve(config)
    self.assertEqual(config.checkpoint_dir, "/tmp/run")
    self.assertEqual(config.eval_poll_interval_secs, 0.5)

  def test_resolved_config_still_validates(self):
    config = base_config.resolve(base_config.get_base_config())
    base_config.validate_config(config)

  def test_optional_keys_documented_in_the_contract(self):
    self.assertEqual(base_config.OPTIONAL_KEYS["checkpoint_dir"], "")
    self.assertEqual(base_config.OPTIONAL_KEYS["eval_poll_interval_secs"],
                     10.0)
    self.assertIsInstance(
        base_config.OPTIONAL_KEYS["eval_poll_interval_secs"], float)



def _plain(**changes):
  """A config built without the base config's types, as by hand."""
  values = base_config.get_base_config().to_dict()
  values.update(changes)
  return config_dict.ConfigDict(values)


class TypeChecksTest(parameterized.TestCase):

  @parameterized.parameters(
      ("training_steps", "abc", "config.training_steps='abc' (str) has the "
       "wrong type; set it to a whole number of steps."),
      ("training_steps", 1.5, "config.training_steps=1.5 (float)"),
      ("training_steps", True, "config.training_steps=True (bool)"),
      ("log_tensors_interval", "60", "config.log_tensors_interval='60' (str)"),
      ("log_async", "False", "config.log_async='False' (str) has the wrong "
       "type; set it to True or False."),
      ("random_seed", 4.2, "config.random_seed=4.2 (float)"),
      ("interval_type", 5, "config.interval_type=5 (int)"),
      ("periodic_action_growth_ratios", 2, "periodic_action_growth_ratios=2"),
      ("terminate_on_nan", "yes", "config.terminate_on_nan='yes' (str)"),
      ("step_timeout_secs", "10", "config.step_timeout_secs='10' (str)"),
      ("profile_start_step", 1.5, "config.profile_start_step=1.5 (float)"),
  )
  def test_wrong_type_names_the_key_and_the_fix(self, key, value, message):
    with self.assertRaisesRegex(ValueError, message.replace(
        "(", r"\(").replace(")", r"\)").replace("[", r"\[")):
      base_config.validate_config(_plain(**{key: value}))

  @parameterized.parameters(
      ("log_tensors_interval", 0), ("log_tensors_interval", -5),
      ("log_train_data_interval", 0.0), ("step_timeout_secs", 0),
      ("preemption_grace_secs", -1.0), ("profile_num_steps", 0))
  def test_zero_or_negative_interval_names_the_key(self, key, value):
    with self.assertRaisesRegex(ValueError, f"config.{key}={value!r} must be "
                                "> 0"):
      base_config.validate_config(_plain(**{key: value}))

  @parameterized.parameters(
      {"save_checkpoint_interval": -1},  # c3: saving off.
      {"save_checkpoint_interval": 0},
      {"training_steps": None, "interval_type": None,
       "logging_interval_type": "steps", "checkpoint_interval_type": "steps"},
      {"log_train_data_interval": None, "log_tensors_interval": 100},
      {"best_checkpoint_all_hosts": None, "log_async": 0},
      {"training_steps": np.int64(5), "log_tensors_interval": np.float32(1)},
      {"training_steps": 1e6, "random_seed": 3.0},  # Whole floats.
      {"terminate_on_nan": False, "step_timeout_secs": 600,
       "profile_start_step": 10, "checkpoint_dir": "/tmp/x"},
  )
  def test_real_world_values_pass(self, **changes):
    base_config.validate_config(_plain(**changes))

  def test_profile_needs_a_checkpoint_dir(self):
    with self.assertRaisesRegex(ValueError, "profile_start_step is set, but "
                                "config.checkpoint_dir is not"):
      base_config.validate_config(_plain(profile_start_step=3))
    with self.assertRaisesRegex(ValueError, "profile_start_step=-1 is "
                                "negative"):
      base_config.validate_config(_plain(profile_start_step=-1,
                                         checkpoint_dir="/tmp/x"))


class AddOptionalKeysTest(absltest.TestCase):

  def test_adds_named_optional_keys_with_defaults_and_types(self):
    config = base_config.get_base_config()
    config.lock()
    base_config.add_optional_keys(
        config, ["terminate_on_nan", "step_timeout_secs", "training_steps",
                 "not_a_key"])
    self.assertIs(config.terminate_on_nan, True)
    self.assertIsNone(config.step_timeout_secs)
    self.assertEqual(config.get_type("step_timeout_secs"), float)
    self.assertNotIn("not_a_key", config)
    self.assertNotIn("profile_start_step", config)
    config.step_timeout_secs = 30.0  # Now overridable, and still locked.
    with self.assertRaises(AttributeError):
      config.something_new = 1

  def test_keeps_values_the_user_set(self):
    config = base_config.get_base_config()
    config.terminate_on_nan = False
    base_config.add_optional_keys(config, ["terminate_on_nan"])
    self.assertIs(config.terminate_on_nan, False)


if __name__ == "__main__":
  absltest.main()
