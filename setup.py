"""Builds the `_fastpath` Cython extension on every `pip install` (no manual cythonize step).

All compiler directives live here, in one place: the hot loops must not touch Python objects,
and `cython -a _fastpath/_compiled.pyx` shows whether they do.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        "_fastpath._compiled",
        ["_fastpath/_compiled.pyx"],
        # the C kernels (base64 + metering, scalar and AVX2); listed so edits rebuild and sdists ship it
        depends=["_fastpath/_kernels.h"],
        extra_compile_args=["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
        annotate=bool(os.environ.get("FASTPATH_ANNOTATE")),
    )
)
