"""Tests of the per-process checkpoint copies."""

import os

import ml_dtypes
import numpy as np
import pytest

from jaxline import host_copy


def _arrays(value):
  return {"experiment_module/params/0": np.full([2, 3], value, np.float32),
          "experiment_module/params/1": np.arange(4).astype(ml_dtypes.bfloat16),
          "global_step/global_step/0": np.asarray(value, np.int64)}


def test_round_trip_keeps_keys_values_and_dtypes(tmp_path):
  meta = {"format": 1, "skeleton": {"a": {"t": "jax", "i": "0"}}}
  step_dir = host_copy.save(str(tmp_path), 7, meta, _arrays(3))
  assert step_dir == os.path.join(str(tmp_path), "7")
  got_meta, got = host_copy.load(step_dir)
  assert got_meta == meta
  expected = _arrays(3)
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value)


def test_a_step_already_saved_is_kept_unless_replaced(tmp_path):
  host_copy.save(str(tmp_path), 4, {}, _arrays(1))
  host_copy.save(str(tmp_path), 4, {}, _arrays(2))
  assert host_copy.load(str(tmp_path / "4"))[1][
      "global_step/global_step/0"] == 1
  host_copy.save(str(tmp_path), 4, {}, _arrays(2), replace=True)
  assert host_copy.load(str(tmp_path / "4"))[1][
      "global_step/global_step/0"] == 2
  assert os.listdir(tmp_path) == ["4"]


def test_max_to_keep_deletes_the_oldest(tmp_path):
  for step in (2, 4, 6, 8):
    host_copy.save(str(tmp_path), step, {}, _arrays(step), max_to_keep=2)
  assert host_copy.steps(str(tmp_path)) == [6, 8]


def test_an_unfinished_copy_is_not_a_step_and_is_redone(tmp_path):
  # What a kill during the write leaves: a temporary directory.
  leftover = tmp_path / ".tmp-5-12345"
  leftover.mkdir()
  (leftover / host_copy.ARRAYS_FILE).write_bytes(b"trunc")
  assert host_copy.steps(str(tmp_path)) == []
  host_copy.save(str(tmp_path), 5, {}, _arrays(5))
  assert host_copy.steps(str(tmp_path)) == [5]
  assert not leftover.exists()
  assert host_copy.steps(str(tmp_path / "missing")) == []


def test_loading_never_unpickles(tmp_path):
  step_dir = host_copy.save(str(tmp_path), 1, {}, {"x": np.zeros(2)})
  # Swap in an array file holding a pickled object.
  with open(os.path.join(step_dir, host_copy.ARRAYS_FILE), "wb") as f:
    np.savez(f, x=np.array([object()], dtype=object))
  with pytest.raises(ValueError, match="allow_pickle"):
    host_copy.load(step_dir)
