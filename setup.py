"""Packaging: the repository's ``models/`` folder installs as ``torch_nvdla.models``, and the
optional C binning kernel builds when a C compiler is present (without one, the install
still succeeds and calibration bins with torch operations; see ``docs/calib.md``)."""

import sys

from setuptools import Extension, find_packages, setup

binning = Extension(
    "torch_nvdla.calib._binning",
    sources=["torch_nvdla/calib/_binning.c"],
    # Portable code (no -march): the same build runs on every CPU of its architecture.
    extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-std=c99"],
    optional=True,
)

setup(
    packages=find_packages(include=["torch_nvdla", "torch_nvdla.*"]) + ["torch_nvdla.models"],
    package_dir={"torch_nvdla.models": "models"},
    ext_modules=[binning],
)
