"""Packaging: the repository's ``models/`` folder installs as ``torch_nvdla.models``."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["torch_nvdla", "torch_nvdla.*"]) + ["torch_nvdla.models"],
    package_dir={"torch_nvdla.models": "models"},
)
