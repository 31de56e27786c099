"""Characters of Python's own standard library, batched by position.

The corpus is the source of the standard library's top-level modules (the
`*.py` files next to `os.py`), so the example trains offline on any machine
with Python and nothing to download. It is deterministic for a given Python
installation; other Python versions ship other sources, so their numbers
differ slightly.

* Characters: the 128 ASCII code points are the vocabulary, one id per
  character. The few non-ASCII characters in the sources map to `UNKNOWN_ID`
  (NUL, which never occurs in text), so each id is exactly one character and
  bits per character are what the name says.
* Split: a file goes to validation when a CRC-32 of its *name* falls in the
  lowest `validation_fraction` of the range. The split is thus independent of
  the seed, of the order files are found in and of the other files, and whole
  files are held out, so validation measures generalisation to unseen
  modules rather than to unseen lines of a module it trained on.
* Training batches are a pure function of `(seed, position)`: the rows are
  windows at offsets drawn from a generator seeded with both. The experiment
  checkpoints only the position, so a resumed run sees exactly the batches an
  uninterrupted run would have seen, with no iterator state to save.
* Several processes: each builds only its own rows of the global batch
  (`process_index`'s contiguous block), which
  `jaxline.sharding.host_batch_to_global` turns into one global array.

Everything here is numpy on the host.
"""

import dataclasses
import functools
import glob
import math
import os
import zlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

VOCAB_SIZE = 128
# Stands for every non-ASCII character. NUL does not occur in source text.
UNKNOWN_ID = 0
# Generated at build time with the machine's paths and compiler flags: not
# representative Python, and different on every installation.
_EXCLUDED_PREFIXES = ("_sysconfigdata",)

Batch = Dict[str, np.ndarray]


def stdlib_dir() -> str:
  """Where the standard library's pure-Python modules are."""
  return os.path.dirname(os.__file__)


def corpus_files(pattern: str = "") -> Tuple[str, ...]:
  """The files of the corpus, sorted by path so the order is fixed.

  Args:
    pattern: a glob (`**` allowed) of text files; empty means the standard
      library's top-level `*.py` files.
  """
  if pattern:
    files = glob.glob(os.path.expanduser(pattern), recursive=True)
  else:
    files = glob.glob(os.path.join(stdlib_dir(), "*.py"))
    files = [f for f in files
             if not os.path.basename(f).startswith(_EXCLUDED_PREFIXES)]
  files = sorted(f for f in files if os.path.isfile(f))
  if not files:
    raise ValueError(f"No corpus files match {pattern or stdlib_dir()!r}. "
                     "Set --config.experiment_kwargs.config.data.files to a "
                     "glob of text files.")
  return tuple(files)


def is_validation_file(path: str, validation_fraction: float) -> bool:
  """Whether `path` is held out; depends on the file's name only."""
  bucket = zlib.crc32(os.path.basename(path).encode("utf-8")) % 10_000
  return bucket < round(validation_fraction * 10_000)


def encode(text: str) -> np.ndarray:
  """Characters to uint8 ids: ASCII code points, `UNKNOWN_ID` otherwise."""
  code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  return np.where(code_points < VOCAB_SIZE, code_points,
                  UNKNOWN_ID).astype(np.uint8)


def decode(ids: Sequence[int]) -> str:
  """Ids back to text; `UNKNOWN_ID` shows as U+FFFD."""
  return "".join("\ufffd" if i == UNKNOWN_ID else chr(i)
                 for i in np.asarray(ids).tolist())


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  # A file that does not end with a newline must not run into the next one.
  return text if text.endswith("\n") else text + "\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Both splits as uint8 id arrays, and the files that make each."""
  train: np.ndarray
  validation: np.ndarray
  train_files: Tuple[str, ...]
  validation_files: Tuple[str, ...]


@functools.lru_cache(maxsize=4)
def load(pattern: str = "", validation_fraction: float = 0.1) -> Corpus:
  """Reads and splits the corpus (cached: the train and eval sides share it).

  With a single file, or when the name split leaves one side empty, the
  concatenated text is cut instead: its last `validation_fraction` is
  validation.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got "
                     f"{validation_fraction}.")
  files = corpus_files(pattern)
  validation_files = tuple(
      f for f in files if is_validation_file(f, validation_fraction))
  train_files = tuple(f for f in files if f not in validation_files)
  if train_files and validation_files:
    train = encode("".join(_read(f) for f in train_files))
    validation = encode("".join(_read(f) for f in validation_files))
  else:
    ids = encode("".join(_read(f) for f in files))
    cut = int(len(ids) * (1.0 - validation_fraction))
    train, validation = ids[:cut], ids[cut:]
    train_files = validation_files = files
  # Read-only, since the cached arrays are shared by every caller.
  train.flags.writeable = False
  validation.flags.writeable = False
  return Corpus(train, validation, train_files, validation_files)


def unigram_bits_per_char(ids: np.ndarray) -> float:
  """Entropy of the character frequencies: what a model without context
  gets at best, the bar a language model must get well below."""
  counts = np.bincount(ids, minlength=VOCAB_SIZE).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def rows_per_process(global_batch_size: int, device_count: int,
                     process_count: int) -> int:
  """This process's share of a global batch, or a message on how to fix it."""
  if global_batch_size <= 0 or global_batch_size % device_count:
    raise ValueError(
        f"batch size {global_batch_size} cannot be split evenly over "
        f"{device_count} devices. Set it to a positive multiple of "
        f"{device_count}.")
  return global_batch_size // process_count


def _windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
  """Rows of `seq_len + 1` characters: inputs and the next characters."""
  rows = ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


class TrainBatches:
  """Training batches addressed by position.

  `batch(p)` is this process's rows of the p-th global batch,
  `{"inputs", "targets"}` of shape [global_batch_size / process_count,
  seq_len]. It depends only on the text, the seed and `p`, never on earlier
  calls or on the process count.
  """

  def __init__(self, ids: np.ndarray, *, global_batch_size: int,
               seq_len: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    if len(ids) < seq_len + 2:
      raise ValueError(f"The training text has {len(ids)} characters, too "
                       f"few for windows of {seq_len + 1}.")
    if global_batch_size % process_count:
      raise ValueError(f"batch size {global_batch_size} does not split over "
                       f"{process_count} processes.")
    self._ids = ids
    self._global_batch_size = global_batch_size
    self._seq_len = seq_len
    self._seed = seed
    rows = global_batch_size // process_count
    self._rows = slice(process_index * rows, (process_index + 1) * rows)

  def window_starts(self, position: int) -> np.ndarray:
    """Offsets of all rows of the global batch at `position`."""
    if position < 0:
      raise ValueError(f"position must be >= 0, got {position}")
    rng = np.random.default_rng([self._seed, position])
    return rng.integers(0, len(self._ids) - self._seq_len,
                        size=self._global_batch_size)

  def batch(self, position: int) -> Batch:
    return _windows(self._ids, self.window_starts(position)[self._rows],
                    self._seq_len)


def num_eval_windows(ids: np.ndarray, seq_len: int,
                     max_windows: Optional[int]) -> int:
  """How many validation windows `eval_batches` yields in all."""
  available = (len(ids) - 1) // seq_len
  return min(available, max_windows) if max_windows else available


def eval_batches(ids: np.ndarray, *, global_batch_size: int, seq_len: int,
                 max_windows: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1,
                 device_count: int = 1) -> Iterator[Batch]:
  """Fixed, non-overlapping validation windows, padded to full batches.

  Window i covers characters [i * seq_len, (i + 1) * seq_len] (its last one
  is only a target). With `max_windows`, that many windows are taken evenly
  spaced through the text, so every part of it is represented. Each batch has
  a `mask` row weight (1 real, 0 padding), so the sums count each window once
  whatever the device count. Yields this process's rows only.
  """
  available = (len(ids) - 1) // seq_len
  n = num_eval_windows(ids, seq_len, max_windows)
  if n == 0:
    raise ValueError(f"The validation text has {len(ids)} characters, too "
                     f"few for one window of {seq_len + 1}.")
  picked = np.linspace(0, available - 1, n).round().astype(np.int64)
  # No bigger batches than needed: a few windows make one small batch.
  global_batch_size = min(global_batch_size,
                          math.ceil(n / device_count) * device_count)
  rows = global_batch_size // process_count
  mine = slice(process_index * rows, (process_index + 1) * rows)
  for first in range(0, n, global_batch_size):
    index = np.arange(first, first + global_batch_size)
    real = index < n
    starts = picked[np.where(real, index, 0)] * seq_len
    batch = _windows(ids, starts[mine], seq_len)
    batch["mask"] = real[mine].astype(np.float32)
    yield batch
