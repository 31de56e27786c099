r"""A digit classifier as a jaxline experiment: the example to fork.

Run it from the repository root (the config's docstring has more):

  python -m examples.mnist.experiment --config=examples/mnist/config.py \
      --jaxline_mode=train_eval_multithreaded

The experiment follows jaxline's pmap convention: parameters and optimizer
state carry a leading axis of `jax.local_device_count()`, each device trains
on its slice of the global batch, and gradients are averaged over devices
with `jax.lax.pmean`. The harness owns the loop, the keys, checkpointing and
logging; this file only says how to take one step and how to evaluate.
"""

import collections
import functools
from typing import Any, Dict, Mapping, Optional

from absl import app
from absl import flags
from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
from jaxline import experiment
from jaxline import platform
from jaxline import utils
import numpy as np
import optax

from examples.mnist import input_pipeline

# Name of the device axis inside the pmapped functions.
_AXIS = "i"


def _network(model_config: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """Logits for `images` [B, H, W, 1]; the config picks MLP or convnet."""
  kind = model_config["kind"]
  if kind == "mlp":
    mlp = hk.nets.MLP(list(model_config["mlp_hidden_sizes"]) +
                      [input_pipeline.NUM_CLASSES], activation=jax.nn.relu)
    return mlp(hk.Flatten()(images))
  if kind == "convnet":
    x = images
    for channels in model_config["conv_channels"]:
      x = jax.nn.relu(hk.Conv2D(channels, kernel_shape=3)(x))
      # Unbatched [H, W, C] sizes: bare ints are deprecated in haiku.
      x = hk.max_pool(x, window_shape=(2, 2, 1), strides=(2, 2, 1),
                      padding="SAME")
    x = jax.nn.relu(hk.Linear(model_config["conv_head_size"])(
        hk.Flatten()(x)))
    return hk.Linear(input_pipeline.NUM_CLASSES)(x)
  raise ValueError(f"Unknown model kind {kind!r}; use 'mlp' or 'convnet'.")


class Experiment(experiment.AbstractExperiment):
  """Trains a haiku classifier with optax, one pmapped update per step."""

  # Per-device state: jaxline saves device 0's copy and broadcasts it back.
  CHECKPOINT_ATTRS = {
      "_params": "params",
      "_opt_state": "opt_state",
  }
  # The input position is a host int, saved whole. Restoring it together
  # with the parameters makes a resumed run see the same batches as one
  # that never stopped.
  NON_BROADCAST_CHECKPOINT_ATTRS = {
      "_position": "input_position",
  }

  def __init__(self, mode: str, init_rng: jax.Array, config: Any):
    super().__init__(mode=mode, init_rng=init_rng)
    if jax.process_count() > 1:
      raise NotImplementedError(
          "This example feeds every device from one host; split the input "
          "by jax.process_index() before running it on several hosts.")
    self.mode = mode
    self.config = config
    self._num_devices = jax.local_device_count()
    # Fail at start-up, not at the first step, on an unsplittable batch.
    input_pipeline.per_device_batch_size(config.batch_size, self._num_devices)
    input_pipeline.per_device_batch_size(config.eval_batch_size,
                                         self._num_devices)

    self._params_rng = init_rng
    # The data order follows config.random_seed through init_rng too. Read
    # on the host: every jax.random call on CPU compiles threefry, ~1 s each.
    self._data_seed = int.from_bytes(np.asarray(
        jax.random.key_data(init_rng), np.uint32).tobytes(), "little")

    self._net = hk.without_apply_rng(
        hk.transform(functools.partial(_network, config.model.to_dict())))
    self._schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.training_steps, config.warmup_steps + 1),
        end_value=0.0)
    self._optimizer = optax.adamw(self._schedule,
                                  weight_decay=config.weight_decay)

    # Created lazily: the first training step initialises them, and an
    # evaluator gets them from a checkpoint.
    self._params = None
    self._opt_state = None
    self._position = 0
    self._train_batches = None
    self._eval_data = None
    self._wrote_images = False

    # Built once: pmap caches its compilation on the function object.
    self._init_pmap = jax.pmap(self._init, axis_name=_AXIS)
    self._update_pmap = jax.pmap(self._update, axis_name=_AXIS)
    self._eval_pmap = jax.pmap(self._eval_sums, axis_name=_AXIS)

  # Training.

  def step(self, *, global_step: jax.Array, rng: jax.Array,
           writer: Optional[utils.Writer]) -> Dict[str, jax.Array]:
    """One update on the batch at the current input position.

    `rng` is unused: the model has no dropout, and batches come from the
    position. Scalars stay on device; the harness fetches them when it logs.
    """
    del rng
    if self._train_batches is None:
      data = input_pipeline.load(self.config.dataset, "train",
                                 self.config.data_dir)
      self._train_batches = input_pipeline.TrainBatches(
          data, global_batch_size=self.config.batch_size,
          num_devices=self._num_devices, seed=self._data_seed)
    if self._params is None:  # Not restored from a checkpoint.
      self._params, self._opt_state = self._initial_state(
          self._train_batches.image_shape)

    batch = self._train_batches.batch(self._position)
    if not self._wrote_images:
      self._wrote_images = True
      _write_images(writer, self._position,
                    {"train/inputs": batch["image"][0]})
    self._params, self._opt_state, scalars = self._update_pmap(
        self._params, self._opt_state, batch, global_step)
    self._position += 1
    return utils.get_first(scalars)

  def _initial_state(self, image_shape):
    """Parameters and optimizer state, the same on every device."""
    # One compiled program instead of haiku's op-by-op eager init, which
    # takes seconds on a busy CPU. Every device gets the same key.
    dummy = np.zeros((self._num_devices, 1) + tuple(image_shape), np.float32)
    params, opt_state = self._init_pmap(
        utils.bcast_local_devices(self._params_rng), dummy)
    logging.info("Initialised %d parameters.", sum(
        x[0].size for x in jax.tree.leaves(params)))
    return params, opt_state

  def _init(self, rng, dummy_images):
    params = self._net.init(rng, dummy_images)
    return params, self._optimizer.init(params)

  def _loss(self, params, batch):
    logits = self._net.apply(params, batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return losses.mean(), logits

  def _update(self, params, opt_state, batch, global_step):
    """Runs on each device with its slice of the batch."""
    grads, logits = jax.grad(self._loss, has_aux=True)(params, batch)
    # The device axis is where data parallelism happens: every device
    # applies the same averaged gradient, so the copies stay identical.
    grads = jax.lax.pmean(grads, axis_name=_AXIS)
    updates, opt_state = self._optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    scalars = {
        "loss": losses.mean(),
        "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
    }
    scalars = jax.lax.pmean(scalars, axis_name=_AXIS)
    # The rate this step used: optax evaluates the schedule at the count of
    # updates done before it, which is the step index.
    scalars["learning_rate"] = self._schedule(global_step)
    return params, opt_state, scalars

  # Evaluation.

  def evaluate(self, *, global_step: jax.Array, rng: jax.Array,
               writer: Optional[utils.Writer]) -> Dict[str, np.ndarray]:
    """Loss and accuracy over the whole eval split."""
    del rng
    if self._eval_data is None:
      self._eval_data = input_pipeline.load(
          self.config.dataset, self.config.eval_split, self.config.data_dir)
    if self._params is None:  # eval_initial_weights, before any checkpoint.
      self._params, self._opt_state = self._initial_state(
          self._eval_data.images.shape[1:])

    totals = collections.Counter()
    for batch in input_pipeline.eval_batches(
        self._eval_data, global_batch_size=self.config.eval_batch_size,
        num_devices=self._num_devices):
      sums = jax.device_get(utils.get_first(
          self._eval_pmap(self._params, batch)))
      totals.update({k: float(v) for k, v in sums.items()})
    count = totals["count"]
    scalars = {"accuracy": np.float32(totals["correct"] / count),
               "loss": np.float32(totals["loss"] / count)}

    step = int(utils.get_first(global_step))
    final = step >= self.config.training_steps
    # Printed, not only logged, so that the result is the last line a
    # reader sees whatever absl's log settings are.
    print(f"{'Final e' if final else 'E'}valuation at step {step} on "
          f"{int(count)} {self.config.dataset} {self.config.eval_split} "
          f"examples: accuracy: {scalars['accuracy']:.4f}, "
          f"loss: {scalars['loss']:.4f}", flush=True)
    return scalars

  def _eval_sums(self, params, batch):
    """Sums over this device's real examples, then over all devices."""
    logits = self._net.apply(params, batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
    mask = batch["mask"]
    sums = {"loss": (losses * mask).sum(), "correct": (correct * mask).sum(),
            "count": mask.sum()}
    return jax.lax.psum(sums, axis_name=_AXIS)


def _write_images(writer: Optional[utils.Writer], step: int,
                  images: Mapping[str, np.ndarray]) -> None:
  """Logs images if the writer can: it may be None or write scalars only."""
  write_images = getattr(writer, "write_images", None)
  if callable(write_images):
    write_images(step, images)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
