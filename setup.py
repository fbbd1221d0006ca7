"""Build script: the ``fedlease`` package, ``kernels/`` installed as ``fedlease.kernels``."""

from setuptools import find_packages, setup

packages = find_packages(include=["fedlease", "fedlease.*"]) + ["fedlease.kernels"]

setup(
    packages=packages,
    package_dir={"fedlease.kernels": "kernels"},
    package_data={"fedlease": ["configs/*.yaml"]},
)
