"""Calls platform.main directly, without app.run (nfnets does this, D14)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxline import platform
import experiment

if __name__ == "__main__":
  platform.main(experiment.Experiment, sys.argv[1:])
