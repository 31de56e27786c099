"""ResNet-50 steps/s through jaxline's `train()` and through a plain loop.

Issue 12, point 6: the loop benchmark's MLP and no-op steps say what the
loop costs per step; this says what that cost is worth on a real step, a
ResNet-50 SGD update on a GPU, where a step takes tens of milliseconds and
the loop should vanish in it. Both loops call the same compiled update on
the same synthetic ImageNet-shaped batch, made once on the devices, so only
the loop differs:

  plain    a Python loop of the update with constant inputs: `--warmup`
           steps, then `--steps` steps timed up to `jax.block_until_ready`
           of the last one's outputs (issue 12's "physical limit of a loop").
  jaxline  `jaxline.train.train(...)` as a user runs it: the base config
           (logging every 60 s and 120 s, checkpoints every 300 s, so
           nothing periodic fires in a run this short), the non-finite guard
           on, `InMemoryCheckpointer`, a no-op writer. The experiment's
           `step` calls the update and returns `{"loss": loss}`; it starts
           the clock after `--warmup` steps and stops it after the last one
           with `jax.block_until_ready`, so compiling, building the
           experiment and the final save are left out, as in the plain loop.

The model is `haiku.nets.ResNet50(num_classes=1000)` (`--model resnet18` for
quick CPU runs): float32 parameters, bfloat16 compute, batch norm in float32
(haiku's mixed-precision policies, as haiku's own ImageNet example sets
them: `jmp` comes with haiku). Batch norm stays in float32 because in
bfloat16 its variance, E[x^2] - E[x]^2, can come out negative, and one NaN
loss would stop `train()` at the non-finite guard. Softmax cross-entropy on
integer labels, `optax.sgd` with momentum 0.9 and a constant learning rate,
batch-norm statistics carried as haiku state; parameters, state and
optimiser state are donated to the update.

Two experiment styles (`--style`, by default both):

  pmap     `jax.pmap` over the local devices, gradients (and the loss)
           averaged with `jax.lax.pmean` over axis "i"; per-device copies of
           the parameters from `utils.bcast_local_devices`; `step` returns
           device 0's loss (`utils.get_first`). Batch-norm statistics are
           per device, as in haiku's ImageNet example.
  sharded  `jax.jit` over global arrays: parameters replicated with
           `sharding.replicate`, the global batch split over the data axis
           (`sharding.batch_sharded`). Batch-norm statistics here are over
           the global batch (XLA inserts the reduction), so on several
           devices the two styles' steps differ a little in work.

Plain and jaxline runs alternate, `--repeats` times each, every run from the
same initial values. Printed per style: steps/s of each (the median over
repeats, and every repeat), the ratio plain / jaxline in steps/s (the time
jaxline takes per step over the plain loop's; 1.00 is no overhead), images/s,
and the device kind, JAX version and device count.

Usage:
  python benchmarks/resnet50.py                      # a GPU: batch 128/device
  python benchmarks/resnet50.py --style pmap --repeats 5
  python benchmarks/resnet50.py --batch_per_device 2 --image_size 32 \\
      --steps 3 --warmup 1 --repeats 1 --model resnet18   # CPU smoke run

It runs on the devices JAX finds (it sets no platform). It prints results,
exits 0, and never asserts on timings.
"""

import os
import sys

# Run from a checkout without installing: the repository root goes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import functools
import statistics
import time
from typing import Any, List, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import optax

from jaxline import base_config
from jaxline import devices as devices_lib
from jaxline import experiment as experiment_lib
from jaxline import sharding
from jaxline import train as train_lib
from jaxline import utils
from jaxline import writers
# pylint: enable=g-import-not-at-top,wrong-import-position

AXIS = "i"
NUM_CLASSES = 1000
MODELS = {"resnet50": hk.nets.ResNet50, "resnet18": hk.nets.ResNet18}
STYLES = ("pmap", "sharded")


def _set_precision(model_cls) -> None:
  """bfloat16 compute with float32 parameters; batch norm all in float32.

  Parameters are kept and updated in float32 and cast to bfloat16 where the
  model reads them, so the gradients come back in float32. Logits come out
  in float32 for the loss.
  """
  hk.mixed_precision.set_policy(
      model_cls, jmp.get_policy("params=float32,compute=bfloat16,"
                                "output=float32"))
  hk.mixed_precision.set_policy(
      hk.BatchNorm, jmp.get_policy("params=float32,compute=float32,"
                                   "output=bfloat16"))


def _make_forward(model: str) -> hk.TransformedWithState:
  model_cls = MODELS[model]
  _set_precision(model_cls)

  def forward(images, is_training):
    return model_cls(num_classes=NUM_CLASSES)(images, is_training=is_training)

  return hk.transform_with_state(forward)


def _loss_fn(forward, params, state, images, labels):
  """Mean softmax cross-entropy; returns (loss, new batch-norm state)."""
  logits, new_state = forward.apply(params, state, None, images,
                                    is_training=True)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()
  # Keep the state's dtypes whatever the policy computed them in, so every
  # step sees the same input types (no retrace, donation reuses buffers).
  new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state,
                           state)
  return loss, new_state


def _update(forward, optimizer, axis_name, params, state, opt_state, images,
            labels):
  """One SGD step: (params, state, opt_state, loss)."""
  grad_fn = jax.value_and_grad(functools.partial(_loss_fn, forward),
                               has_aux=True)
  (loss, state), grads = grad_fn(params, state, images, labels)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, state, opt_state, loss


class Bench:
  """One style's compiled update, batch and initial values, for both loops.

  The batch is made on the devices once and never changes. The initial
  parameters, state and optimiser state are kept on the host: the update
  donates its inputs, so every run places its own fresh copy (`fresh`) and
  every run does the same work from the same start.
  """

  def __init__(self, style: str, args):
    self.style = style
    forward = _make_forward(args.model)
    optimizer = optax.sgd(args.learning_rate, momentum=0.9)
    size = args.image_size
    key = jax.random.PRNGKey(0)
    init_key, image_key, label_key = jax.random.split(key, 3)

    params, state = jax.jit(functools.partial(forward.init, is_training=True))(
        init_key, jnp.zeros((1, size, size, 3), jnp.float32))
    opt_state = optimizer.init(params)
    self._host_init = jax.device_get((params, state, opt_state))

    if style == "pmap":
      n = jax.local_device_count()
      shape = (n, args.batch_per_device)
      batch_sharding = devices_lib.per_device_sharding()
      self.update = jax.pmap(
          functools.partial(_update, forward, optimizer, AXIS),
          axis_name=AXIS, donate_argnums=(0, 1, 2))
    else:
      n = jax.device_count()
      shape = (n * args.batch_per_device,)
      batch_sharding = sharding.batch_sharded()
      replicated = sharding.replicated()
      self.update = jax.jit(
          functools.partial(_update, forward, optimizer, None),
          donate_argnums=(0, 1, 2),
          out_shardings=(replicated,) * 4)
    self.global_batch = n * args.batch_per_device

    # Made by the devices in place: nothing crosses from the host.
    @functools.partial(jax.jit, out_shardings=(batch_sharding,
                                               batch_sharding))
    def make_batch():
      images = jax.random.normal(image_key, shape + (size, size, 3),
                                 jnp.bfloat16)
      labels = jax.random.randint(label_key, shape, 0, NUM_CLASSES,
                                  jnp.int32)
      return images, labels

    self.batch = jax.block_until_ready(make_batch())

  def fresh(self) -> Tuple[Any, Any, Any]:
    """New device copies of the initial (params, state, opt_state)."""
    if self.style == "pmap":
      values = utils.bcast_local_devices(self._host_init)
    else:
      values = sharding.replicate(self._host_init)
    return jax.block_until_ready(values)

  def first(self, loss: jax.Array) -> jax.Array:
    """The loss to log: device 0's copy in the pmap style."""
    return utils.get_first(loss) if self.style == "pmap" else loss


class Timer:
  """Clocks steps `warmup + 1 .. warmup + steps` from inside `step`.

  `after` is called with each step's outputs. After the warm-up steps it
  waits for them and starts the clock; after the last step it waits again
  and stops it. Only the timed steps' dispatch and execution fall in
  between, never the compile or the harness's start-up and final save.
  """

  def __init__(self, warmup: int, steps: int):
    self.warmup = warmup
    self.steps = steps
    self.calls = 0
    self.start: Optional[float] = None
    self.stop: Optional[float] = None

  def after(self, outputs: Any) -> None:
    self.calls += 1
    if self.calls == self.warmup:
      jax.block_until_ready(outputs)
      self.start = time.perf_counter()
    elif self.calls == self.warmup + self.steps:
      jax.block_until_ready(outputs)
      self.stop = time.perf_counter()

  def steps_per_sec(self) -> float:
    if self.start is None or self.stop is None:
      raise RuntimeError(f"Only {self.calls} steps ran; the timer needs "
                         f"{self.warmup + self.steps}.")
    return self.steps / (self.stop - self.start)


class ResNetExperiment(experiment_lib.AbstractExperiment):
  """The bench's update as a jaxline experiment, written as a user would."""

  CHECKPOINT_ATTRS = {"_params": "params", "_state": "state",
                      "_opt_state": "opt_state"}

  def __init__(self, mode: str, init_rng: Optional[jax.Array] = None, *,
               bench: Bench, timer: Timer):
    super().__init__(mode, init_rng)
    self._bench = bench
    self._timer = timer
    self._params, self._state, self._opt_state = bench.fresh()

  def step(self, *, global_step, rng, writer):
    del global_step, rng, writer  # The synthetic step needs neither.
    images, labels = self._bench.batch
    self._params, self._state, self._opt_state, loss = self._bench.update(
        self._params, self._state, self._opt_state, images, labels)
    self._timer.after((self._params, loss))
    return {"loss": self._bench.first(loss)}

  def evaluate(self, *, global_step, rng, writer):
    raise NotImplementedError("A training benchmark: nothing to evaluate.")


def run_plain(bench: Bench, warmup: int, steps: int) -> float:
  """The plain loop's steps/s: the update alone, inputs on the devices."""
  params, state, opt_state = bench.fresh()
  images, labels = bench.batch
  for _ in range(warmup):
    params, state, opt_state, loss = bench.update(params, state, opt_state,
                                                  images, labels)
  jax.block_until_ready((params, loss))
  start = time.perf_counter()
  for _ in range(steps):
    params, state, opt_state, loss = bench.update(params, state, opt_state,
                                                  images, labels)
  jax.block_until_ready((params, loss))
  return steps / (time.perf_counter() - start)


def run_jaxline(bench: Bench, warmup: int, steps: int) -> float:
  """`jaxline.train.train`'s steps/s, timed inside `step`."""
  config = base_config.get_base_config()
  config.training_steps = warmup + steps
  config.experiment_style = bench.style
  config.checkpoint_dir = ""
  timer = Timer(warmup, steps)
  factory = functools.partial(ResNetExperiment, bench=bench, timer=timer)
  utils.GLOBAL_CHECKPOINT_DICT.clear()
  checkpointer = utils.InMemoryCheckpointer(config, "train")
  train_lib.train(factory, config, checkpointer, writers.NullWriter())
  utils.GLOBAL_CHECKPOINT_DICT.clear()  # Drops the final save's host copy.
  return timer.steps_per_sec()


def measure(style: str, args) -> Tuple[List[float], List[float], int]:
  """(plain steps/s per repeat, jaxline steps/s per repeat, global batch).

  The order alternates between repeats (plain first, then jaxline first), so
  a drift in the machine's speed does not favour one loop.
  """
  bench = Bench(style, args)
  plain, harness = [], []
  for r in range(args.repeats):
    order = ("plain", "jaxline") if r % 2 == 0 else ("jaxline", "plain")
    for name in order:
      if name == "plain":
        plain.append(run_plain(bench, args.warmup, args.steps))
      else:
        harness.append(run_jaxline(bench, args.warmup, args.steps))
    print(f"  {style} repeat {r + 1}/{args.repeats}: plain "
          f"{plain[-1]:.2f} steps/s, jaxline {harness[-1]:.2f} steps/s",
          flush=True)
  return plain, harness, bench.global_batch


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--style", default="both",
                      choices=("both",) + STYLES)
  parser.add_argument("--model", default="resnet50", choices=tuple(MODELS))
  parser.add_argument("--steps", type=int, default=100,
                      help="Timed steps per run.")
  parser.add_argument("--warmup", type=int, default=10,
                      help="Untimed steps before them (at least 1: the "
                      "first compiles).")
  parser.add_argument("--batch_per_device", type=int, default=None,
                      help="Images per device (default 128; 4 on CPU).")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=3,
                      help="Runs of each loop, interleaved.")
  parser.add_argument("--learning_rate", type=float, default=0.05,
                      help="Constant SGD learning rate.")
  args = parser.parse_args(argv)
  if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
    parser.error("--warmup, --steps and --repeats must be at least 1.")
  if args.batch_per_device is None:
    args.batch_per_device = 4 if jax.default_backend() == "cpu" else 128
  return args


def main(argv: List[str]) -> int:
  args = parse_args(argv)
  device = jax.devices()[0]
  print(f"{args.model}: jax {jax.__version__}, {jax.device_count()} "
        f"{jax.default_backend()} device(s) ({jax.local_device_count()} "
        f"local), device_kind {device.device_kind!r}")
  print(f"batch {args.batch_per_device}/device of {args.image_size}x"
        f"{args.image_size}x3 bfloat16, {args.warmup} warm-up + "
        f"{args.steps} timed steps, {args.repeats} repeat(s)", flush=True)
  styles = STYLES if args.style == "both" else (args.style,)
  rows = []
  for style in styles:
    plain, harness, global_batch = measure(style, args)
    rows.append((style, statistics.median(plain), statistics.median(harness),
                 global_batch))

  print()
  print(f"device_kind {device.device_kind!r}, jax {jax.__version__}, "
        f"{jax.device_count()} device(s), {args.model}, batch "
        f"{args.batch_per_device}/device, image {args.image_size}")
  header = (f"{'style':8} {'plain steps/s':>14} {'jaxline steps/s':>16} "
            f"{'ratio':>6} {'plain img/s':>12} {'jaxline img/s':>14}")
  print(header)
  print("-" * len(header))
  for style, plain, harness, global_batch in rows:
    print(f"{style:8} {plain:14.2f} {harness:16.2f} {plain / harness:6.3f} "
          f"{plain * global_batch:12.1f} {harness * global_batch:14.1f}")
  print("ratio: plain steps/s over jaxline's (jaxline's time per step over "
        "the plain loop's); medians over repeats.")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
