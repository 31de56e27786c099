"""Plot the metrics a run wrote: `python -m jaxline.plot <checkpoint_dir>`.

Training appends one JSON object per logged step to
`<checkpoint_dir>/<mode>/metrics.jsonl`, so curves can be looked at without
TensorBoard. This draws one panel per scalar key, with train and eval on the
same panel so that overfitting shows at a glance, into `curves.png`.

matplotlib is an optional dependency (`pip install "jaxline[plot]"`); it is
imported only when a figure is drawn, so reading metrics never needs it.
"""

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

_METRICS_FILE = "metrics.jsonl"
_RESERVED_KEYS = ("step", "wall_time")
_MAX_COLUMNS = 3
_INSTALL_HINT = 'matplotlib is not installed; pip install "jaxline[plot]".'

# mode -> key -> (steps, values), steps ascending.
Metrics = Dict[str, Dict[str, Tuple[List[int], List[float]]]]


class NoMetricsError(FileNotFoundError):
  """There is nothing to plot under a checkpoint directory."""


def _as_step(value: Any) -> Optional[int]:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  if isinstance(value, float) and not value.is_integer():
    return None
  return int(value)


def _read_file(path: str) -> Dict[str, Tuple[List[int], List[float]]]:
  """One file's curves; for a step written twice, the later line wins.

  A resumed run re-logs the steps after its last checkpoint, and those later
  values are the ones its checkpoints continue from. Lines that do not parse
  (a crash mid-write truncates the last one) are skipped.
  """
  by_key: Dict[str, Dict[int, float]] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      step = _as_step(row.get("step")) if isinstance(row, dict) else None
      if step is None:
        continue
      for key, value in row.items():
        if key in _RESERVED_KEYS or isinstance(value, bool):
          continue
        if isinstance(value, (int, float)):
          by_key.setdefault(key, {})[step] = float(value)
  return {key: (sorted(points), [points[s] for s in sorted(points)])
          for key, points in by_key.items()}


def read_metrics(checkpoint_dir: str) -> Metrics:
  """Reads every `<mode>/metrics.jsonl` under `checkpoint_dir`.

  Returns `{mode: {key: (steps, values)}}` with steps ascending; NaN and
  infinities are kept as floats. A mode is `train` or a directory whose name
  starts with `eval`. Keys missing from some lines are simply absent at
  those steps. A missing directory, or one without usable rows, gives `{}`.
  """
  if not os.path.isdir(checkpoint_dir):
    return {}
  metrics = {}
  for mode in sorted(os.listdir(checkpoint_dir)):
    path = os.path.join(checkpoint_dir, mode, _METRICS_FILE)
    is_mode = mode == "train" or mode.startswith("eval")
    if is_mode and os.path.isfile(path):
      curves = _read_file(path)
      if curves:
        metrics[mode] = curves
  return metrics


def make_figure(metrics: Metrics) -> Any:
  """A `matplotlib.figure.Figure` with one panel per key, keys sorted.

  Built without pyplot, so it neither switches a caller's backend (say, in
  a notebook) nor stays registered after the caller drops it. Each mode has
  one colour on every panel; `train` comes first.
  """
  try:
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(_INSTALL_HINT) from e
  modes = sorted(metrics, key=lambda mode: (mode != "train", mode))
  keys = sorted({key for curves in metrics.values() for key in curves})
  columns = max(1, min(_MAX_COLUMNS, len(keys)))
  rows = max(1, math.ceil(len(keys) / columns))
  fig = figure.Figure(figsize=(5 * columns, 3.5 * rows), layout="constrained")
  for index, key in enumerate(keys):
    ax = fig.add_subplot(rows, columns, index + 1)
    for colour, mode in enumerate(modes):
      if key not in metrics[mode]:
        continue
      steps, values = metrics[mode][key]
      ax.plot(steps, values, label=mode, color=f"C{colour}",
              marker="o" if len(steps) == 1 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  return fig


def plot_curves(checkpoint_dir: str, out: Optional[str] = None) -> str:
  """Writes the curves of `checkpoint_dir` to a PNG and returns its path.

  `out` defaults to `<checkpoint_dir>/curves.png`. Raises `NoMetricsError`
  when there is nothing to plot, and `ImportError` without matplotlib.
  """
  if not os.path.isdir(checkpoint_dir):
    raise NoMetricsError(f"{checkpoint_dir} is not a directory; train with "
                         "config.checkpoint_dir set first.")
  metrics = read_metrics(checkpoint_dir)
  if not metrics:
    raise NoMetricsError(
        f"no metrics.jsonl files with usable rows under {checkpoint_dir}; "
        "train with config.checkpoint_dir set first.")
  fig = make_figure(metrics)
  out = out or os.path.join(checkpoint_dir, "curves.png")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, format="png", dpi=100)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status, errors as one stderr line."""
  parser = argparse.ArgumentParser(
      prog="python -m jaxline.plot",
      description="Plot <checkpoint_dir>/*/metrics.jsonl as one PNG.")
  parser.add_argument("checkpoint_dir")
  parser.add_argument("--out", default=None,
                      help="PNG to write; default <checkpoint_dir>/curves.png")
  args = parser.parse_args(argv)
  try:
    path = plot_curves(args.checkpoint_dir, args.out)
  except (ImportError, OSError) as e:
    print(f"jaxline.plot: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
