"""Builds the native CPU kernels (csrc/) next to the Python package; metadata lives in pyproject.toml.

Needs torch importable at build time: install with `pip install --no-build-isolation -e .` (the
Makefile does). On non-x86 machines the extension is skipped and moemix falls back to the
portable reference kernels (`moemix inspect` and the kernel selector say why).
"""

import platform

from setuptools import setup

ext_modules, cmdclass = [], {}
if platform.machine().lower() in ("x86_64", "amd64"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "vllm_moemix._cpu_kernels",
            ["csrc/cpu_kernels.cpp"],
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
