"""Builds the native CPU kernels (csrc/) as bitnet158._cpu; everything else is in pyproject.toml.

The extension is optional: where it does not compile, the package installs without it and runs on
the PyTorch reference kernels (`bitnet158 info` says which). It needs only a C++17 compiler, not
PyTorch: tensors reach it as data pointers.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args = ["/O2", "/std:c++17"]
    link_args: list[str] = []
else:
    # No -march=native: per-ISA code is compiled for its instruction set and chosen at run time.
    # No contraction of a * b + c into an FMA: the kernels' epilogues must round like PyTorch's.
    compile_args = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
    link_args = ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "bitnet158._cpu",
            sources=["csrc/module.cpp", "csrc/kernels.cpp", "csrc/threadpool.cpp", "csrc/decode.cpp"],
            depends=["csrc/kernels.h", "csrc/threadpool.h", "csrc/decode.h"],
            include_dirs=["csrc"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            language="c++",
            optional=True,
        )
    ]
)
