"""Tests for jaxline.plot, the `python -m jaxline.plot` curve plotter.

Metrics files come from runs that were resumed or that crashed mid-write, so
reading must keep the latest value per step and survive a torn last line;
and the command must fail with one readable line, not a traceback, when a
user points it at the wrong directory.
"""

import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from PIL import Image

from conftest import REPO_ROOT
from conftest import subprocess_env
from jaxline import plot

_TIMEOUT_SECS = 120  # Generous: a plot takes about a second.


def _write_rows(directory, mode, rows, tail=""):
  """Writes `rows` as `<directory>/<mode>/metrics.jsonl`, then `tail`."""
  os.makedirs(os.path.join(directory, mode), exist_ok=True)
  path = os.path.join(directory, mode, "metrics.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    f.write(tail)
  return path


def _write_run(directory):
  """A small run: train has loss and lr, eval has loss and accuracy."""
  _write_rows(directory, "train", [
      {"step": s, "wall_time": 1.0 + s, "loss": 1.0 / (s + 1), "lr": 0.1}
      for s in range(0, 50, 5)])
  _write_rows(directory, "eval", [
      {"step": s, "wall_time": 2.0 + s, "loss": 1.5 / (s + 1),
       "accuracy": s / 50} for s in range(0, 50, 10)])


def _tempdir(test):
  """A directory removed when `test` ends."""
  return test.enter_context(tempfile.TemporaryDirectory())


def _run_plot(*args):
  return subprocess.run(
      [sys.executable, "-m", "jaxline.plot", *map(str, args)],
      cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=_TIMEOUT_SECS)


class ReadMetricsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.directory = _tempdir(self)

  def test_repeated_step_keeps_the_last_line(self):
    _write_rows(self.directory, "train", [
        {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
        {"step": 3, "loss": 3.0}, {"step": 2, "loss": 2.5},
        {"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.0}])
    self.assertEqual(plot.read_metrics(self.directory),
                     {"train": {"loss": ([1, 2, 3, 4], [5.0, 2.5, 2.0, 1.0])}})

  def test_missing_keys_leave_gaps_per_key(self):
    _write_rows(self.directory, "train", [
        {"step": 0, "wall_time": 0.5, "loss": 3.0},
        {"step": 1, "wall_time": 1.5, "acc": 0.2},
        {"step": 2, "wall_time": 2.5, "loss": 1.0, "acc": 0.4}])
    metrics = plot.read_metrics(self.directory)
    self.assertEqual(metrics["train"], {"loss": ([0, 2], [3.0, 1.0]),
                                        "acc": ([1, 2], [0.2, 0.4])})

  def test_truncated_last_line_is_skipped(self):
    _write_rows(self.directory, "train",
                [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.0}],
                tail='{"step": 2, "loss": 1.')
    self.assertEqual(plot.read_metrics(self.directory),
                     {"train": {"loss": ([0, 1], [3.0, 2.0])}})

  def test_non_finite_values_are_kept(self):
    _write_rows(self.directory, "eval_test", [
        {"step": 0, "loss": float("nan")}, {"step": 1, "loss": float("inf")},
        {"step": 2, "loss": 1.0}])
    steps, values = plot.read_metrics(self.directory)["eval_test"]["loss"]
    self.assertEqual(steps, [0, 1, 2])
    self.assertTrue(math.isnan(values[0]))
    self.assertEqual(values[1:], [math.inf, 1.0])

  def test_only_train_and_eval_directories_are_modes(self):
    for mode in ("train", "eval", "eval_test", "checkpoints"):
      _write_rows(self.directory, mode, [{"step": 0, "x": 1.0}])
    self.assertEqual(sorted(plot.read_metrics(self.directory)),
                     ["eval", "eval_test", "train"])

  def test_rows_without_step_or_numbers_are_ignored(self):
    _write_rows(self.directory, "train", [
        {"loss": 1.0}, {"step": "3", "loss": 1.0}, [1, 2],
        {"step": 0, "wall_time": 1.0, "name": "x", "flag": True}])
    self.assertEqual(plot.read_metrics(self.directory), {})

  def test_missing_directory_has_no_metrics(self):
    self.assertEqual(
        plot.read_metrics(os.path.join(self.directory, "absent")), {})


class PlotTest(absltest.TestCase):

  def test_one_panel_per_key_with_every_mode_that_has_it(self):
    directory = _tempdir(self)
    _write_run(directory)
    fig = plot.make_figure(plot.read_metrics(directory))
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()]
              for ax in fig.axes}
    self.assertLen(fig.axes, 3)
    self.assertEqual([ax.get_title() for ax in fig.axes],
                     ["accuracy", "loss", "lr"])
    self.assertEqual(panels, {"accuracy": ["eval"], "loss": ["train", "eval"],
                              "lr": ["train"]})
    for ax in fig.axes:
      self.assertIsNotNone(ax.get_legend())
      self.assertEqual(ax.get_xlabel(), "step")

  def test_plot_curves_writes_the_default_path(self):
    directory = _tempdir(self)
    _write_run(directory)
    path = plot.plot_curves(directory)
    self.assertEqual(path, os.path.join(directory, "curves.png"))
    with Image.open(path) as image:
      self.assertEqual(image.format, "PNG")

  def test_plot_curves_without_metrics_raises(self):
    directory = _tempdir(self)
    _write_rows(directory, "train", [], tail='{"step": 0, "lo')
    for path in (directory, os.path.join(directory, "absent")):
      with self.assertRaisesRegex(plot.NoMetricsError, path):
        plot.plot_curves(path)


class CommandTest(absltest.TestCase):

  def test_writes_curves_png(self):
    directory = _tempdir(self)
    _write_run(directory)
    result = _run_plot(directory)
    self.assertEqual(result.returncode, 0, result.stderr)
    path = os.path.join(directory, "curves.png")
    self.assertEqual(result.stdout.strip(), path)
    self.assertNotIn("Traceback", result.stderr)
    with Image.open(path) as image:
      self.assertEqual(image.format, "PNG")
      width, height = image.size
    self.assertBetween(width, 600, 3000)  # Three panels in a row.
    self.assertBetween(height, 200, 2000)
    self.assertGreater(os.path.getsize(path), 10_000)

  def test_out_writes_elsewhere(self):
    directory = _tempdir(self)
    _write_run(directory)
    out = os.path.join(_tempdir(self), "sub", "run.png")
    result = _run_plot(directory, "--out", out)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertEqual(result.stdout.strip(), out)
    self.assertTrue(os.path.isfile(out))
    self.assertFalse(os.path.exists(os.path.join(directory, "curves.png")))

  def _assert_one_line_error(self, result, directory):
    self.assertNotEqual(result.returncode, 0)
    lines = result.stderr.splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertIn(directory, lines[0])
    self.assertNotIn("Traceback", result.stderr)

  def test_empty_directory_fails_with_one_line(self):
    directory = _tempdir(self)
    self._assert_one_line_error(_run_plot(directory), directory)

  def test_missing_directory_fails_with_one_line(self):
    directory = os.path.join(_tempdir(self), "absent")
    self._assert_one_line_error(_run_plot(directory), directory)

  def test_missing_matplotlib_names_the_extra(self):
    directory = _tempdir(self)
    _write_run(directory)
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "from jaxline import plot; sys.exit(plot.main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", code, directory], cwd=REPO_ROOT,
        env=subprocess_env(), capture_output=True, text=True,
        timeout=_TIMEOUT_SECS)
    self.assertNotEqual(result.returncode, 0)
    self.assertLen(result.stderr.splitlines(), 1, result.stderr)
    self.assertIn('pip install "jaxline[plot]"', result.stderr)


if __name__ == "__main__":
  absltest.main()
