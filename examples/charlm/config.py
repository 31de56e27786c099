r"""Config for the character-level language model in examples/charlm.

Train and evaluate side by side (from the repository root):

  python -m examples.charlm.experiment --config=examples/charlm/config.py \
      --jaxline_mode=train_eval_multithreaded

(or `python -m jaxline --config=examples/charlm/config.py ...`: this config
names its experiment class). That trains a small transformer on the source of Python's standard library,
offline, in a few minutes on a laptop CPU, and ends with a line like
"Final evaluation at step 500 on 32768 validation characters: loss 1.67,
bits/char 2.41" (README.md has the measured numbers). Checkpoints and
TensorBoard logs go to runs/charlm_<preset> under the current directory; a
second run with the same directory resumes from it and says from which step
(delete it to start over, or raise --config.training_steps to train on).

Presets (`--config=examples/charlm/config.py:<preset>`):

  default  2 layers, width 128, 64-character context; a few minutes on CPU.
  tiny     1 layer, width 32, 20 steps: for tests and for trying changes out.
  large    6 layers, width 384, 256-character context, 5000 steps: for an
           accelerator (about 11M parameters).
  fsdp     2 layers, width 64, 24 steps, with parameters and optimizer state
           split over all devices of all processes (FSDP) instead of
           replicated: for tests and for trying sharding out, on several
           processes or with
           XLA_FLAGS=--xla_force_host_platform_device_count=4 on one CPU.

Any key below can be overridden, for example `--config.training_steps=2000`,
`--config.experiment_kwargs.config.model.num_layers=4` or
`--config.experiment_kwargs.config.data.files='/path/to/texts/**/*.txt'`.
"""

from typing import Optional

from jaxline import base_config
from ml_collections import config_dict

PRESETS = ("default", "tiny", "large", "fsdp")


def get_config(arg: Optional[str] = None) -> config_dict.ConfigDict:
  """The run's config; `arg` picks a preset (see the module docstring)."""
  preset = arg or "default"
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}: use one of "
                     f"{', '.join(PRESETS)} (config.py:<preset>).")
  config = base_config.get_base_config()
  # What `python -m jaxline --config=examples/charlm/config.py` runs.
  config.experiment_class = "examples.charlm.experiment:Experiment"
  # Global arrays over jaxline.sharding.data_parallel_mesh() and jax.jit,
  # instead of per-device values and pmap.
  config.experiment_style = "sharded"

  # Step-based intervals keep runs reproducible: the same steps are logged,
  # checkpointed and evaluated on a fast or a slow machine.
  config.interval_type = "steps"
  config.training_steps = {"default": 500, "tiny": 20, "large": 5000,
                           "fsdp": 24}[preset]
  config.log_tensors_interval = {"default": 50, "tiny": 5, "large": 100,
                                 "fsdp": 4}[preset]
  config.log_train_data_interval = {"default": 10, "tiny": 1, "large": 20,
                                    "fsdp": 1}[preset]
  # Each periodic save is a checkpoint for the evaluator to pick up.
  config.save_checkpoint_interval = {"default": 100, "tiny": 10,
                                     "large": 500, "fsdp": 8}[preset]
  # The evaluator keeps the checkpoint with the lowest validation loss.
  config.best_model_eval_metric = "loss"
  config.best_model_eval_metric_higher_is_better = False
  # Relative to the current directory; one directory per preset.
  config.checkpoint_dir = f"runs/charlm_{preset}"
  # Short runs: look for new checkpoints often (jaxline's default is 10 s).
  config.eval_poll_interval_secs = 1.0

  config.experiment_kwargs = config_dict.ConfigDict()
  exp = config.experiment_kwargs.config = config_dict.ConfigDict()

  exp.data = config_dict.ConfigDict()
  # A glob of text files (`**` allowed); empty: the standard library's
  # top-level *.py files.
  exp.data.files = ""
  # About this fraction of the files, chosen by a hash of their names, is
  # held out for validation.
  exp.data.validation_fraction = 0.1

  # Characters of context; also the longest generated sample.
  exp.seq_len = {"default": 64, "tiny": 32, "large": 256, "fsdp": 32}[preset]
  # Global batch sizes (sequences), split evenly over all devices.
  exp.batch_size = {"default": 32, "tiny": 8, "large": 64, "fsdp": 8}[preset]
  exp.eval_batch_size = {"default": 64, "tiny": 8, "large": 128,
                         "fsdp": 8}[preset]
  # Validation windows per evaluation, spread evenly over the held-out text;
  # 0 or None: all of it (about 14,600 windows of 64 characters).
  exp.eval_windows = {"default": 512, "tiny": 16, "large": 0,
                      "fsdp": 16}[preset]

  exp.learning_rate = {"default": 3e-3, "tiny": 1e-2, "large": 1e-3,
                       "fsdp": 1e-2}[preset]
  exp.warmup_steps = {"default": 50, "tiny": 2, "large": 200,
                      "fsdp": 2}[preset]
  # Cosine decay from the peak to this fraction of it at the last step.
  exp.final_learning_rate_fraction = 0.1
  exp.weight_decay = 0.1
  exp.adam_b1 = 0.9
  exp.adam_b2 = 0.98
  exp.gradient_clip_norm = 1.0
  # The schedule ends at --config.training_steps, whatever it is set to.
  exp.training_steps = config.get_ref("training_steps")

  # Fully sharded data parallel: parameters and optimizer state split over
  # the devices (each array along its largest axis that divides evenly by
  # the device count) instead of a full copy on each. Every parameter
  # matrix has such an axis when the width is a multiple of it.
  exp.fsdp = preset == "fsdp"

  exp.model = config_dict.ConfigDict()
  exp.model.num_layers = {"default": 2, "tiny": 1, "large": 6,
                          "fsdp": 2}[preset]
  exp.model.width = {"default": 128, "tiny": 32, "large": 384,
                     "fsdp": 64}[preset]
  exp.model.num_heads = {"default": 4, "tiny": 2, "large": 6,
                         "fsdp": 4}[preset]
  exp.model.mlp_ratio = 4
  exp.model.dropout = {"default": 0.0, "tiny": 0.1, "large": 0.1,
                       "fsdp": 0.1}[preset]

  # A continuation of this prompt goes to the log at each evaluation
  # ("" turns it off).
  exp.sample = config_dict.ConfigDict()
  exp.sample.prompt = "def "
  # 0 picks the likeliest character each time.
  exp.sample.temperature = 0.7
  return config
