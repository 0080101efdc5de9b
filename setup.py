"""Builds Ember's CPU kernel library at install, one shared library per instruction set (ember/ops/cpu_variants.py).

The kernels are plain C with OpenMP (no Python or PyTorch headers), compiled by the system C compiler. A missing
compiler, or a variant that fails to compile, is reported here and does not fail the install: Ember then runs
the variants that did build, or its reference PyTorch ops.
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


def _variants():
    spec = importlib.util.spec_from_file_location("_ember_cpu_variants", HERE / "ember" / "ops" / "cpu_variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


class BuildKernels(build_ext):
    """build_ext for libraries that Python does not import: ctypes loads them (ember/ops/cpu_kernels.py)."""

    def run(self):
        variants = _variants()
        if self.inplace or self.editable_mode:
            out_dir = variants.LIBRARY_DIR
        else:
            out_dir = Path(self.build_lib) / "ember" / "ops" / "lib"
        self._outputs = []
        for name, error in variants.build_all(out_dir, log=lambda line: print(line, file=sys.stderr)).items():
            if error is None:
                self._outputs.append(str(out_dir / variants.BY_NAME[name].file_name))

    def get_outputs(self):
        return list(getattr(self, "_outputs", []))


class KernelDistribution(Distribution):
    def has_ext_modules(self):  # there are no Python extensions, but build_ext must run (and the wheel is per platform)
        return True


setup(distclass=KernelDistribution, cmdclass={"build_ext": BuildKernels})
