"""The CPU kernel variants: which one start-up picks for a CPU's features (fake feature sets), the config option's
errors, the torch.library ops' argument checks, and that every buildable variant was built at install."""
import pytest
import torch

from ember.config import CPU_KERNEL_CHOICES, ModelConfig
from ember.ops.cpu_kernels import built_variants, load_library, select_kernels
from ember.ops.cpu_variants import BY_NAME, VARIANTS, best_variant, buildable_variants, cpu_flags, runnable

ALL = {v.name for v in VARIANTS}
HASWELL = frozenset("sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 movbe abm popcnt".split())
ALDER_LAKE = HASWELL | {"avx_vnni"}
SKYLAKE_X = HASWELL | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
ICE_LAKE = SKYLAKE_X | {"avx512_vnni"}


@pytest.mark.parametrize("flags,expected", [
    (ICE_LAKE, "avx512_vnni"),
    (SKYLAKE_X, "avx512"),
    (ALDER_LAKE, "avx2_vnni"),
    (HASWELL, "avx2"),
    (HASWELL - {"fma"}, "portable"),  # AVX2 without FMA (no such CPU, but the rule): nothing vectorised fits
    (frozenset(), "portable"),
])
def test_the_best_variant_the_cpu_runs_is_picked(flags, expected):
    assert best_variant(flags, ALL, machine="x86_64").name == expected


def test_only_built_variants_are_picked():
    assert best_variant(ICE_LAKE, {"avx2", "portable"}, machine="x86_64").name == "avx2"
    assert best_variant(HASWELL, {"avx512_vnni"}, machine="x86_64") is None


def test_other_architectures_get_the_portable_variant():
    assert [v.name for v in buildable_variants("aarch64")] == ["portable"]
    assert best_variant(frozenset({"neon", "asimd"}), ALL, machine="aarch64").name == "portable"


def test_select_kernels_names_what_is_wrong():
    with pytest.raises(ValueError, match="'sse9' is not a variant; choose auto, reference or one of avx512_vnni"):
        select_kernels("sse9")
    with pytest.raises(ValueError, match="'avx512' was not built at install; built: avx2, portable"):
        select_kernels("avx512", flags=ICE_LAKE, built={"avx2", "portable"})
    with pytest.raises(ValueError, match="'avx512_vnni' needs CPU features this CPU lacks: avx512_vnni avx512bw"):
        select_kernels("avx512_vnni", flags=HASWELL, built=ALL)
    assert select_kernels("reference") is None


def test_auto_without_a_built_variant_warns_and_runs_the_reference(caplog):
    assert select_kernels("auto", flags=ICE_LAKE, built=set()) is None
    assert "running on the reference PyTorch ops" in caplog.text


def test_the_config_option_lists_the_variants():
    assert CPU_KERNEL_CHOICES == ("auto", "reference", *BY_NAME)
    with pytest.raises(ValueError, match="cpu_kernels must be one of auto, reference, avx512_vnni"):
        ModelConfig(cpu_kernels="fast")


def test_every_buildable_variant_was_built_at_install():
    """make install compiles them all (a compiler is there wherever the tests run)."""
    assert {v.name for v in buildable_variants()} <= built_variants()


RUNNABLE = [name for name in BY_NAME if name in built_variants() and runnable(BY_NAME[name], cpu_flags())]


@pytest.mark.parametrize("name", RUNNABLE)
def test_each_library_says_which_isa_it_was_built_for(name):
    library = load_library(name)
    assert library.variant.name == name and library.ops is getattr(torch.ops, f"ember_{name}")


@pytest.mark.skipif(not RUNNABLE, reason="no kernel library built")
def test_the_ops_check_their_arguments():
    ops = load_library(RUNNABLE[0]).ops
    x, w = torch.randn(2, 64), torch.randn(64)
    with pytest.raises(RuntimeError, match="Expected a value of type 'float'|expected .*float"):
        ops.rms_norm(x, w, "eps", 1)  # the schema: eps is a float
    with pytest.raises(ValueError, match="x: expected a contiguous float32 CPU tensor"):
        ops.silu_and_mul(x.double(), 1)
    with pytest.raises(ValueError, match="q4_linear: weight .* does not fit x"):
        ops.q4_linear(x, torch.zeros(1, 1, 16, 16, dtype=torch.uint8), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16),
                      False, 1)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, 1), torch.nn.functional.rms_norm(x, (64,), w, 1e-6))
