"""Entry point for setuptools; the metadata lives in pyproject.toml."""
from setuptools import setup

setup()
