"""Build script: the pure-Python package plus `gefx.kernels` (from kernels/).

The optional C++ extension `gefx._C` (csrc/) is added here by its own issue; until then this file
only maps the packages.
"""
from setuptools import setup

setup(
    packages=["gefx", "gefx.kernels"],
    package_dir={"gefx": "gefx", "gefx.kernels": "kernels"},
)
