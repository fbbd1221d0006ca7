"""Build script: the ``fedlease`` package, ``kernels/`` installed as ``fedlease.kernels``, and the
compiled kernels ``fedlease._C`` (C++17, OpenMP, built with ninja through
``torch.utils.cpp_extension``; with CUDA routing kernels when torch is a CUDA build and nvcc is
installed).

``FEDLEASE_NO_EXT=1`` skips the extension. A failed build does not fail the install: the package
then runs on its ``torch`` backend and says why ``cpp`` is unavailable.
"""

import os
import sys

from setuptools import find_packages, setup

packages = [*find_packages(include=["fedlease", "fedlease.*"]), "fedlease.kernels"]
ext_modules = []
cmdclass = {}


def with_cuda() -> bool:
    """CUDA routing kernels too: needs a CUDA build of torch and a CUDA toolkit (nvcc). A CPU
    torch next to an installed nvcc builds the CPU extension only. ``FEDLEASE_NO_CUDA=1`` opts
    out."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("FEDLEASE_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


if os.environ.get("FEDLEASE_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, or warn and install without it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, headers missing, ...
                print(f"fedlease: building fedlease._C failed, installing without it: {exc}",
                      file=sys.stderr)  # fmt: skip

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"fedlease: building {ext.name} failed, installing without it: {exc}",
                      file=sys.stderr)  # fmt: skip

    sources = [
        "csrc/module.cpp", "csrc/moe_lora.cpp", "csrc/moe_lora_linear.cpp",
        "csrc/autograd.cpp", "csrc/dropout.cpp", "csrc/softmax_dropout.cpp",
    ]  # fmt: skip
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda():
        print("fedlease: building fedlease._C with the CUDA routing kernels", file=sys.stderr)
        ext = CUDAExtension(
            "fedlease._C",
            sources=[*sources, "csrc/routing_cuda.cu"],
            define_macros=[("FEDLEASE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fedlease._C",
            sources=sources,
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    ext_modules.append(ext)
    cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)

setup(
    packages=packages,
    package_dir={"fedlease.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
