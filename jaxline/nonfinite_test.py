"""Tests for `jaxline.nonfinite`: the checks behind `terminate_on_nan`."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

from jaxline import nonfinite


@pytest.mark.parametrize("scalars,found", [
    ({"loss": 1.0}, None),
    ({"loss": float("nan")}, "loss"),
    ({"a": 1.0, "b": np.array([1.0, np.inf])}, "b"),
    ({"count": np.int32(3), "ok": True, "x": -np.inf}, "x"),
    ({"bf16": jnp.asarray(jnp.nan, jnp.bfloat16)}, "bf16"),
    ({"text": "nan"}, None),  # Not a number: not this check's business.
])
def test_first_non_finite(scalars, found):
  result = nonfinite.first_non_finite(scalars)
  assert (result and result[0]) == found


def test_error_names_the_key_value_and_step():
  error = nonfinite.NonFiniteError("loss", np.float32(np.nan), 7)
  assert "'loss' is nan at global_step 7" in str(error)
  assert "config.terminate_on_nan = False" in str(error)
  assert isinstance(error, FloatingPointError)


def test_background_record_raises_at_the_next_step_in_the_loop():
  guard = nonfinite.NonFiniteGuard()
  guard(0.0, 1, {"loss": 1.0})
  wrapped = guard.checked(lambda step, scalars: "written")
  thread = threading.Thread(target=wrapped, args=(1, {"loss": np.nan}))
  thread.start()
  thread.join()  # The background function itself does not raise.
  with pytest.raises(nonfinite.NonFiniteError, match="global_step 1"):
    guard(0.0, 2, {"loss": 1.0})
  with pytest.raises(nonfinite.NonFiniteError):
    guard.check_before_save()


def test_check_before_save_fetches_the_newest_unchecked_step():
  guard = nonfinite.NonFiniteGuard()
  guard(0.0, 1, {"loss": jnp.asarray([1.0, 2.0])})
  guard.check_before_save()  # Finite.
  guard(0.0, 2, {"loss": jnp.asarray([1.0, jnp.nan])})
  with pytest.raises(nonfinite.NonFiniteError, match="global_step 2"):
    guard.check_before_save()


def test_first_error_is_kept():
  guard = nonfinite.NonFiniteGuard()
  assert not guard.record(3, {"a": np.nan})
  assert not guard.record(4, {"b": np.inf})
  with pytest.raises(nonfinite.NonFiniteError, match="'a' is nan at "
                     "global_step 3"):
    guard.check(5, {})
