"""Builds the native CPU kernels (csrc/) next to the Python package; metadata lives in pyproject.toml.

Needs torch importable at build time: install with `pip install --no-build-isolation -e .` (the
Makefile does). The core is built for baseline x86-64; each csrc/isa_*.cpp compiles its micro-kernel for
its own target (AVX2, AVX-VNNI, AVX-512 VNNI) and the variant is picked at run time from cpuid, so one
build runs on any x86-64 CPU. On non-x86 machines the extension is skipped and moemix falls back to the
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
            ["csrc/cpu_kernels.cpp", "csrc/isa_avx512_vnni.cpp", "csrc/isa_avx_vnni.cpp", "csrc/isa_avx2.cpp"],
            depends=["csrc/kernel_api.h", "csrc/microkernel.h", "csrc/isa_ymm.h"],
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
