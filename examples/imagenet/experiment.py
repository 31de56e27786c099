r"""ResNet-50 on ImageNet as a jaxline experiment, data-parallel with pmap.

Run it from the repository root (examples/imagenet/README.md has more):

  python -m examples.imagenet.experiment \
      --config=examples/imagenet/config.py \
      --jaxline_mode=train_eval_multithreaded \
      --config.experiment_kwargs.config.dataset.data_dir=/path/to/tfds

Parameters, batch-norm statistics and optimizer state carry a leading axis of
`jax.local_device_count()`. Each device trains on its slice of the global
batch with its own batch-norm batch statistics (the usual setting for
ResNet-50); gradients and the moving averages are averaged over all devices,
so the copies stay identical and a checkpoint of device 0 holds the model.

TensorFlow is imported only by `input_pipeline`, and only when the first
batch is needed.
"""

import contextlib
import functools
from typing import Any, Dict, Iterator, Mapping, Optional

from absl import app
from absl import flags
from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
from jaxline import experiment
from jaxline import platform
from jaxline import utils
import jmp
import numpy as np
import optax

# Name of the device axis inside the pmapped functions.
_AXIS = "i"


@contextlib.contextmanager
def _precision(bf16: bool):
  """bfloat16 compute with float32 parameters, batch norm and logits.

  Batch norm computes its statistics in float32, since bfloat16 moving
  averages lose the small updates.
  """
  if not bf16:
    yield
    return
  half = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  norm = jmp.get_policy("params=float32,compute=float32,output=bfloat16")
  with hk.mixed_precision.push_policy(hk.nets.ResNet, half), \
      hk.mixed_precision.push_policy(hk.BatchNorm, norm):
    yield


def _forward(model_config: Mapping[str, Any], num_classes: int, bf16: bool,
             images: jax.Array, is_training: bool) -> jax.Array:
  """Logits [B, num_classes] for normalised images [B, S, S, 3]."""
  net = hk.nets.ResNet(
      blocks_per_group=tuple(model_config["blocks_per_group"]),
      channels_per_group=tuple(model_config["channels_per_group"]),
      bottleneck=model_config["bottleneck"],
      resnet_v2=model_config["resnet_v2"],
      num_classes=num_classes,
      bn_config={"decay_rate": model_config["bn_decay_rate"]})
  with _precision(bf16):
    return net(images, is_training=is_training)


def _decay_mask(params: hk.Params) -> hk.Params:
  """True for kernels ("w"); batch-norm scales and offsets and biases keep
  their values, since decaying them only fights the normalisation."""
  return hk.data_structures.map(lambda module, name, value: name == "w",
                                params)


def make_optimizer(optimizer_config: Any,
                   training_steps: int) -> optax.GradientTransformation:
  """SGD with momentum and L2 decay, linear warm-up, cosine decay to the end.

  The decay is coupled (added to the gradient before momentum), as in the
  reference ResNet-50 recipes.
  """
  return optax.chain(
      optax.add_decayed_weights(optimizer_config.weight_decay,
                                mask=_decay_mask),
      optax.sgd(learning_rate_schedule(optimizer_config, training_steps),
                momentum=optimizer_config.momentum,
                nesterov=optimizer_config.nesterov))


def learning_rate_schedule(optimizer_config: Any,
                           training_steps: int) -> optax.Schedule:
  """0 -> peak over the warm-up steps, then a cosine to the end value."""
  warmup = optimizer_config.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optimizer_config.peak_learning_rate,
      warmup_steps=warmup,
      decay_steps=max(training_steps, warmup + 1),
      end_value=optimizer_config.end_learning_rate)


def _pmean_floats(x: jax.Array) -> jax.Array:
  """The mean over devices of a float; other dtypes as they are.

  Batch norm keeps an int32 update counter next to its averages. It is the
  same on every device, and a pmean would turn it into a float (changing
  the state's types, so the next step would compile again).
  """
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.pmean(x, axis_name=_AXIS)
  return x


class Experiment(experiment.AbstractExperiment):
  """Trains a haiku ResNet with optax SGD, one pmapped update per step."""

  # Per-device values: jaxline saves device 0's copy, broadcasts it back.
  CHECKPOINT_ATTRS = {
      "_params": "params",
      "_state": "state",
      "_opt_state": "opt_state",
  }

  def __init__(self, mode: str, init_rng: jax.Array, config: Any):
    super().__init__(mode=mode, init_rng=init_rng)
    self.mode = mode
    self.config = config
    # Fail at start-up, not after compiling, on a batch the devices cannot
    # split evenly.
    for name, batch_size in (("training", config.training.batch_size),
                             ("evaluation", config.evaluation.batch_size)):
      if batch_size % jax.device_count():
        raise ValueError(
            f"config.{name}.batch_size={batch_size} is not divisible by the "
            f"{jax.device_count()} devices.")

    params_rng, data_rng = jax.random.split(init_rng)
    self._params_rng = params_rng
    # The input stream follows config.random_seed through init_rng.
    self._data_seed = int(jax.random.bits(data_rng, dtype=jnp.uint32))

    self._net = hk.without_apply_rng(hk.transform_with_state(
        functools.partial(_forward, config.model.to_dict(),
                          config.dataset.num_classes, config.training.bf16)))
    self._schedule = learning_rate_schedule(config.optimizer,
                                            config.training.training_steps)
    self._optimizer = make_optimizer(config.optimizer,
                                     config.training.training_steps)

    # Created lazily: the first training step initialises them, and an
    # evaluator restores them from a checkpoint.
    self._params = None
    self._state = None
    self._opt_state = None
    self._train_input = None
    self._eval_input = None

    # Built once: pmap caches its compilation on the function object. The
    # update consumes the old parameters and state, so their buffers are
    # reused for the new ones.
    self._init_pmap = jax.pmap(self._init, axis_name=_AXIS)
    self._update_pmap = jax.pmap(self._update, axis_name=_AXIS,
                                 donate_argnums=(0, 1, 2))
    self._eval_pmap = jax.pmap(self._eval_sums, axis_name=_AXIS)

  # Training.

  def step(self, *, global_step: jax.Array, rng: jax.Array,
           writer: Optional[utils.Writer]) -> Dict[str, jax.Array]:
    """One SGD update on the next global batch.

    `rng` is unused: ResNet-50 has no dropout, and the augmentation is drawn
    by the input pipeline from its own seed. Scalars stay on device; the
    harness fetches them when it logs.
    """
    del rng, writer
    if self._params is None:
      self._initialize()
    if self._train_input is None:
      self._train_input = self._build_train_input(
          int(utils.get_first(global_step)))
    batch = next(self._train_input)
    self._params, self._state, self._opt_state, scalars = self._update_pmap(
        self._params, self._state, self._opt_state, batch, global_step)
    return utils.get_first(scalars)

  def _initialize(self) -> None:
    """Parameters, statistics and optimizer state, the same on every device."""
    self._params, self._state, self._opt_state = self._init_pmap(
        utils.bcast_local_devices(self._params_rng))
    # From the shapes: indexing a per-device array would copy it.
    num_params = sum(int(np.prod(x.shape[1:]))
                     for x in jax.tree.leaves(self._params))
    logging.info("Initialised a ResNet with %d parameters.", num_params)

  def _init(self, rng: jax.Array):
    size = self.config.dataset.image_size
    images = jnp.zeros([1, size, size, 3], jnp.float32)
    params, state = self._net.init(rng, images, is_training=True)
    return params, state, self._optimizer.init(params)

  def _build_train_input(self, start_step: int) -> Iterator[Any]:
    """The training batches, already on the devices.

    A run resumed at `start_step` draws a fresh stream instead of replaying
    the first batches of the interrupted one: the seed mixes in the step,
    and each host gets its own.
    """
    from examples.imagenet import input_pipeline  # pylint: disable=g-import-not-at-top
    seed = int(np.random.SeedSequence(
        [self._data_seed, jax.process_index(), start_step]).generate_state(
            1)[0])
    ds = input_pipeline.train_dataset(
        self.config.dataset, global_batch_size=self.config.training.batch_size,
        seed=seed, dtype=input_pipeline.tf_dtype(self.config.training.bf16))
    return utils.double_buffer(iter(input_pipeline.as_numpy(ds)))

  def _loss(self, params, state, batch):
    logits, state = self._net.apply(params, state, batch["images"],
                                    is_training=True)
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(
        jax.nn.one_hot(batch["labels"], self.config.dataset.num_classes),
        self.config.training.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, (state, logits)

  def _update(self, params, state, opt_state, batch, global_step):
    """Runs on each device with its slice of the batch."""
    (loss, (state, logits)), grads = jax.value_and_grad(
        self._loss, has_aux=True)(params, state, batch)
    # Data parallelism: every device applies the same averaged gradient,
    # and keeps the same batch-norm moving averages.
    grads = jax.lax.pmean(grads, axis_name=_AXIS)
    state = jax.tree.map(_pmean_floats, state)
    updates, opt_state = self._optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    scalars = {
        "loss": loss,
        "top_1_acc": (logits.argmax(-1) == batch["labels"]).mean(),
    }
    scalars = jax.lax.pmean(scalars, axis_name=_AXIS)
    # The rate this step used: optax evaluates the schedule at the count of
    # updates done before it, which is the step index.
    scalars["learning_rate"] = self._schedule(global_step)
    return params, state, opt_state, scalars

  # Evaluation.

  def evaluate(self, *, global_step: jax.Array, rng: jax.Array,
               writer: Optional[utils.Writer]) -> Dict[str, np.ndarray]:
    """Top-1 and top-5 accuracy and loss over the whole eval split."""
    del rng, writer
    if self._params is None:  # eval_initial_weights, before any checkpoint.
      self._initialize()
    if self._eval_input is None:
      from examples.imagenet import input_pipeline  # pylint: disable=g-import-not-at-top
      self._eval_input = input_pipeline.as_numpy(input_pipeline.eval_dataset(
          self.config.dataset,
          global_batch_size=self.config.evaluation.batch_size,
          dtype=input_pipeline.tf_dtype(self.config.training.bf16)))

    totals = None
    for batch in utils.double_buffer(iter(self._eval_input)):
      sums = utils.get_first(self._eval_pmap(self._params, self._state, batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    scalars = {
        "top_1_acc": np.float32(totals["top_1"] / count),
        "top_5_acc": np.float32(totals["top_5"] / count),
        "loss": np.float32(totals["loss"] / count),
        "num_examples": np.int64(count),
    }
    step = int(utils.get_first(global_step))
    # Printed, not only logged, so that it is visible whatever absl's log
    # settings are.
    print(f"Evaluation at step {step} on {int(count)} examples of "
          f"{self.config.dataset.eval_split}: top-1 "
          f"{scalars['top_1_acc']:.4f}, top-5 {scalars['top_5_acc']:.4f}, "
          f"loss {scalars['loss']:.4f}", flush=True)
    return scalars

  def _eval_sums(self, params, state, batch):
    """Sums over this device's real examples, then over all devices."""
    logits, _ = self._net.apply(params, state, batch["images"],
                                is_training=False)
    logits = logits.astype(jnp.float32)
    labels = batch["labels"]
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top_1 = (logits.argmax(-1) == labels).astype(jnp.float32)
    _, top_5_classes = jax.lax.top_k(logits, 5)
    top_5 = (top_5_classes == labels[:, None]).any(-1).astype(jnp.float32)
    sums = {"loss": (losses * mask).sum(), "top_1": (top_1 * mask).sum(),
            "top_5": (top_5 * mask).sum(), "count": mask.sum()}
    return jax.lax.psum(sums, axis_name=_AXIS)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
