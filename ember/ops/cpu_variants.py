"""The CPU kernel library's variants, one per instruction set, and how each is compiled and chosen.

Standard library only: setup.py loads this file by path to build every variant at install, before torch exists.
A new ISA (NEON, say) is one more entry here plus its primitives header in csrc/.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "csrc"
LIBRARY_DIR = Path(__file__).parent / "lib"  # where the install puts the built variants
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    cpu_flags: frozenset[str]  # /proc/cpuinfo flags the CPU must have
    compile_flags: tuple[str, ...]
    machines: tuple[str, ...]  # platform.machine() values it builds for

    @property
    def file_name(self) -> str:
        return f"ember_cpu_{self.name}.so"


_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"})  # -march=x86-64-v3 (Haswell)
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}  # -march=x86-64-v4 (Skylake-X)
_X86 = ("x86_64", "AMD64")

# Best first: start-up takes the first one the CPU runs.
VARIANTS = (
    Variant("avx512_vnni", "AVX-512 with VNNI", _V4 | {"avx512_vnni"}, ("-march=x86-64-v4", "-mavx512vnni"), _X86),
    Variant("avx512", "AVX-512", _V4, ("-march=x86-64-v4",), _X86),
    Variant("avx2_vnni", "AVX2, FMA, F16C with AVX-VNNI", _V3 | {"avx_vnni"}, ("-march=x86-64-v3", "-mavxvnni"), _X86),
    Variant("avx2", "AVX2, FMA, F16C", _V3, ("-march=x86-64-v3",), _X86),
    Variant("portable", "portable C (no vector extensions beyond the baseline)", frozenset(), (), ()),
)
BY_NAME = {v.name: v for v in VARIANTS}


def buildable_variants(machine: str | None = None) -> list[Variant]:
    """The variants that compile for this machine's architecture (portable everywhere)."""
    machine = machine or platform.machine()
    return [v for v in VARIANTS if not v.machines or machine in v.machines]


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo's `flags`, or ARM's `Features`); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def runnable(variant: Variant, flags: frozenset[str], machine: str | None = None) -> bool:
    machine = machine or platform.machine()
    return (not variant.machines or machine in variant.machines) and variant.cpu_flags <= flags


def best_variant(flags: frozenset[str], built: set[str], machine: str | None = None) -> Variant | None:
    """The first variant (best first) that is built and that a CPU with `flags` runs; None if none is."""
    for variant in VARIANTS:
        if variant.name in built and runnable(variant, flags, machine):
            return variant
    return None


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_variant(variant: Variant, out_dir: Path, compiler: str) -> Path:
    """Compiles every csrc/*.c into out_dir/<variant's file>; raises CalledProcessError with the compiler's output."""
    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.c"))
    libs = ["-lmvec", "-lm"] if platform.machine() in _X86 else ["-lm"]  # libmvec: vector expf (vector_math.h)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / variant.file_name
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, *COMMON_FLAGS, *variant.compile_flags, *sources, "-o", str(partial), *libs]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(partial, target)  # atomic: a reader sees the old library or the new one
    return target


def build_all(out_dir: Path = LIBRARY_DIR, log=print) -> dict[str, str | None]:
    """Every buildable variant, in parallel: name -> None (built) or the reason it was not."""
    compiler = find_compiler()
    if compiler is None:
        log("ember: no C compiler found (install gcc, or set CC): Ember's CPU kernels are NOT built, and Ember "
            "will run on its reference PyTorch ops, several times slower")
        return {v.name: "no C compiler" for v in buildable_variants()}

    def one(variant: Variant) -> str | None:
        try:
            compile_variant(variant, out_dir, compiler)
            return None
        except (OSError, subprocess.CalledProcessError) as exc:
            return (getattr(exc, "stderr", "") or str(exc)).strip()[-2000:]

    variants = buildable_variants()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(zip((v.name for v in variants), pool.map(one, variants)))
    for name, error in results.items():
        log(f"ember: CPU kernels {name}: " + ("built" if error is None else f"NOT built: {error}"))
    return results


if __name__ == "__main__":  # python ember/ops/cpu_variants.py [out_dir]: what setup.py does
    failed = build_all(Path(sys.argv[1]) if len(sys.argv) > 1 else LIBRARY_DIR)
    sys.exit(0 if any(error is None for error in failed.values()) else 1)
