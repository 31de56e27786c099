"""Checkpoints written by a process other than the chief, for itself.

With `train_checkpoint_all_hosts` (or `best_checkpoint_all_hosts`) every
process of a multi-process run saves. Orbax cannot write a checkpoint of one
process's own: it writes host (numpy) arrays from process 0 alone and refuses
process-local device arrays when there are several processes. So every other
process writes its copy here, under `<checkpoint_dir>/checkpoints/process_<i>/
<series>/<step>/`: the same JSON skeleton and arrays an Orbax checkpoint of
jaxline holds, as `meta.json` and `arrays.npz` (read back without pickle).

A copy is written in a temporary directory and committed by renaming it, so
a reader never sees half of one.
"""

import glob
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

META_FILE = "meta.json"
ARRAYS_FILE = "arrays.npz"
_TMP_PREFIX = ".tmp-"


def steps(series_dir: str) -> List[int]:
  """The committed steps in `series_dir`, oldest first."""
  if not os.path.isdir(series_dir):
    return []
  return sorted(int(n) for n in os.listdir(series_dir) if n.isdigit())


def save(series_dir: str, step: int, meta: Dict[str, Any],
         arrays: Dict[str, np.ndarray], *, replace: bool = False,
         max_to_keep: Optional[int] = None) -> str:
  """Commits one copy at `step`; returns its directory.

  A step already committed is kept unless `replace` (a better "best").
  Beyond `max_to_keep` copies, the oldest are deleted.
  """
  final = os.path.join(series_dir, str(step))
  if os.path.isdir(final) and not replace:
    return final
  os.makedirs(series_dir, exist_ok=True)
  for leftover in glob.glob(os.path.join(series_dir,
                                         f"{_TMP_PREFIX}{step}-*")):
    shutil.rmtree(leftover, ignore_errors=True)  # From a killed run.
  tmp = os.path.join(series_dir, f"{_TMP_PREFIX}{step}-{os.getpid()}")
  os.makedirs(tmp)
  # .npy has no names for ml_dtypes (bfloat16...): store their bits.
  dtypes = {k: v.dtype.name for k, v in arrays.items() if v.dtype.kind == "V"}
  bits = {k: v.view(f"u{v.dtype.itemsize}") if k in dtypes else v
          for k, v in arrays.items()}
  meta = dict(meta, host_copy_dtypes=dtypes)
  with open(os.path.join(tmp, ARRAYS_FILE), "wb") as f:
    np.savez(f, **bits)
    f.flush()
    os.fsync(f.fileno())
  with open(os.path.join(tmp, META_FILE), "w") as f:
    json.dump(meta, f)
    f.flush()
    os.fsync(f.fileno())
  if os.path.isdir(final):
    old = tmp + ".old"
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, final)
  if max_to_keep:
    for old_step in steps(series_dir)[:-max_to_keep]:
      shutil.rmtree(os.path.join(series_dir, str(old_step)),
                    ignore_errors=True)
  return final


def load(step_dir: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(meta, arrays) of a committed copy, as `save` got them."""
  with open(os.path.join(step_dir, META_FILE)) as f:
    meta = json.load(f)
  dtypes = meta.pop("host_copy_dtypes", {})
  with np.load(os.path.join(step_dir, ARRAYS_FILE),
               allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  for k, name in dtypes.items():
    arrays[k] = arrays[k].view(getattr(ml_dtypes, name))
  return meta, arrays
