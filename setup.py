"""Kept for tools that still call setup.py; pyproject.toml holds the metadata."""
import setuptools

setuptools.setup()
