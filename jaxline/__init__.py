"""jaxline: a minimal experiment harness for JAX.

Importing the package does nothing else: submodules register absl flags and
import JAX, so users import them explicitly (``from jaxline import platform``).
"""

__version__ = "0.1.0"
