"""Build hook beside pyproject.toml (which holds the metadata).

The tests sit beside the modules (`jaxline/*_test.py`); this keeps them out
of built wheels, which setuptools' package-data settings cannot do for
Python modules.
"""
import setuptools
from setuptools.command import build_py


class BuildPyWithoutTests(build_py.build_py):

  def find_package_modules(self, package, package_dir):
    modules = super().find_package_modules(package, package_dir)
    return [m for m in modules if not m[1].endswith("_test")]


setuptools.setup(cmdclass={"build_py": BuildPyWithoutTests})
