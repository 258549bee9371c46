"""Packaging: the repository's ``models/`` folder installs as ``torch_nvdla.models``, and the
optional C kernels of the calibration build when a C compiler is present (without one, the
install still succeeds and calibration uses torch operations; see ``docs/calib.md``)."""

import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

_OPENMP = ["-fopenmp"]


class BuildExt(build_ext):
    """Build the kernel with OpenMP where the compiler has it, else without (the same bins;
    one thread per tensor). A compiler that fails both ways leaves the extension out
    (``optional=True``)."""

    def build_extension(self, ext):
        if not set(_OPENMP) <= set(ext.extra_compile_args):  # (Windows: built without OpenMP)
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler/linker failure: retry plain
            print(f"building {ext.name} with OpenMP failed ({error}); building it without", file=sys.stderr)
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in _OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in _OPENMP]
            return super().build_extension(ext)


kernels = Extension(
    "torch_nvdla.calib._kernels",
    sources=["torch_nvdla/calib/_kernels.c"],
    # Portable code (no -march): the same build runs on every CPU of its architecture.
    extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-std=c11", *_OPENMP],
    extra_link_args=[] if sys.platform == "win32" else list(_OPENMP),
    optional=True,
)

setup(
    packages=find_packages(include=["torch_nvdla", "torch_nvdla.*"]) + ["torch_nvdla.models"],
    package_dir={"torch_nvdla.models": "models"},
    ext_modules=[kernels],
    cmdclass={"build_ext": BuildExt},
)
