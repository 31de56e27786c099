"""A plain JAX script's time to its first step: the baseline of `startup.py`.

It imports JAX, makes its keys (`PRNGKey`, a split) and a tiny MLP's
parameters with `jax.random`, puts one batch on the device, runs one jitted
SGD update and waits for it. It prints

  IMPORTED <seconds since STARTUP_T0>     once its imports are done
  FIRST_STEP <seconds since STARTUP_T0>   once the step's results are ready

where `STARTUP_T0` is the `time.time()` that `startup.py` took just before
starting this process. `startup_jaxline.py` imports the model from here, so
both children compile and run the same step.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

BATCH = 32
SIZES = (64, 128, 128, 10)  # Input features, two hidden layers, classes.
LEARNING_RATE = 0.1


@jax.jit
def init_params(key: jax.Array) -> list:
  """Weights and biases of the dense layers, drawn with `jax.random`.

  As a training script does: its key comes from `PRNGKey(seed)` and a
  split, which jaxline makes for the experiment (`init_rng`), so both
  children compile the same key and init programs.
  """
  keys = jax.random.split(key, len(SIZES) - 1)
  return [(jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros((n,)))
          for k, m, n in zip(keys, SIZES[:-1], SIZES[1:])]


def seed_keys(seed: int = 0) -> tuple:
  """The script's own key and the key its init uses."""
  key, init_key = jax.random.split(jax.random.PRNGKey(seed))
  return key, init_key


def batch(seed: int = 1) -> tuple:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(BATCH, SIZES[0])).astype(np.float32),
          rng.integers(0, SIZES[-1], (BATCH,)).astype(np.int32))


def _loss(params, images, labels):
  x = images
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  logits = x @ w + b
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()


@jax.jit
def update(params, images, labels):
  """One SGD step; returns the new parameters and the loss before it."""
  loss, grads = jax.value_and_grad(_loss)(params, images, labels)
  params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
  return params, loss


def report(marker: str) -> None:
  """Prints `marker` and the seconds since `startup.py` started us."""
  elapsed = time.time() - float(os.environ.get("STARTUP_T0", time.time()))
  print(f"{marker} {elapsed:.4f}", flush=True)


def main() -> None:
  report("IMPORTED")
  _, init_key = seed_keys()
  params = init_params(init_key)
  images, labels = jax.device_put(batch())
  params, loss = update(params, images, labels)
  jax.block_until_ready((params, loss))
  report("FIRST_STEP")


if __name__ == "__main__":
  main()
