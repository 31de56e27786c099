"""What a restore checks before it changes anything.

A checkpoint must fit the experiment it goes into: the same entries and, for
`CHECKPOINT_ATTRS`, the same tree structure, shapes and dtypes as the live
value. State that the experiment creates lazily is checked against
`abstract_snapshot_state()` when the experiment declares it. Values of
`NON_BROADCAST_CHECKPOINT_ATTRS` are host state that may grow (lists,
counters), so only their presence is checked.
"""

from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

# Why an old experiment meets a checkpoint it did not write: 0.0.8 kept
# checkpoints in memory, so a shared /tmp checkpoint_dir never mattered.
MEMORY_HINT = (
    " jaxline restores the newest checkpoint under checkpoint_dir by itself "
    "(jaxline 0.0.8 kept checkpoints in memory only): give each experiment "
    "its own checkpoint_dir, or set config.checkpoint_backend='memory' to "
    "keep them in memory as 0.0.8 did.")


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the experiment; never a reason to fall back."""


class CheckpointUnavailableError(RuntimeError):
  """The step an eval job picked was deleted or cannot be read; skip it.

  Defined here, not beside the disk checkpointer that raises it, so that
  `train.evaluate` can catch it without importing Orbax.
  """


class SavedArray:
  """Stands for an array of the checkpoint before it is read from disk."""

  def __init__(self, node: Dict[str, Any], shape: tuple[int, ...],
               dtype: np.dtype, value: Optional[np.ndarray] = None):
    self.node = node
    self.shape = tuple(shape)
    self.dtype = np.dtype(dtype)
    self.value = value  # Kept in the skeleton itself (small host arrays).

  @property
  def signature(self) -> tuple[tuple[int, ...], str]:
    if self.node.get("key"):  # Saved as key data: one trailing key axis.
      return self.shape[:-1], "key"
    return self.shape, self.dtype.name


def _signature(x: Any) -> Optional[tuple[tuple[int, ...], str]]:
  """(shape, dtype) of an array-like leaf; None for Python values."""
  if isinstance(x, SavedArray):
    return x.signature
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or dtype is None:
    return None
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(shape), "key"
  return tuple(shape), np.dtype(dtype).name


def _show(signature) -> str:
  if signature is None:
    return "a Python value"
  shape, dtype = signature
  return f"{dtype}[{', '.join(map(str, shape))}]"


def entry_attributes(experiment: Any) -> Dict[str, str]:
  """Checkpoint name -> attribute name, for messages."""
  names = {}
  for attr_map in (experiment.NON_BROADCAST_CHECKPOINT_ATTRS,
                   experiment.CHECKPOINT_ATTRS):
    names.update({name: attr for attr, name in attr_map.items()})
  return names


def expected_entries(experiment: Any) -> Dict[str, Any]:
  """What the checkpoint's entries must match: live values, else abstract."""
  expected = dict(experiment.snapshot_state())
  abstract = getattr(experiment, "abstract_snapshot_state", lambda: None)()
  for name, value in (abstract or {}).items():
    if expected.get(name) is None:
      expected[name] = value
  return expected


def check_entries(experiment: Any, saved: Mapping[str, Any], *,
                  source: str) -> None:
  """Raises CheckpointMismatchError naming the entry, attribute and path."""
  expected = expected_entries(experiment)
  attrs = entry_attributes(experiment)
  describe = lambda name: f"{name!r} (attribute {attrs.get(name, '?')})"
  missing = sorted(set(expected) - set(saved), key=str)
  extra = sorted(set(saved) - set(expected), key=str)
  if missing or extra:
    raise CheckpointMismatchError(
        f"The checkpoint {source} does not match the experiment: missing "
        f"from the checkpoint: {[describe(n) for n in missing]}; in the "
        f"checkpoint but not the experiment: {extra}. Checkpoint entries: "
        f"{sorted(map(str, saved))}; experiment entries: "
        f"{sorted(map(str, expected))}." + MEMORY_HINT)
  compared = set(experiment.CHECKPOINT_ATTRS.values())
  for name in sorted(compared & set(expected), key=str):
    if expected[name] is None or saved[name] is None:
      continue  # Created lazily and not declared: nothing to compare yet.
    problem = _difference(saved[name], expected[name])
    if problem:
      raise CheckpointMismatchError(
          f"Checkpoint entry {describe(name)} in {source} does not fit the "
          f"experiment: {problem}. Restore it into the experiment it was "
          "written by (check config.experiment_kwargs)." + MEMORY_HINT)


def _difference(saved: Any, live: Any) -> Optional[str]:
  saved_leaves, saved_def = jax.tree_util.tree_flatten_with_path(saved)
  live_leaves, live_def = jax.tree_util.tree_flatten_with_path(live)
  if saved_def != live_def:
    saved_paths = {jax.tree_util.keystr(p) for p, _ in saved_leaves}
    live_paths = {jax.tree_util.keystr(p) for p, _ in live_leaves}
    if saved_paths != live_paths:
      return (f"another tree structure; paths only in the checkpoint: "
              f"{sorted(saved_paths - live_paths)[:5]}, only in the "
              f"experiment: {sorted(live_paths - saved_paths)[:5]}")
    return (f"other container types; checkpoint: {saved_def}, experiment: "
            f"{live_def}")
  for (path, s), (_, l) in zip(saved_leaves, live_leaves):
    s_sig, l_sig = _signature(s), _signature(l)
    if s_sig != l_sig and not (s_sig is None and l_sig is None):
      return (f"at {jax.tree_util.keystr(path) or 'the root'} the checkpoint "
              f"holds {_show(s_sig)} and the experiment {_show(l_sig)}")
  return None
