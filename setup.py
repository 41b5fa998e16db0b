"""Build fedgate: compile ``core/*.pyx`` and map the four folders into ``fedgate``.

``FEDGATE_DEBUG_CYTHON=1`` turns bounds and initialisation checks on in every
kernel (slow; for hunting memory errors).
"""
from __future__ import annotations

import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDERS = ("agent", "core", "drivers", "server")
DEBUG = os.environ.get("FEDGATE_DEBUG_CYTHON", "") == "1"

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "initializedcheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder in FOLDERS:
        for root, dirs, files in os.walk(os.path.join(HERE, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" not in files:
                continue
            rel = os.path.relpath(root, HERE)
            name = "fedgate." + rel.replace(os.sep, ".")
            packages.append(name)
            package_dir[name] = rel
    return packages, package_dir


def _extensions() -> list[Extension]:
    exts = []
    for path in sorted(glob.glob(os.path.join("core", "*.pyx"))):
        mod = os.path.splitext(os.path.basename(path))[0]
        exts.append(
            Extension(
                f"fedgate.core.{mod}",
                [path],
                include_dirs=[np.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
                extra_compile_args=["-O3"] + (["-O0", "-g"] if DEBUG else []),
            )
        )
    return cythonize(exts, compiler_directives=DIRECTIVES, quiet=True)


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={name: ["py.typed", "*.pyi", "*.pxd", "*.sql", "*.toml"] for name in packages},
    ext_modules=_extensions(),
    zip_safe=False,
)
