"""A plain JAX script's time to its first step: the baseline of `startup.py`.

It imports JAX, builds a tiny MLP and a jitted SGD update, puts one batch on
the device, runs one step and waits for it. It prints

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


def init_params(seed: int = 0) -> list:
  """Weights and biases of the dense layers, made on the host.

  numpy, not `jax.random`: a random init would compile its own program,
  which the two children would then both pay, hiding nothing but adding
  noise.
  """
  rng = np.random.default_rng(seed)
  return [(rng.normal(0.0, 1.0 / np.sqrt(m), (m, n)).astype(np.float32),
           np.zeros((n,), np.float32))
          for m, n in zip(SIZES[:-1], SIZES[1:])]


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
  params = jax.device_put(init_params())
  images, labels = jax.device_put(batch())
  params, loss = update(params, images, labels)
  jax.block_until_ready((params, loss))
  report("FIRST_STEP")


if __name__ == "__main__":
  main()
