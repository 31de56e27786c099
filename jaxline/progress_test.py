"""Tests for `jaxline.progress`: the text of the progress line."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxline import progress


@pytest.mark.parametrize("value,text", [
    (0.123456789, "0.123457"),
    (2.0, "2.0"),
    (-3.0, "-3.0"),
    (1234567.891, "1.23457e+06"),
    (float("nan"), "nan"),
    (float("-inf"), "-inf"),
    (7, "7"),
    (True, "True"),
    (np.float32(0.5), "0.5"),
    (np.array([1.0, 2.5]), "[1.0, 2.5]"),
])
def test_format_number(value, text):
  assert progress.format_number(value) == text


def test_format_number_of_jax_arrays():
  assert progress.format_number(jnp.float32(1 / 3)) == "0.333333"


def test_format_scalars_leaves_out_steps_per_sec():
  text = progress.format_scalars({"loss": 0.25, "steps_per_sec": 12.5})
  assert text == "{'loss': 0.25}"


def test_progress_suffix():
  assert progress.progress_suffix(120, 1000, 50.0) == (
      " [120/1000 (12.0%), 50 steps/s, ETA 0:00:18]")
  assert progress.progress_suffix(5, None, 2.0) == " [2 steps/s]"
  assert progress.progress_suffix(5, 10, None) == " [5/10 (50.0%)]"
  assert progress.progress_suffix(5, None, None) == ""


def _logged(monkeypatch):
  lines = []
  monkeypatch.setattr(progress.logging, "info",
                      lambda fmt, *args: lines.append(fmt % args))
  return lines


def test_rate_leaves_out_the_first_step_and_follows_recent_speed(monkeypatch):
  lines = _logged(monkeypatch)
  logger = progress.ProgressLogger(training_steps=100, interval_type="steps",
                                   interval=10, run_async=False)
  logger.update_time(0.0, 0)
  t = 30.0  # The first step (compiling) ends 30 s in.
  logger(t, 1, {"loss": 1.0})
  for step in range(2, 21):  # Then 10 steps/s.
    t += 0.1
    logger(t, step, {"loss": 1.0})
  assert len(lines) == 2
  assert lines[0].startswith("global_step: 10, {'loss': 1.0} [10/100 (10.0%), ")
  rate = float(re.search(r", ([\d.]+) steps/s", lines[1]).group(1))
  assert rate == pytest.approx(10.0)
  assert lines[1].endswith("ETA 0:00:08]")
  # Slower from here on: the rate follows within RATE_WINDOW intervals.
  for step in range(21, 121):
    t += 1.0
    logger(t, step, {"loss": 1.0})
  rate = float(re.search(r", ([\d.]+) steps/s", lines[-1]).group(1))
  assert rate == pytest.approx(1.0)


def test_first_trigger_has_no_rate(monkeypatch):
  lines = _logged(monkeypatch)
  logger = progress.ProgressLogger(training_steps=3, interval_type="steps",
                                   interval=1, run_async=False)
  logger.update_time(0.0, 0)
  logger(5.0, 1, {})
  assert lines == ["global_step: 1, {} [1/3 (33.3%)]"]
