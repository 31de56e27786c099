"""Tests for `jaxline.experiment.AbstractExperiment` (contract §2).

Everything here runs on however many local devices the process has: 1 by
default, 8 with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

import logging as pylogging
import types

import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import pytest

from jaxline import base_config
from jaxline import experiment
from jaxline import rng as rng_lib
from jaxline import sharding
from jaxline import utils

# Contract §4 reference vectors: seed 42, JAX 0.10.2 defaults, process 0.
_TRAIN_KEY_42 = [1832780943, 270669613]
_STEP_KEYS_DEVICE_0 = [[2852371275, 1535037118], [1415740534, 3212940511],
                       [964605173, 3278640507]]
_STEP_KEYS_DEVICE_1 = [[2232176465, 33846082], [3288317168, 3869482587],
                       [3557650011, 3028360806]]


pytestmark = pytest.mark.usefixtures("fresh_jaxline_state")


def _n():
  return jax.local_device_count()


class _Recorder(experiment.AbstractExperiment):
  """Records what the default `train_loop` hands to `step`."""

  CHECKPOINT_ATTRS = {"_params": "params"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_host_counter": "host_counter"}

  def __init__(self, mode, init_rng=None):
    super().__init__(mode, init_rng=init_rng)
    self.mode = mode
    self.calls = []
    self.outputs = []
    self._params = None
    self._host_counter = 0

  def step(self, *, global_step, rng, writer):
    self.calls.append(dict(global_step=global_step, rng=rng, writer=writer))
    self._host_counter += 1
    out = {"loss": np.float32(len(self.calls))}
    self.outputs.append(out)
    return out

  def evaluate(self, *, global_step, rng, writer):
    return {}


def _train_config(**overrides):
  config = base_config.get_base_config()
  config.training_steps = 3
  for key, value in overrides.items():
    config[key] = value
  return config


def _loop_state(exp, global_step=0, rng=None):
  state = config_dict.ConfigDict()
  state.global_step = global_step
  state.experiment_module = exp
  if rng is None:
    rng = jnp.asarray(np.array(_TRAIN_KEY_42, np.uint32))
  state.train_step_rng = exp.initialize_train_step_rng(rng)
  return state


def _assert_per_device(x, shape_per_device):
  """`x` is laid out like a pmap output: slice i on local_devices()[i]."""
  assert isinstance(x, jax.Array)
  assert x.shape == (_n(),) + tuple(shape_per_device)
  devices = jax.local_devices()
  assert x.sharding.device_set == set(devices)
  starts = {}
  for shard in x.addressable_shards:
    assert shard.data.shape == (1,) + tuple(shape_per_device)
    starts[shard.device] = shard.index[0].start or 0
  assert starts == {d: i for i, d in enumerate(devices)}


class _RecordingAction:
  """A periodic action that records every call."""

  def __init__(self):
    self.calls = []

  def __call__(self, t, step, scalar_outputs):
    self.calls.append((t, step, scalar_outputs))

  def update_time(self, t, step):
    pass

  def wait_to_finish(self):
    pass


# --- Abstract members ------------------------------------------------------


def test_init_step_evaluate_are_abstract():
  assert {"__init__", "step", "evaluate"} <= (
      experiment.AbstractExperiment.__abstractmethods__)

  class NoInit(experiment.AbstractExperiment):

    def step(self, *, global_step, rng, writer):
      return {}

    def evaluate(self, *, global_step, rng, writer):
      return {}

  with pytest.raises(TypeError):
    NoInit("train")

  class NoStep(experiment.AbstractExperiment):

    def __init__(self, mode, init_rng=None):
      pass

    def evaluate(self, *, global_step, rng, writer):
      return {}

  with pytest.raises(TypeError):
    NoStep("train")


@pytest.mark.parametrize("style", ["keyword", "positional", "no_super"])
def test_subclass_may_call_base_init_any_way(style):

  class Exp(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {"_w": "w"}

    def __init__(self, mode, init_rng=None):
      if style == "keyword":
        super().__init__(mode=mode, init_rng=init_rng)
      elif style == "positional":
        super().__init__(mode, init_rng)
      self._w = utils.bcast_local_devices(np.arange(2, dtype=np.float32))

    def step(self, *, global_step, rng, writer):
      return {}

    def evaluate(self, *, global_step, rng, writer):
      return {}

  exp = Exp("train", jax.random.PRNGKey(0))
  # No base method depends on state the base __init__ would set.
  snapshot = exp.snapshot_state()
  np.testing.assert_array_equal(snapshot["w"], [0.0, 1.0])
  exp.restore_from_snapshot({"w": np.array([5.0, 6.0], np.float32)})
  np.testing.assert_array_equal(np.asarray(exp._w),
                                np.tile([[5.0, 6.0]], (_n(), 1)))
  assert exp.should_run_step(0, _train_config(training_steps=1))
  keys = exp.initialize_train_step_rng(jax.random.PRNGKey(1))
  assert keys.shape == (_n(), 2)


# --- initialize_train_step_rng and should_run_step ---------------------------


def test_initialize_train_step_rng_raw_key():
  exp = _Recorder("train")
  key = jax.random.PRNGKey(42)
  keys = exp.initialize_train_step_rng(key)
  _assert_per_device(keys, (2,))
  assert keys.dtype == np.uint32
  np.testing.assert_array_equal(np.asarray(keys), np.tile([[0, 42]], (_n(), 1)))


def test_initialize_train_step_rng_typed_key():
  exp = _Recorder("train")
  keys = exp.initialize_train_step_rng(jax.random.key(42))
  assert keys.shape == (_n(),)
  assert jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(keys)),
                                np.tile([[0, 42]], (_n(), 1)))


def test_initialize_train_step_rng_is_overridable_and_used_by_loop():

  class Exp(_Recorder):

    def initialize_train_step_rng(self, rng):
      # Distinct per-device state rows.
      rows = [jax.random.fold_in(rng, i) for i in range(_n())]
      return jax.device_put(jnp.stack(rows), jax.sharding.NamedSharding(
          jax.sharding.Mesh(np.array(jax.local_devices()), ("d",)),
          jax.sharding.PartitionSpec("d")))

  exp = Exp("train")
  key = jnp.asarray(np.array(_TRAIN_KEY_42, np.uint32))
  state = _loop_state(exp, rng=key)
  config = _train_config(training_steps=1,
                         random_mode_train="same_host_same_device")
  exp.train_loop(config, state, ())
  rng = np.asarray(exp.calls[0]["rng"])
  for d in range(_n()):
    expected = jax.random.split(jax.random.fold_in(key, d))[0]
    np.testing.assert_array_equal(rng[d], np.asarray(expected))


def test_should_run_step_default():
  exp = _Recorder("train")
  config = _train_config(training_steps=3)
  assert [exp.should_run_step(s, config) for s in range(5)] == [
      True, True, True, False, False]
  assert not exp.should_run_step(0, _train_config(training_steps=0))


# --- Default train_loop (§2.3) -----------------------------------------------


def test_train_loop_step_indices_and_action_counts():
  exp = _Recorder("train")
  state = _loop_state(exp)
  action_a, action_b = _RecordingAction(), _RecordingAction()
  exp.train_loop(_train_config(training_steps=3), state, (action_a, action_b),
                 "the-writer")

  assert state.global_step == 3
  assert type(state.global_step) is int  # pylint: disable=unidiomatic-typecheck
  steps_seen = [np.asarray(c["global_step"]).tolist() for c in exp.calls]
  assert steps_seen == [[0] * _n(), [1] * _n(), [2] * _n()]
  assert [c["writer"] for c in exp.calls] == ["the-writer"] * 3
  for action in (action_a, action_b):
    assert [step for _, step, _ in action.calls] == [1, 2, 3]
    # The scalars at count k are those of the step that received k - 1.
    for (t, _, scalars), out in zip(action.calls, exp.outputs):
      assert scalars is out
      assert isinstance(t, float)


def test_train_loop_calls_actions_in_order_after_each_step():
  events = []

  class Exp(_Recorder):

    def step(self, *, global_step, rng, writer):
      events.append(("step", int(np.asarray(global_step)[0])))
      return {}

  class Action(_RecordingAction):

    def __init__(self, name):
      super().__init__()
      self.name = name

    def __call__(self, t, step, scalar_outputs):
      events.append((self.name, step))

  exp = Exp("train")
  exp.train_loop(_train_config(training_steps=2), _loop_state(exp),
                 [Action("a"), Action("b")])
  assert events == [("step", 0), ("a", 1), ("b", 1),
                    ("step", 1), ("a", 2), ("b", 2)]


def test_train_loop_resumes_from_state_global_step():
  exp = _Recorder("train")
  state = _loop_state(exp, global_step=5)
  action = _RecordingAction()
  exp.train_loop(_train_config(training_steps=7), state, [action])
  assert [int(np.asarray(c["global_step"])[0]) for c in exp.calls] == [5, 6]
  assert [step for _, step, _ in action.calls] == [6, 7]
  assert state.global_step == 7


def test_train_loop_runs_no_step_when_done():
  exp = _Recorder("train")
  state = _loop_state(exp, global_step=3)
  action = _RecordingAction()
  exp.train_loop(_train_config(training_steps=3), state, [action])
  assert not exp.calls
  assert not action.calls
  assert state.global_step == 3


def test_train_loop_uses_overridden_should_run_step():

  class Exp(_Recorder):

    def should_run_step(self, global_step, config):
      assert type(global_step) is int  # pylint: disable=unidiomatic-typecheck
      return global_step < config.experiment_kwargs.my_steps

  exp = Exp("train")
  config = _train_config(training_steps=None)
  config.experiment_kwargs.my_steps = 4
  state = _loop_state(exp)
  exp.train_loop(config, state, ())
  assert len(exp.calls) == 4
  assert state.global_step == 4


def test_train_loop_per_device_step_and_rng_layout():
  exp = _Recorder("train")
  exp.train_loop(_train_config(training_steps=2), _loop_state(exp), ())
  for call in exp.calls:
    _assert_per_device(call["global_step"], ())
    assert call["global_step"].dtype == np.int32
    _assert_per_device(call["rng"], (2,))
    assert call["rng"].dtype == np.uint32


def test_train_loop_global_step_is_int64_under_x64():
  exp = _Recorder("train")
  with jax.enable_x64(True):
    exp.train_loop(_train_config(training_steps=2), _loop_state(exp), ())
    steps = [np.asarray(c["global_step"]) for c in exp.calls]
  assert [s.dtype for s in steps] == [np.int64, np.int64]
  assert [s.tolist() for s in steps] == [[0] * _n(), [1] * _n()]


def test_train_loop_rng_matches_reference_vectors():
  exp = _Recorder("train")
  state = _loop_state(exp)
  exp.train_loop(_train_config(training_steps=3), state, ())
  for i, call in enumerate(exp.calls):
    rng = np.asarray(call["rng"])
    np.testing.assert_array_equal(rng[0], _STEP_KEYS_DEVICE_0[i])
    if _n() > 1:
      np.testing.assert_array_equal(rng[1], _STEP_KEYS_DEVICE_1[i])
      # Unique device: every device has its own key.
      assert len({tuple(r) for r in rng.tolist()}) == _n()
  # The state holds the key for the next step: split(s)[1], three times.
  s = jnp.asarray(np.array(_TRAIN_KEY_42, np.uint32))
  for _ in range(3):
    s = jax.random.split(s)[1]
  np.testing.assert_array_equal(np.asarray(state.train_step_rng),
                                np.tile(np.asarray(s), (_n(), 1)))


def test_train_loop_same_host_same_device_keys():
  exp = _Recorder("train")
  config = _train_config(training_steps=2,
                         random_mode_train="same_host_same_device")
  exp.train_loop(config, _loop_state(exp), ())
  s = jnp.asarray(np.array(_TRAIN_KEY_42, np.uint32))
  for call in exp.calls:
    key, s = jax.random.split(s)
    np.testing.assert_array_equal(np.asarray(call["rng"]),
                                  np.tile(np.asarray(key), (_n(), 1)))


def test_train_loop_typed_keys_have_shape_n():
  exp = _Recorder("train")
  state = _loop_state(exp, rng=jax.random.key(42))
  exp.train_loop(_train_config(training_steps=2), state, ())
  raw = _Recorder("train")
  raw.train_loop(_train_config(training_steps=2),
                 _loop_state(raw, rng=jax.random.PRNGKey(42)), ())
  for typed_call, raw_call in zip(exp.calls, raw.calls):
    rng = typed_call["rng"]
    assert rng.shape == (_n(),)
    assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(rng)),
                                  np.asarray(raw_call["rng"]))


def _styled(exp, style):
  if style == "sharded":
    setattr(exp, experiment.STYLE_ATTR, "sharded")
  return exp


def _per_step_chain(exp, config, state_rng, first_step, num_steps):
  """(step, key, state) per step from one device call per step, as before
  `StepKeys` derived them ahead: the reference for bit-identity."""
  if experiment.is_sharded(exp):
    advance = rng_lib.make_sharded_step_key_fn()
    step = sharding.replicate(np.int32(first_step - 1))
  else:
    fn = rng_lib.make_step_key_fn(config.random_mode_train)
    host_ids = utils.bcast_local_devices(np.int32(0))
    advance = lambda s, r: fn(s, r, host_ids)
    step = utils.bcast_local_devices(np.int32(first_step - 1))
  out = []
  for _ in range(num_steps):
    step, key, state_rng = advance(step, state_rng)
    out.append((np.asarray(step), np.asarray(key), np.asarray(state_rng)))
  return out


class _StateRecorder(_Recorder):
  """Also records the key state the loop holds when `step` runs."""

  def __init__(self, mode, init_rng=None, state=None):
    super().__init__(mode, init_rng=init_rng)
    self.state = state
    self.state_rngs = []

  def step(self, *, global_step, rng, writer):
    self.state_rngs.append(np.asarray(self.state.train_step_rng))
    return super().step(global_step=global_step, rng=rng, writer=writer)


@pytest.mark.parametrize("style", ["pmap", "sharded"])
def test_keys_derived_ahead_are_bit_identical_across_chunks(style):
  # More than two chunks, ending inside the third.
  steps = 2 * experiment.StepKeys.CHUNK + 5
  config = _train_config(training_steps=steps)
  exp = _styled(_StateRecorder("train"), style)
  state = _loop_state(exp)
  exp.state = state
  reference = _per_step_chain(exp, config, _loop_state(exp).train_step_rng,
                              0, steps)
  exp.train_loop(config, state, ())
  assert len(exp.calls) == steps
  for i, (call, (ref_step, ref_key, ref_state)) in enumerate(
      zip(exp.calls, reference)):
    np.testing.assert_array_equal(np.asarray(call["global_step"]), ref_step)
    np.testing.assert_array_equal(np.asarray(call["rng"]), ref_key)
    # While step i runs, the state already holds the key state after it.
    np.testing.assert_array_equal(exp.state_rngs[i], ref_state)
  np.testing.assert_array_equal(np.asarray(state.train_step_rng),
                                reference[-1][2])


@pytest.mark.parametrize("style", ["pmap", "sharded"])
def test_resume_inside_a_chunk_gives_the_uninterrupted_keys(style):
  config = _train_config(training_steps=25)
  full = _styled(_Recorder("train"), style)
  full_state = _loop_state(full)
  full.train_loop(config, full_state, ())

  stop_at = 7  # Inside the first chunk.
  first = _styled(_Recorder("train"), style)
  first_state = _loop_state(first)
  first.train_loop(_train_config(training_steps=stop_at), first_state, ())
  resumed = _styled(_Recorder("train"), style)
  state = _loop_state(resumed, global_step=stop_at)
  state.train_step_rng = first_state.train_step_rng
  resumed.train_loop(config, state, ())

  got = first.calls + resumed.calls
  assert len(got) == len(full.calls) == 25
  for want, call in zip(full.calls, got):
    np.testing.assert_array_equal(np.asarray(call["global_step"]),
                                  np.asarray(want["global_step"]))
    np.testing.assert_array_equal(np.asarray(call["rng"]),
                                  np.asarray(want["rng"]))
  np.testing.assert_array_equal(np.asarray(state.train_step_rng),
                                np.asarray(full_state.train_step_rng))


@pytest.mark.parametrize("style", ["pmap", "sharded"])
@pytest.mark.parametrize("new_step", [3, 10])
def test_key_state_replaced_by_an_action_restarts_the_derivation(
    style, new_step):
  # An action (a restore, say) replaces the key state after step 3, and
  # perhaps the step count: the next steps and keys come from what it set.
  config = _train_config(training_steps=new_step + 4)
  exp = _styled(_Recorder("train"), style)
  state = _loop_state(exp)
  new_rng = exp.initialize_train_step_rng(jax.random.PRNGKey(7))

  class Restore(_RecordingAction):

    def __call__(self, t, step, scalar_outputs):
      if step == 3:
        state.train_step_rng = new_rng
        state.global_step = new_step

  exp.train_loop(config, state, [Restore()])
  assert len(exp.calls) == 3 + 4
  reference = _per_step_chain(exp, config, new_rng, new_step, 4)
  for call, (ref_step, ref_key, _) in zip(exp.calls[3:], reference):
    np.testing.assert_array_equal(np.asarray(call["global_step"]), ref_step)
    np.testing.assert_array_equal(np.asarray(call["rng"]), ref_key)
  np.testing.assert_array_equal(np.asarray(state.train_step_rng),
                                reference[-1][2])


@pytest.mark.parametrize("style", ["pmap", "sharded"])
def test_step_count_moved_by_an_action_moves_the_global_step(style):
  # The key state is left alone: steps 10 to 13 get the keys that steps 3
  # to 6 would have had, under their own step numbers.
  config = _train_config(training_steps=14)
  exp = _styled(_Recorder("train"), style)
  state = _loop_state(exp)
  reference = _per_step_chain(exp, config, state.train_step_rng, 0, 7)

  class Skip(_RecordingAction):

    def __call__(self, t, step, scalar_outputs):
      if step == 3:
        state.global_step = 10

  exp.train_loop(config, state, [Skip()])
  assert len(exp.calls) == 7
  for i, (call, (ref_step, ref_key, _)) in enumerate(
      zip(exp.calls, reference)):
    want_step = ref_step if i < 3 else ref_step + 7
    np.testing.assert_array_equal(np.asarray(call["global_step"]), want_step)
    np.testing.assert_array_equal(np.asarray(call["rng"]), ref_key)


class _Compiles:
  """Counts XLA compiles in this process (JAX's monitoring events)."""

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc_info):
    jax.monitoring.unregister_event_duration_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@pytest.mark.parametrize("style", ["pmap", "sharded"])
def test_step_keys_compiled_ahead_need_no_compile_in_the_loop(style):
  config = _train_config(training_steps=3, experiment_style=style,
                         random_mode_train="same_host_unique_device")
  train_rng = jnp.asarray(np.array(_TRAIN_KEY_42, np.uint32))
  exp = _styled(_Recorder("train"), style)
  state_rng = exp.initialize_train_step_rng(train_rng)
  # Other tests in this process may have compiled the derivation already.
  rng_lib._cached_step_keys_fn.cache_clear()  # pylint: disable=protected-access
  rng_lib._cached_sharded_step_keys_fn.cache_clear()  # pylint: disable=protected-access
  with _Compiles() as compiles:
    wait = experiment.StepKeys.compile_ahead(_Recorder, config)
    wait()
    assert compiles.count >= 1  # The derivation compiled in the thread.
    before = compiles.count
    keys = experiment.StepKeys(exp, config)
    keys.next(5, state_rng)
    assert compiles.count == before


def test_step_keys_are_not_compiled_ahead_for_a_loop_of_its_own():

  class OwnLoop(_Recorder):

    def train_loop(self, config, state, periodic_actions, writer=None):
      pass

  with _Compiles() as compiles:
    wait = experiment.StepKeys.compile_ahead(OwnLoop, _train_config())
    wait()
  assert compiles.count == 0


@pytest.mark.parametrize("bad", [None, 1.5, [("loss", 1.0)], "loss"])
def test_train_loop_non_mapping_step_output_raises_type_error(bad):

  class Exp(_Recorder):

    def step(self, *, global_step, rng, writer):
      self.calls.append(global_step)
      return bad

  exp = Exp("train")
  action = _RecordingAction()
  with pytest.raises(TypeError, match="mapping"):
    exp.train_loop(_train_config(training_steps=3), _loop_state(exp), [action])
  assert len(exp.calls) == 1  # Raised at the first step.
  assert not action.calls


def test_train_loop_never_mutates_step_output():
  """A real PeriodicAction adds steps_per_sec, to a host copy only."""
  originals = []
  received = []

  class Exp(_Recorder):

    def step(self, *, global_step, rng, writer):
      out = {"loss": jnp.float32(2.0), "acc": np.float32(0.5)}
      originals.append(out)
      # A read-only mapping: any write into it raises.
      return types.MappingProxyType(out)

  action = utils.PeriodicAction(
      lambda step, scalars: received.append((step, scalars)),
      interval_type="steps", interval=1, run_async=False)
  exp = Exp("train")
  exp.train_loop(_train_config(training_steps=3), _loop_state(exp), [action])
  action.wait_to_finish()
  for out in originals:
    assert set(out) == {"loss", "acc"}
  assert [step for step, _ in received] == [1, 2, 3]
  for _, scalars in received:
    assert "steps_per_sec" in scalars
    assert float(scalars["loss"]) == 2.0


# --- snapshot_state / restore_from_snapshot (§2.2) ---------------------------


class _Snap(experiment.AbstractExperiment):
  """Per-device params, host state, and a lazily created attribute."""

  CHECKPOINT_ATTRS = {"_params": "params", "_lazy": "lazy"}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_counter": "counter",
                                    "_whole": "whole"}

  def __init__(self, mode="train", init_rng=None):
    super().__init__(mode, init_rng)
    self._params = {"w": utils.bcast_local_devices(
        np.arange(3, dtype=np.float32)),
                    "b": utils.bcast_local_devices(np.int32(7))}
    self._lazy = None
    self._counter = 11
    self._whole = {"table": np.arange(4)}

  def step(self, *, global_step, rng, writer):
    return {}

  def evaluate(self, *, global_step, rng, writer):
    return {}


def test_snapshot_state_contents():
  exp = _Snap()
  snapshot = exp.snapshot_state()
  assert isinstance(snapshot, dict)
  assert set(snapshot) == {"params", "lazy", "counter", "whole"}
  np.testing.assert_array_equal(np.asarray(snapshot["params"]["w"]),
                                [0.0, 1.0, 2.0])
  assert np.asarray(snapshot["params"]["w"]).shape == (3,)
  assert np.asarray(snapshot["params"]["b"]).shape == ()
  assert int(snapshot["params"]["b"]) == 7
  assert snapshot["lazy"] is None
  assert snapshot["counter"] == 11
  assert snapshot["whole"] is exp._whole  # Stored whole, as given.
  # A new dict every call.
  assert exp.snapshot_state() is not snapshot


def test_snapshot_state_reads_device_zero_slice():
  exp = _Snap()
  rows = np.arange(_n() * 2, dtype=np.float32).reshape(_n(), 2)
  exp._params = {"w": jax.device_put(rows, jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.local_devices()), ("d",)),
      jax.sharding.PartitionSpec("d"))), "b": None}
  snapshot = exp.snapshot_state()
  np.testing.assert_array_equal(np.asarray(snapshot["params"]["w"]), rows[0])
  assert snapshot["params"]["b"] is None


def test_snapshot_state_warns_when_nothing_is_checkpointed(caplog):

  class Empty(experiment.AbstractExperiment):

    def __init__(self, mode, init_rng=None):
      pass

    def step(self, *, global_step, rng, writer):
      return {}

    def evaluate(self, *, global_step, rng, writer):
      return {}

  caplog.set_level(pylogging.WARNING, logger="absl")
  assert Empty("train").snapshot_state() == {}
  assert any(r.levelno == pylogging.WARNING for r in caplog.records)

  caplog.clear()
  _Snap().snapshot_state()
  assert not [r for r in caplog.records if r.levelno >= pylogging.WARNING]


def test_restore_from_snapshot_broadcasts_and_keeps_whole():
  exp = _Snap()
  whole = {"table": np.array([9, 8])}
  exp.restore_from_snapshot({
      "params": {"w": np.array([4.0, 5.0, 6.0], np.float32),
                 "b": np.int32(3)},
      "lazy": None,
      "counter": 42,
      "whole": whole,
  })
  _assert_per_device(exp._params["w"], (3,))
  np.testing.assert_array_equal(np.asarray(exp._params["w"]),
                                np.tile([4.0, 5.0, 6.0], (_n(), 1)))
  np.testing.assert_array_equal(np.asarray(exp._params["b"]), [3] * _n())
  assert exp._lazy is None
  assert exp._counter == 42
  assert exp._whole is whole  # Not sliced, broadcast or copied.


def test_snapshot_restore_round_trip():
  exp = _Snap()
  exp._lazy = utils.bcast_local_devices(np.float32(1.5))
  snapshot = exp.snapshot_state()
  other = _Snap()
  other._counter = 0
  other.restore_from_snapshot(snapshot)
  np.testing.assert_array_equal(np.asarray(other._params["w"]),
                                np.asarray(exp._params["w"]))
  np.testing.assert_array_equal(np.asarray(other._lazy), [1.5] * _n())
  assert other._counter == 11


def test_restore_from_snapshot_deletes_before_placing(monkeypatch):
  exp = _Snap()
  seen = []
  real_bcast = utils.bcast_local_devices

  def bcast(value):
    seen.append({a: a in exp.__dict__ for a in ("_params", "_lazy",
                                                 "_counter", "_whole")})
    return real_bcast(value)

  monkeypatch.setattr(utils, "bcast_local_devices", bcast)
  exp.restore_from_snapshot(exp.snapshot_state())
  assert seen
  # When the first new buffer is placed, every mapped attribute is gone.
  assert seen[0] == {"_params": False, "_lazy": False, "_counter": False,
                     "_whole": False}


@pytest.mark.parametrize("missing", ["params", "counter"])
def test_restore_missing_key_raises_before_deleting(missing):
  exp = _Snap()
  before = dict(exp.__dict__)
  snapshot = exp.snapshot_state()
  del snapshot[missing]
  with pytest.raises(KeyError, match=missing):
    exp.restore_from_snapshot(snapshot)
  # F19: the experiment is left intact.
  for attr in ("_params", "_lazy", "_counter", "_whole"):
    assert attr in exp.__dict__
    assert exp.__dict__[attr] is before[attr]


def test_restore_does_not_delete_class_level_defaults():

  class Exp(_Snap):
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_counter": "counter",
                                      "_class_default": "cd"}
    _class_default = "class value"

  exp = Exp()
  assert "_class_default" not in exp.__dict__
  snapshot = exp.snapshot_state()
  assert snapshot["cd"] == "class value"
  snapshot["cd"] = "restored"
  exp.restore_from_snapshot(snapshot)
  assert exp._class_default == "restored"
  assert Exp.__dict__["_class_default"] == "class value"
  # Restoring again deletes the instance value, never the class one.
  exp.restore_from_snapshot(snapshot)
  assert Exp.__dict__["_class_default"] == "class value"


def test_attribute_maps_are_read_through_self_as_properties():

  class Exp(_Snap):

    @property
    def CHECKPOINT_ATTRS(self):  # pylint: disable=invalid-name
      if self.mode == "train":
        return {"_params": "train_params"}
      return {"_params": "eval_params"}

    @property
    def NON_BROADCAST_CHECKPOINT_ATTRS(self):  # pylint: disable=invalid-name
      return {"_counter": f"{self.mode}_counter"}

    def __init__(self, mode, init_rng=None):
      self.mode = mode
      super().__init__(mode, init_rng)

  train_exp, eval_exp = Exp("train"), Exp("eval")
  assert set(train_exp.snapshot_state()) == {"train_params", "train_counter"}
  assert set(eval_exp.snapshot_state()) == {"eval_params", "eval_counter"}
  # Changing the instance state changes the keys at the next use.
  train_exp.mode = "eval"
  snapshot = train_exp.snapshot_state()
  assert set(snapshot) == {"eval_params", "eval_counter"}
  train_exp.restore_from_snapshot(snapshot)
  with pytest.raises(KeyError, match="eval_counter"):
    eval_exp.restore_from_snapshot({"eval_params": snapshot["eval_params"]})


def test_instance_attribute_maps_take_precedence():
  exp = _Snap()
  exp.CHECKPOINT_ATTRS = {"_params": "p"}
  exp.NON_BROADCAST_CHECKPOINT_ATTRS = {}
  snapshot = exp.snapshot_state()
  assert set(snapshot) == {"p"}
  exp.restore_from_snapshot(snapshot)
  # Only the instance maps are used: the class's "counter" is not required.
  assert exp._counter == 11


def test_overrides_calling_super_add_keys():

  class Exp(_Snap):

    def snapshot_state(self):
      snapshot = super().snapshot_state()
      snapshot["extra"] = self._counter * 2
      return snapshot

    def restore_from_snapshot(self, snapshot_state):
      super().restore_from_snapshot(snapshot_state)
      self.extra = snapshot_state["extra"]

  exp = Exp()
  snapshot = exp.snapshot_state()
  assert snapshot["extra"] == 22
  exp.restore_from_snapshot(snapshot)
  assert exp.extra == 22


def test_on_new_best_model_is_a_no_op():
  exp = _Snap()
  best = config_dict.ConfigDict({"global_step": 3})
  assert exp.on_new_best_model(best) is None
  assert best.to_dict() == {"global_step": 3}
