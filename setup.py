"""Build script: the ``fedlease`` package, ``kernels/`` installed as ``fedlease.kernels``, and the
compiled CPU kernels ``fedlease._C`` (C++17, OpenMP, built with ninja through
``torch.utils.cpp_extension``).

``FEDLEASE_NO_EXT=1`` skips the extension. A failed build does not fail the install: the package
then runs on its ``torch`` backend and says why ``cpp`` is unavailable.
"""

import os
import sys

from setuptools import find_packages, setup

packages = [*find_packages(include=["fedlease", "fedlease.*"]), "fedlease.kernels"]
ext_modules = []
cmdclass = {}

if os.environ.get("FEDLEASE_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

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

    ext_modules.append(
        CppExtension(
            "fedlease._C",
            sources=["csrc/module.cpp", "csrc/moe_lora_cpu.cpp"],
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)

setup(
    packages=packages,
    package_dir={"fedlease.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
