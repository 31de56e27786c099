"""The training loop adds no device-to-host transfer and no wait per step.

`train()` runs as a user runs it (default intervals, the non-finite guard
on, a TensorBoard writer), and the steps between periodic actions run under
`jax.transfer_guard_device_to_host("disallow")`. That guard raises on a GPU
or TPU, but on XLA:CPU numpy reads a device buffer in place, so nothing
counts as a transfer there (jax-ml/jax#16602). The test therefore also
counts, in the loop's thread, every copy of an array to numpy and every
wait for one, by wrapping `ArrayImpl._value` and `block_until_ready` (JAX
internals; if they move, the test fails and says so). A control run whose
step reads its loss on the host shows that the check sees a fetch.
"""

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxline import base_config
from jaxline import experiment
from jaxline import sharding
from jaxline import train
from jaxline import utils
from jaxline import writers

pytestmark = pytest.mark.usefixtures("fresh_jaxline_state")

_STEPS = 2 * experiment.StepKeys.CHUNK + 3  # Crosses two chunk boundaries.


class _HostCopies:
  """Counts host copies of arrays and waits for them, in one thread.

  Wraps what a fetch goes through: the array type's `__array__`, `_value`
  (`float`, `.item()`, `.tolist()`, printing) and `block_until_ready`, and
  `numpy.asarray`/`numpy.array` given a `jax.Array` (on CPU numpy reads the
  buffer without calling back into the array, so those are caught at the
  call). Counts only while `active`, in the thread that entered.
  """

  def __init__(self):
    self.counts = collections.Counter()
    self.active = False
    self._thread = threading.get_ident()
    self._undo = []

  def _record(self, kind: str) -> None:
    if self.active and threading.get_ident() == self._thread:
      self.counts[kind] += 1

  def _wrap(self, owner, name: str, kind: str, *, arrays_only=False) -> None:
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(
        owner, name)
    if isinstance(original, property):
      def fget(array, fget=original.fget):
        self._record(kind)
        return fget(array)
      wrapped = property(fget)
    else:
      def wrapped(*args, **kwargs):
        if not arrays_only or (args and isinstance(args[0], jax.Array)):
          self._record(kind)
        return original(*args, **kwargs)
    self._undo.append((owner, name, original))
    setattr(owner, name, wrapped)

  def __enter__(self):
    impl = type(jnp.zeros(()))
    try:
      self._wrap(impl, "__array__", "fetch")
      self._wrap(impl, "_value", "fetch")
      self._wrap(impl, "block_until_ready", "wait")
    except KeyError as e:
      pytest.fail(f"{impl.__name__} no longer defines {e}; update "
                  "_HostCopies to count host copies another way.")
    self._wrap(np, "asarray", "fetch", arrays_only=True)
    self._wrap(np, "array", "fetch", arrays_only=True)
    self._wrap(jax, "block_until_ready", "wait")
    return self

  def __exit__(self, *exc_info):
    for owner, name, original in reversed(self._undo):
      setattr(owner, name, original)


def _make_experiment(copies: _HostCopies, *, read_loss: bool):

  class Exp(experiment.AbstractExperiment):
    """A linear model's SGD step in either style."""

    CHECKPOINT_ATTRS = {"_params": "params"}

    def __init__(self, mode, init_rng=None):
      super().__init__(mode, init_rng=init_rng)
      self._params = None
      self._update = None

    def _init(self):
      params = np.linspace(-1.0, 1.0, 8, dtype=np.float32)

      def update(params, step, rng):
        x = jax.random.normal(rng, (4, 8))
        loss_fn = lambda p: jnp.mean((x @ p - 1.0) ** 2)
        loss, grad = jax.value_and_grad(loss_fn)(params)
        lr = 0.1 / (1.0 + step.astype(jnp.float32))
        return params - lr * grad, loss

      if experiment.is_sharded(self):
        self._params = sharding.replicate(params)
        self._update = jax.jit(update, donate_argnums=0)
      else:
        self._params = utils.bcast_local_devices(params)
        self._update = jax.pmap(update, axis_name="i", donate_argnums=0)

    def step(self, *, global_step, rng, writer):
      if self._params is None:
        self._init()
      self._params, loss = self._update(self._params, global_step, rng)
      if read_loss:  # The control: a host read in every step.
        np.asarray(loss)
      if not experiment.is_sharded(self):
        loss = utils.get_first(loss)
      return {"loss": loss}

    def evaluate(self, *, global_step, rng, writer):
      return {}

    def train_loop(self, config, state, periodic_actions, writer=None):
      def outside(action):
        def call(*args):
          copies.active = False
          try:
            return action(*args)
          finally:
            copies.active = True
        return call

      copies.active = True
      try:
        with jax.transfer_guard_device_to_host("disallow"):
          super().train_loop(config, state,
                             [outside(a) for a in periodic_actions], writer)
      finally:
        copies.active = False

  return Exp


def _train(tmp_path, style: str, *, read_loss: bool) -> _HostCopies:
  config = base_config.get_base_config()  # Default intervals.
  config.training_steps = _STEPS
  config.experiment_style = style
  config.checkpoint_dir = str(tmp_path)
  writer = writers.TensorBoardLogger(config, "train")
  with _HostCopies() as copies:
    train.train(_make_experiment(copies, read_loss=read_loss), config,
                utils.InMemoryCheckpointer(config, "train"), writer)
  saved = utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1].pickle_nest
  assert saved["global_step"] == _STEPS
  return copies


@pytest.mark.parametrize("style", ["pmap", "sharded"])
def test_loop_fetches_nothing_between_actions(tmp_path, style):
  copies = _train(tmp_path, style, read_loss=False)
  assert copies.counts == {}


@pytest.mark.parametrize("style", ["pmap", "sharded"])
def test_control_a_host_read_in_step_is_seen(tmp_path, style):
  try:
    copies = _train(tmp_path, style, read_loss=True)
  except Exception as e:  # pylint: disable=broad-except
    # Where the guard sees transfers (GPU, TPU) it stops the first step.
    assert "Disallowed device-to-host transfer" in str(e), e
    return
  assert jax.default_backend() == "cpu"
  # At least one count per step (a multi-device array's copy passes
  # through several of the wrapped entry points), and no wait.
  assert set(copies.counts) == {"fetch"}
  assert copies.counts["fetch"] >= _STEPS
