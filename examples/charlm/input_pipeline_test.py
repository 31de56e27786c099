"""Tests for the character pipeline: corpus, split, batches, determinism.

Training batches must be a pure function of (seed, position), and each
process's rows must be its block of the one global batch, since the
experiment checkpoints only the position and may resume on another number of
devices or processes. Most tests here pin that down.
"""

import os

import numpy as np
import pytest

from examples.charlm import input_pipeline

# Toy "text" whose ids name their own offsets, so windows can be traced.
_TOY = np.arange(1000, dtype=np.int32)


class TestCharacters:

  def test_ascii_round_trips_one_id_per_character(self):
    text = "def f(x):\n\treturn x ** 2  # ~!\n"
    ids = input_pipeline.encode(text)
    assert ids.dtype == np.uint8
    assert ids.tolist() == [ord(c) for c in text]
    assert input_pipeline.decode(ids) == text

  def test_non_ascii_characters_become_one_unknown_id_each(self):
    ids = input_pipeline.encode("a\u00e9\u4e2d\U0001f600b")
    assert ids.tolist() == [ord("a"), input_pipeline.UNKNOWN_ID,
                            input_pipeline.UNKNOWN_ID,
                            input_pipeline.UNKNOWN_ID, ord("b")]
    assert input_pipeline.decode(ids) == "a\ufffd\ufffd\ufffdb"

  def test_unigram_entropy(self):
    assert input_pipeline.unigram_bits_per_char(
        np.array([1, 2, 3, 4] * 10, np.uint8)) == pytest.approx(2.0)
    assert input_pipeline.unigram_bits_per_char(
        np.array([7] * 10, np.uint8)) == 0.0


class TestCorpus:

  def test_default_corpus_is_the_standard_library(self):
    files = input_pipeline.corpus_files()
    assert list(files) == sorted(files)
    names = {os.path.basename(f) for f in files}
    assert {"os.py", "functools.py", "argparse.py"} <= names
    assert all(os.path.dirname(f) == input_pipeline.stdlib_dir()
               for f in files)
    # Machine-specific generated files are left out.
    assert not [n for n in names if n.startswith("_sysconfigdata")]

  def test_split_is_by_file_name_disjoint_and_complete(self):
    corpus = input_pipeline.load()
    files = set(input_pipeline.corpus_files())
    assert not set(corpus.train_files) & set(corpus.validation_files)
    assert set(corpus.train_files) | set(corpus.validation_files) == files
    # Held out by name only: the directory does not matter.
    for path in corpus.validation_files:
      assert input_pipeline.is_validation_file(
          os.path.join("/elsewhere", os.path.basename(path)), 0.1)
    share = len(corpus.validation) / (len(corpus.train) +
                                      len(corpus.validation))
    assert 0.03 < share < 0.35

  def test_splits_are_ascii_ids_of_the_files(self):
    corpus = input_pipeline.load()
    for ids in (corpus.train, corpus.validation):
      assert ids.dtype == np.uint8 and ids.max() < input_pipeline.VOCAB_SIZE
      assert not ids.flags.writeable  # Shared through the cache.
    first = corpus.validation_files[0]
    with open(first, encoding="utf-8") as f:
      start = f.read(200)
    np.testing.assert_array_equal(corpus.validation[:200],
                                  input_pipeline.encode(start))
    # Code, not noise: well under 8 bits, well over a handful of symbols.
    assert 3.5 < input_pipeline.unigram_bits_per_char(corpus.train) < 6.0

  def test_load_is_cached_and_deterministic(self):
    first = input_pipeline.load()
    assert input_pipeline.load() is first
    input_pipeline.load.cache_clear()
    second = input_pipeline.load()
    assert second is not first
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.validation, second.validation)
    assert first.validation_files == second.validation_files

  def test_own_files_split_by_name_or_by_position(self, tmp_path):
    (tmp_path / "only.txt").write_text("abcdefghij" * 10)  # No newline.
    corpus = input_pipeline.load(str(tmp_path / "*.txt"), 0.2)
    # One file: the last fifth of its text is held out.
    assert len(corpus.train) == 80 and len(corpus.validation) == 21
    assert input_pipeline.decode(corpus.validation)[-2:] == "j\n"

    names = [f"file{i}.txt" for i in range(40)]
    for name in names:
      (tmp_path / name).write_text(name + "\n")
    corpus = input_pipeline.load(str(tmp_path / "file*.txt"), 0.2)
    held_out = sorted(os.path.basename(f) for f in corpus.validation_files)
    assert held_out == sorted(
        n for n in names if input_pipeline.is_validation_file(n, 0.2))
    assert 0 < len(held_out) < len(names)
    assert input_pipeline.decode(corpus.validation) == "".join(
        n + "\n" for n in sorted(held_out))

  def test_bad_arguments_are_rejected(self, tmp_path):
    with pytest.raises(ValueError, match="No corpus files match"):
      input_pipeline.load(str(tmp_path / "*.nothing"))
    with pytest.raises(ValueError, match="validation_fraction"):
      input_pipeline.load("", 1.5)


class TestTrainBatches:

  def _batches(self, **kwargs):
    args = dict(global_batch_size=8, seq_len=16, seed=3)
    args.update(kwargs)
    return input_pipeline.TrainBatches(_TOY, **args)

  def test_rows_are_windows_of_the_text_with_next_character_targets(self):
    batches = self._batches()
    batch = batches.batch(0)
    assert batch["inputs"].shape == batch["targets"].shape == (8, 16)
    assert batch["inputs"].dtype == np.int32
    starts = batches.window_starts(0)
    for row, start in enumerate(starts):
      np.testing.assert_array_equal(batch["inputs"][row],
                                    _TOY[start:start + 16])
      np.testing.assert_array_equal(batch["targets"][row],
                                    _TOY[start + 1:start + 17])
    # Every offset keeps the last target inside the text.
    many = np.concatenate([batches.window_starts(p) for p in range(200)])
    assert many.min() >= 0 and many.max() + 16 < len(_TOY)

  def test_batches_depend_only_on_seed_and_position(self):
    forward = [self._batches().batch(p)["inputs"] for p in range(5)]
    other = self._batches()
    backward = [other.batch(p)["inputs"] for p in reversed(range(5))][::-1]
    for a, b in zip(forward, backward):
      np.testing.assert_array_equal(a, b)
    assert not np.array_equal(forward[0], forward[1])
    assert not np.array_equal(forward[0],
                              self._batches(seed=4).batch(0)["inputs"])

  def test_processes_get_contiguous_blocks_of_the_global_batch(self):
    whole = self._batches().batch(7)
    parts = [self._batches(process_index=i, process_count=4).batch(7)
             for i in range(4)]
    for key in ("inputs", "targets"):
      assert parts[0][key].shape == (2, 16)
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), whole[key])

  def test_bad_arguments_are_rejected(self):
    with pytest.raises(ValueError, match="too few"):
      input_pipeline.TrainBatches(_TOY[:10], global_batch_size=2, seq_len=16,
                                  seed=0)
    with pytest.raises(ValueError, match="position must be >= 0"):
      self._batches().batch(-1)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
      self._batches(process_count=3)

  def test_rows_per_process(self):
    assert input_pipeline.rows_per_process(32, 8, 2) == 16
    with pytest.raises(ValueError, match="multiple of 4"):
      input_pipeline.rows_per_process(6, 4, 1)


class TestEvalBatches:

  def _all(self, ids=_TOY, **kwargs):
    args = dict(global_batch_size=8, seq_len=10)
    args.update(kwargs)
    return list(input_pipeline.eval_batches(ids, **args))

  def test_every_window_once_then_padding(self):
    batches = self._all()
    # 999 targets in windows of 10: 99 windows, in 13 batches of 8.
    assert len(batches) == 13
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 99 and mask[:99].all()
    inputs = np.concatenate([b["inputs"] for b in batches])[:99]
    targets = np.concatenate([b["targets"] for b in batches])[:99]
    np.testing.assert_array_equal(inputs.reshape(-1), _TOY[:990])
    np.testing.assert_array_equal(targets.reshape(-1), _TOY[1:991])

  def test_max_windows_are_spread_over_the_text(self):
    batches = self._all(max_windows=5)
    assert len(batches) == 1
    # A small evaluation is one small batch: 5 rows, padded to 8 devices'
    # worth only if there are 8 devices.
    assert batches[0]["inputs"].shape == (5, 10)
    starts = batches[0]["inputs"][:, 0]
    assert starts[0] == 0 and starts[-1] == 980
    assert (np.diff(starts) > 200).all()
    assert input_pipeline.num_eval_windows(_TOY, 10, 5) == 5
    assert input_pipeline.num_eval_windows(_TOY, 10, None) == 99

  def test_padding_to_the_device_count(self):
    batches = self._all(max_windows=5, device_count=4)
    assert batches[0]["mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]

  def test_processes_get_contiguous_blocks(self):
    whole = self._all(device_count=4)
    parts = [self._all(device_count=4, process_index=i, process_count=2)
             for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for batch, first, second in zip(whole, *parts):
      for key in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(
            np.concatenate([first[key], second[key]]), batch[key])

  def test_text_too_short(self):
    with pytest.raises(ValueError, match="too few for one window"):
      self._all(ids=_TOY[:5])
