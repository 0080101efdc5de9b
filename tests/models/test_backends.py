"""Backends are chosen once, at load: a model built with each backend set holds backend objects in its layers
(a quant method per linear layer, an attention backend, a pointwise backend), never flags; and layers and models
import no kernel or backend module (they only call the objects they were given)."""
import ast
from pathlib import Path

import pytest
import torch

from test_llama_vs_hf import build_ember, build_hf

from ember.backends import reference_backends, select_backends
from ember.backends.linear_dense import DenseMethod
from ember.layers.attention import Attention
from ember.layers.embedding import LMHead
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.ops.cpu_kernels import built_variants, load_library
from ember.ops.cpu_variants import BY_NAME, cpu_flags, runnable

ROOT = Path(__file__).resolve().parents[2] / "ember"
VARIANTS = [name for name in BY_NAME if name in built_variants() and runnable(BY_NAME[name], cpu_flags())]
FLAGS = ("use_triton", "use_c_kernels", "int8_activations", "keep_int4_blocks", "batch_invariant")
CPU = torch.device("cpu")


def backend_sets():
    sets = {"reference": reference_backends(), "batch-invariant": reference_backends(batch_invariant=True)}
    for quantize in (None, "int4", "int8"):
        sets[f"torch-{quantize}"] = select_backends(device=CPU, dtype=torch.float32, quantize=quantize,
                                                    batch_invariant=False, use_triton=False, kernels=None,
                                                    int8_activations=True)
        for variant in VARIANTS:
            sets[f"{variant}-{quantize}"] = select_backends(
                device=CPU, dtype=torch.float32, quantize=quantize, batch_invariant=False, use_triton=False,
                kernels=load_library(variant), int8_activations=True)
    sets["triton-int8"] = select_backends(device=CPU, dtype=torch.float32, quantize="int8", batch_invariant=False,
                                          use_triton=True, kernels=None, int8_activations=False)
    return sets


@pytest.mark.parametrize("name,backends", list(backend_sets().items()), ids=list(backend_sets()))
def test_modules_hold_backend_objects_not_flags(name, backends):
    if name.startswith("triton"):
        pytest.importorskip("triton")
    hf, hf_config = build_hf("qwen3")
    model = build_ember(hf, hf_config, backends=backends)
    linears = [m for m in model.modules() if isinstance(m, (Linear, LMHead))]
    assert linears and all(isinstance(m.method, DenseMethod) for m in linears)
    assert {type(m.method) for m in linears if isinstance(m, Linear)} == {type(backends.linear)}
    assert model.lm_head.method is backends.lm_head
    assert all(m.backend is backends.attention for m in model.modules() if isinstance(m, Attention))
    assert all(m.pointwise is backends.pointwise for m in model.modules() if isinstance(m, RMSNorm))
    for module in model.modules():
        assert not [flag for flag in FLAGS if hasattr(module, flag)], type(module).__name__
    assert (model.model.fused_layers is not None) == (backends.fused_decode is not None)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) not in skipped and isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif id(node) not in skipped and isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("package", ["layers", "models"])
def test_layers_and_models_import_no_kernels_or_backends(package):
    for path in sorted((ROOT / package).glob("*.py")):
        wrong = [m for m in imported_modules(path) if m.startswith(("ember.ops", "ember.backends"))]
        assert not wrong, f"{path.name} imports {wrong}"
