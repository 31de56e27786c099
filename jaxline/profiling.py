"""`config.profile_start_step`: a `jax.profiler` trace of a few steps.

The trace covers the steps that receive `global_step` from
`profile_start_step` to `profile_start_step + profile_num_steps - 1`, and goes
to `<checkpoint_dir>/profile/`: open it with TensorBoard's profile plugin
(`tensorboard --logdir <checkpoint_dir>/profile`, with
`tensorboard-plugin-profile` installed), or load the `perfetto_trace.json.gz`
file it writes into https://ui.perfetto.dev.
"""

import os
from typing import Any

from absl import logging
import jax


def profile_dir(config) -> str:
  """Where traces go; each process of a job has its own subdirectory."""
  directory = os.path.abspath(os.path.join(
      os.path.expanduser(config.checkpoint_dir), "profile"))
  if jax.process_count() > 1:
    directory = os.path.join(directory, f"process_{jax.process_index()}")
  return directory


class ProfileSteps:
  """A periodic action that starts and stops the trace at step boundaries."""

  def __init__(self, *, start_step: int, num_steps: int, logdir: str):
    self._start = start_step
    self._stop = start_step + num_steps
    self._logdir = logdir
    self._running = False
    self._done = False

  def _begin(self) -> None:
    logging.info("Profiling steps %d to %d into %s.", self._start,
                 self._stop - 1, self._logdir)
    jax.profiler.start_trace(self._logdir, create_perfetto_trace=True)
    self._running = True

  def _end(self, outputs: Any = None) -> None:
    if outputs is not None:  # The traced steps' device work must be in.
      jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self._running, self._done = False, True
    logging.info("Profile written to %s.", self._logdir)

  def update_time(self, t: float, step: int) -> None:
    del t
    if self._running or self._done:
      return
    if step == self._start:
      self._begin()
    elif step > self._start:
      logging.warning("Not profiling: config.profile_start_step=%d is before "
                      "the resumed global_step %d.", self._start, step)
      self._done = True

  def __call__(self, t: float, step: int, scalar_outputs: Any) -> None:
    del t
    if self._running and step >= self._stop:
      self._end(scalar_outputs)
    elif not self._running and not self._done and step == self._start:
      self._begin()

  def wait_to_finish(self) -> None:
    """Ends a trace that training outran (fewer steps left than asked)."""
    if self._running:
      self._end()
