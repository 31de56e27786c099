r"""Config for ResNet-50 on ImageNet (examples/imagenet/experiment.py).

The standard 90-epoch recipe: SGD with momentum 0.9, weight decay 1e-4 on
weights only (not on batch-norm scales and offsets, not on biases), a learning
rate of 0.1 per 256 examples (0.4 at the global batch of 1024) reached by a
linear warm-up over 5 epochs and then decayed to zero on a cosine, and label
smoothing 0.1. Checkpoints are written every 10 epochs; an evaluator following
them scores the 50,000 validation images each time.

Train on one host with every local accelerator, evaluating alongside (run from
the repository root, with ImageNet prepared for TensorFlow Datasets):

  python -m examples.imagenet.experiment \
      --config=examples/imagenet/config.py \
      --jaxline_mode=train_eval_multithreaded \
      --config.checkpoint_dir=/path/to/run \
      --config.experiment_kwargs.config.dataset.data_dir=/path/to/tfds

Or run training and evaluation as two jobs sharing a checkpoint_dir, one with
`--jaxline_mode=train` and one with `--jaxline_mode=eval`. `python -m jaxline`
in place of `python -m examples.imagenet.experiment` runs the same: this
config names its experiment class.

ImageNet has to be prepared once first (examples/imagenet/prepare_data.py).

Variants:

  # A few steps of a small ResNet on 32x32 crops: a smoke test of the whole
  # pipeline on CPU, here on random data from tfds.testing.mock_data.
  python -m examples.imagenet.testdata.run_with_mock_data \
      --config=examples/imagenet/config.py:tiny

Derived values follow their inputs: overriding the batch size, e.g.
`--config.experiment_kwargs.config.training.batch_size=4096`, rescales the
peak learning rate linearly and recomputes the step counts (training steps,
warm-up, checkpoint interval) from the epoch counts. Overriding a derived value
itself, e.g. `--config.training_steps=1000`, fixes it at that value.

This file imports no TensorFlow, so the config resolves anywhere.
"""

from typing import Optional

from jaxline import base_config
from ml_collections import config_dict

# Size of the imagenet2012 train split in TensorFlow Datasets: epochs are
# counted in it. (The evaluator reads the validation split's size, 50,000,
# from the dataset itself.)
IMAGENET_TRAIN_EXAMPLES = 1_281_167

# Channel statistics of the ImageNet training set, on the [0, 255] scale.
_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

PRESETS = ("resnet50", "tiny")


def get_config(arg: Optional[str] = None) -> config_dict.ConfigDict:
  """The run's config; `arg` picks a preset: "resnet50" (default) or "tiny"."""
  preset = arg or "resnet50"
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; use one of "
                     f"{', '.join(PRESETS)} (config.py:tiny).")
  tiny = preset == "tiny"

  # The numbers the rest is derived from. FieldReferences keep the derived
  # values in step with them when one is overridden on the command line.
  batch_size = config_dict.FieldReference(16 if tiny else 1024)
  num_train_examples = config_dict.FieldReference(
      32 if tiny else IMAGENET_TRAIN_EXAMPLES)
  num_epochs = config_dict.FieldReference(3 if tiny else 90)
  warmup_epochs = config_dict.FieldReference(1 if tiny else 5)
  eval_every_epochs = config_dict.FieldReference(1 if tiny else 10)
  base_learning_rate = config_dict.FieldReference(0.1)
  base_batch_size = config_dict.FieldReference(256)
  steps_per_epoch = num_train_examples // batch_size

  config = base_config.get_base_config()
  # What `python -m jaxline --config=examples/imagenet/config.py` runs.
  config.experiment_class = "examples.imagenet.experiment:Experiment"
  config.training_steps = num_epochs * steps_per_epoch
  # Step intervals: every 10 epochs whatever the speed of the machine, and
  # every host saves at the same step.
  config.interval_type = "steps"
  config.save_checkpoint_interval = eval_every_epochs * steps_per_epoch
  config.log_tensors_interval = 1 if tiny else 500
  config.log_train_data_interval = 1 if tiny else 100
  # Checkpoints are the only way the evaluator sees parameters, so the
  # evaluation interval is the checkpoint interval. Keep all of them.
  config.max_checkpoints_to_keep = 2 if tiny else 10
  config.best_model_eval_metric = "top_1_acc"
  # Relative to the current directory; one directory per preset.
  config.checkpoint_dir = "runs/imagenet_tiny" if tiny else "runs/imagenet"
  config.eval_poll_interval_secs = 1.0 if tiny else 60.0

  config.experiment_kwargs = config_dict.ConfigDict()
  exp = config.experiment_kwargs.config = config_dict.ConfigDict()

  exp.dataset = config_dict.ConfigDict()
  exp.dataset.name = "imagenet2012"
  # Where TensorFlow Datasets keeps the prepared data (None: its default,
  # ~/tensorflow_datasets). ImageNet must be downloaded by hand; see README.
  exp.dataset.data_dir = config_dict.placeholder(str)
  exp.dataset.train_split = "train"
  exp.dataset.eval_split = "validation"
  exp.dataset.num_train_examples = num_train_examples
  exp.dataset.num_classes = 1000
  exp.dataset.image_size = 32 if tiny else 224
  # Eval: centre crop of image_size / (image_size + crop_padding) of the
  # shorter side (224 of 256), resized to image_size.
  exp.dataset.crop_padding = 4 if tiny else 32
  # Train: Inception-style random crop covering 8%-100% of the image with an
  # aspect ratio in [3/4, 4/3], resized to image_size, then a random flip.
  exp.dataset.crop_area_range = (0.08, 1.0)
  exp.dataset.crop_aspect_ratio_range = (3 / 4, 4 / 3)
  exp.dataset.mean_rgb = _MEAN_RGB
  exp.dataset.stddev_rgb = _STDDEV_RGB
  # Per host, in examples; larger buffers mix classes better.
  exp.dataset.shuffle_buffer_size = 64 if tiny else 10_000

  exp.training = config_dict.ConfigDict()
  # Global batch, split evenly over all devices of all hosts.
  exp.training.batch_size = batch_size
  exp.training.num_epochs = num_epochs
  exp.training.steps_per_epoch = steps_per_epoch
  exp.training.training_steps = config.get_ref("training_steps")
  exp.training.label_smoothing = 0.1
  # bfloat16 activations and input transfer; parameters, batch-norm
  # statistics and the loss stay in float32. For accelerators with bf16.
  exp.training.bf16 = False

  exp.evaluation = config_dict.ConfigDict()
  # Global; the last batch is padded and the padding masked out, so every
  # validation image counts exactly once.
  exp.evaluation.batch_size = 16 if tiny else 1024
  exp.evaluation.eval_every_epochs = eval_every_epochs

  exp.optimizer = config_dict.ConfigDict()
  exp.optimizer.base_learning_rate = base_learning_rate
  exp.optimizer.base_batch_size = base_batch_size
  # The linear scaling rule (Goyal et al., 2017).
  exp.optimizer.peak_learning_rate = (
      base_learning_rate * batch_size / base_batch_size)
  exp.optimizer.end_learning_rate = 0.0
  exp.optimizer.warmup_epochs = warmup_epochs
  exp.optimizer.warmup_steps = warmup_epochs * steps_per_epoch
  exp.optimizer.momentum = 0.9
  exp.optimizer.nesterov = False
  # Coupled (L2) decay, applied to conv and dense kernels only.
  exp.optimizer.weight_decay = 1e-4

  exp.model = config_dict.ConfigDict()
  # ResNet-50 v1 (He et al., 2016); tiny is a one-block-per-stage, narrow
  # bottleneck ResNet with the same structure.
  exp.model.blocks_per_group = (1, 1, 1, 1) if tiny else (3, 4, 6, 3)
  exp.model.channels_per_group = ((16, 32, 64, 128) if tiny
                                  else (256, 512, 1024, 2048))
  exp.model.bottleneck = True
  exp.model.resnet_v2 = False
  # Batch-norm moving averages: new = decay * old + (1 - decay) * batch.
  exp.model.bn_decay_rate = 0.9
  return config
