"""Ember's C kernels for the CPU path: the library variant built at install for this CPU (cpu_variants.py),
loaded through ctypes and registered as torch.library ops, one namespace per variant (torch.ops.ember_avx2, ...),
whose schemas PyTorch checks on every call; each op also checks the dtypes and shapes its C code relies on.

A `KernelLibrary` is what a backend holds: its methods are the ops. `select_kernels` makes the one choice per
model load (config `cpu_kernels`: auto | reference | a variant name) and logs it.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from ember.ops.cpu_variants import BY_NAME, LIBRARY_DIR, VARIANTS, Variant, best_variant, cpu_flags, runnable

log = logging.getLogger(__name__)

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "q4_linear": [_P, _I64, _I64, _P, _P, _P, _I64, _P, _INT],
    "q4_i8_linear": [_P, _I64, _I64, _P, _P, _P, _I64, _P, _INT],
    "q8_linear": [_P, _I64, _I64, _P, _P, _I64, _P, _INT],
    "q8_i8_linear": [_P, _I64, _I64, _P, _P, _I64, _P, _INT],
    "rms_norm": [_P, _I64, _P, _P, _P, _P, _I64, _I64, _F, _INT],
    "silu_and_mul": [_P, _P, _I64, _I64, _INT],
    "rotary": [_P, _I64, _I64, _I64, _I64, _P, _P, _P],
    "paged_attention": [_P, _I64, _P, _P, _INT, _I64, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _I64, _F, _I64, _P,
                        _INT],
    "prefill_attention": [_P, _I64, _P, _P, _INT, _I64, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _I64, _F, _I64, _P,
                          _INT],
    "decoder_layer": [_P, _P, _P, _P, _P, _P, _INT],
    "q8_0_i8_linear": [_P, _I64, _I64, _P, _P, _I64, _P, _INT],
    "ember_struct_sizes": [_P],
}

SCHEMAS = {
    "q4_linear": "q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m, bool int8_activations, int num_threads) -> Tensor",
    "q8_linear": "q8_linear(Tensor x, Tensor qs, Tensor scale, bool int8_activations, int num_threads) -> Tensor",
    "q8_0_linear": "q8_0_linear(Tensor x, Tensor qs, Tensor d, int num_threads) -> Tensor",
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps, int num_threads) -> Tensor",
    "add_rms_norm": "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, int num_threads) -> (Tensor, Tensor)",
    "silu_and_mul": "silu_and_mul(Tensor x, int num_threads) -> Tensor",
    "rotary_": "rotary_(Tensor(a!) x, Tensor positions, Tensor cos_cache, Tensor sin_cache) -> ()",
    "paged_attention": (
        "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_ids, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_table, float scale, int sliding_window, bool long_queries, Tensor(a!) out, "
        "int num_threads) -> ()"),
    "decoder_layer": ("decoder_layer(int layer, int step, Tensor hidden, Tensor? residual, int num_threads) "
                      "-> (Tensor, Tensor)"),
}

# Queries per sequence up to which the short-query attention kernel serves (decode, speculative
# verification: attention.c); longer ones (prefill chunks) go to the tiled one (prefill_attention.c).
ATTENTION_MAX_QUERY = 16
KERNEL_COLUMN_GROUP = 16  # the matmuls store weights in groups of 16 output columns (qlinear.c)


def built_variants(lib_dir: Path = LIBRARY_DIR) -> set[str]:
    return {v.name for v in VARIANTS if (lib_dir / v.file_name).exists()}


def select_kernels(requested: str = "auto", flags: frozenset[str] | None = None,
                   built: set[str] | None = None) -> KernelLibrary | None:
    """The kernel library for `requested` (auto: the best built variant this CPU runs), or None for the reference
    PyTorch ops. auto without a usable variant warns; a named variant that is unknown, not built or beyond this
    CPU is a ValueError that lists what there is."""
    if requested == "reference":
        log.info("CPU kernels: reference PyTorch ops (cpu_kernels=reference)")
        return None
    flags = cpu_flags() if flags is None else flags
    built = built_variants() if built is None else built
    if requested == "auto":
        variant = best_variant(flags, built)
        if variant is None:
            log.warning("CPU kernels: none of Ember's kernel libraries is built for this CPU (built: %s; "
                        "reinstall with a C compiler: make install); running on the reference PyTorch ops, "
                        "several times slower", ", ".join(sorted(built)) or "none")
            return None
    else:
        variant = BY_NAME.get(requested)
        if variant is None:
            raise ValueError(f"cpu_kernels {requested!r} is not a variant; choose auto, reference or one of "
                             f"{', '.join(BY_NAME)}")
        if variant.name not in built:
            raise ValueError(f"cpu_kernels {requested!r} was not built at install; built: "
                             f"{', '.join(sorted(built)) or 'none'}")
        if not runnable(variant, flags):
            missing = " ".join(sorted(variant.cpu_flags - flags))
            raise ValueError(f"cpu_kernels {requested!r} needs CPU features this CPU lacks: {missing}")
    library = load_library(variant.name)
    log.info("CPU kernels: %s (%s), %s", variant.name, variant.description, library.path)
    return library


@functools.cache
def load_library(name: str, lib_dir: Path = LIBRARY_DIR) -> KernelLibrary:
    """The variant's library, loaded once per process and registered as torch.ops.ember_<name>."""
    return KernelLibrary(BY_NAME[name], lib_dir / BY_NAME[name].file_name)


def _f32(name: str, t: torch.Tensor, dim: int | None = None) -> None:
    if not (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and (dim is None or t.dim() == dim)):
        raise ValueError(f"{name}: expected a contiguous float32 CPU tensor{'' if dim is None else f' of {dim} dims'}, got "
           f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _i64(name: str, t: torch.Tensor) -> None:
    if not (t.dtype == torch.long and t.is_contiguous()):
        raise ValueError(f"{name}: expected a contiguous int64 tensor, got {t.dtype}")


class KernelLibrary:
    """One loaded variant. Its methods are the ops; each takes float32 CPU tensors (see the schemas)."""

    def __init__(self, variant: Variant, path: Path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: Ember's {variant.name} kernel library is not built")
        self.variant, self.path = variant, path
        self._lib = lib = ctypes.CDLL(str(path))
        for name, argtypes in SIGNATURES.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
        lib.q4_i8_supported.argtypes, lib.q4_i8_supported.restype = [], _INT
        self.int8_activations = bool(lib.q4_i8_supported())  # int8-activation matmuls are vectorised here
        self._check_abi()
        self.namespace = f"ember_{variant.name}"
        self._registration = torch.library.Library(self.namespace, "DEF")
        for op, schema in SCHEMAS.items():
            self._registration.define(schema)
            self._registration.impl(op, getattr(self, f"_{op.rstrip('_')}"), "CPU")
        self.ops = getattr(torch.ops, self.namespace)

    def _check_abi(self) -> None:
        """decode_layer.c's structs against their ctypes mirrors, and the ISA the library says it was built for."""
        lib = self._lib
        lib.ember_isa.argtypes, lib.ember_isa.restype = [], ctypes.c_char_p
        self.isa = lib.ember_isa().decode()
        if self.isa != self.variant.name:
            raise ImportError(f"{self.path}: built for {self.isa}, expected {self.variant.name}")
        sizes = (ctypes.c_int64 * 3)()
        lib.ember_struct_sizes(sizes)
        mirrors = (Q4Linear, DecoderLayer, DecodeStep)
        if list(sizes) != [ctypes.sizeof(m) for m in mirrors]:
            raise ImportError(f"{self.path}: struct sizes {list(sizes)} differ from cpu_kernels.py's mirrors "
                              f"{[ctypes.sizeof(m) for m in mirrors]}: rebuild (make install)")

    # ---------------------------------------------------------------- the ops, as callers use them
    def q4_linear(self, x, qs, d, m, int8_activations: bool) -> torch.Tensor:
        """x [M, K] float32 times a 4-bit weight in qlinear.c's layout (qs [N/16, K/32, 16, 16] uint8; with
        int8_activations qlinear_i8.c's [N/16, K/32, 4, 16, 4]; d and m [N/16, K/32, 16] float32) -> [M, N]."""
        return self.ops.q4_linear(x, qs, d, m, int8_activations, torch.get_num_threads())

    def q8_linear(self, x, qs, scale, int8_activations: bool) -> torch.Tensor:
        """x [M, K] times a per-column int8 weight (qs [N/16, K, 16] int8; with int8_activations [N/16, K/4, 16, 4]
        uint8 holding q + 128), scale [N] -> [M, N]."""
        return self.ops.q8_linear(x, qs, scale, int8_activations, torch.get_num_threads())

    def q8_0_linear(self, x, qs, d) -> torch.Tensor:
        """x [M, K] times a GGUF Q8_0 weight (qs [N/16, K/32, 8, 16, 4] uint8 holding q + 128, d [N/16, K/32, 16]
        float32: qlinear_i8.c's layout), x rounded to int8 per block of 32 (llama.cpp's Q8_0 x Q8_0)."""
        return self.ops.q8_0_linear(x, qs, d, torch.get_num_threads())

    def rms_norm(self, x, residual, weight, eps: float):
        """RMSNorm(x), or with a residual (RMSNorm(x + residual), x + residual), over the last dim."""
        if residual is None:
            return self.ops.rms_norm(x, weight, eps, torch.get_num_threads())
        return self.ops.add_rms_norm(x, residual, weight, eps, torch.get_num_threads())

    def silu_and_mul(self, x) -> torch.Tensor:  # [M, 2d] -> [M, d]
        return self.ops.silu_and_mul(x, torch.get_num_threads())

    def rotary_(self, x, positions, cos_cache, sin_cache) -> None:
        """Rotates x [num_tokens, num_heads, head_dim] (heads contiguous within a token) in place."""
        self.ops.rotary_(x, positions, cos_cache, sin_cache)

    def paged_attention(self, q, k_cache, v_cache, seq_ids, query_start_loc, seq_lens, block_table, scale: float,
                        sliding_window: int | None, out, long_queries: bool = False) -> None:
        """Attention of the sequences `seq_ids` over their cached context into their rows of `out`; long_queries:
        the tiled kernel for prefill chunks (prefill_attention.c)."""
        self.ops.paged_attention(q, k_cache, v_cache, seq_ids, query_start_loc, seq_lens, block_table, scale,
                                 sliding_window or 0, long_queries, out, torch.get_num_threads())

    def decoder_layer(self, layer: DecoderLayer, step: DecodeStep, hidden, residual):
        """(hidden_out, residual_out) of one decoder layer (decode_layer.c); hidden [T, H] float32 contiguous."""
        return self.ops.decoder_layer(ctypes.addressof(layer), ctypes.addressof(step), hidden, residual,
                                      torch.get_num_threads())

    # ---------------------------------------------------------------- torch.library implementations
    def _q4_linear(self, x, qs, d, m, int8_activations, num_threads):
        _f32("x", x, 2)
        num_rows, in_features = x.shape
        if not (qs.dtype == torch.uint8 and qs.is_contiguous() and qs.dim() == (5 if int8_activations else 4)
                and qs.shape[1] * 32 == in_features and d.shape == m.shape == qs.shape[:2] + (16,)):
            raise ValueError(f"q4_linear: weight {tuple(qs.shape)} {qs.dtype} does not fit x {tuple(x.shape)}")
        _f32("d", d), _f32("m", m)
        if int8_activations and not self.int8_activations:
            raise ValueError(f"{self.variant.name}: no int8-activation kernels")
        out = x.new_empty(num_rows, qs.shape[0] * 16)
        kernel = self._lib.q4_i8_linear if int8_activations else self._lib.q4_linear
        kernel(x.data_ptr(), num_rows, in_features, qs.data_ptr(), d.data_ptr(), m.data_ptr(), out.shape[1],
               out.data_ptr(), num_threads)
        return out

    def _q8_linear(self, x, qs, scale, int8_activations, num_threads):
        _f32("x", x, 2)
        num_rows, in_features = x.shape
        if int8_activations:
            fits = qs.dtype == torch.uint8 and qs.dim() == 4 and qs.shape[1] * 4 == in_features and in_features % 32 == 0
        else:
            fits = qs.dtype == torch.int8 and qs.dim() == 3 and qs.shape[1] == in_features
        if not (fits and qs.is_contiguous() and scale.shape == (qs.shape[0] * 16,)):
            raise ValueError(f"q8_linear: weight {tuple(qs.shape)} {qs.dtype} does not fit x {tuple(x.shape)}")
        _f32("scale", scale)
        if int8_activations and not self.int8_activations:
            raise ValueError(f"{self.variant.name}: no int8-activation kernels")
        out = x.new_empty(num_rows, qs.shape[0] * 16)
        kernel = self._lib.q8_i8_linear if int8_activations else self._lib.q8_linear
        kernel(x.data_ptr(), num_rows, in_features, qs.data_ptr(), scale.data_ptr(), out.shape[1], out.data_ptr(),
               num_threads)
        return out

    def _q8_0_linear(self, x, qs, d, num_threads):
        _f32("x", x, 2)
        num_rows, in_features = x.shape
        if not (qs.dtype == torch.uint8 and qs.is_contiguous() and qs.dim() == 5 and qs.shape[1] * 32 == in_features
                and d.shape == qs.shape[:2] + (16,)):
            raise ValueError(f"q8_0_linear: weight {tuple(qs.shape)} does not fit x {tuple(x.shape)}")
        _f32("d", d)
        out = x.new_empty(num_rows, qs.shape[0] * 16)
        self._lib.q8_0_i8_linear(x.data_ptr(), num_rows, in_features, qs.data_ptr(), d.data_ptr(), out.shape[1],
                                 out.data_ptr(), num_threads)
        return out

    def _norm_rows(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """x with one fixed row stride (unit inner stride), and that stride and the row count."""
        if not (x.dtype == torch.float32 and x.stride(-1) == 1 and x.shape[-1] == weight.shape[0]):
            raise ValueError(f"rms_norm: x {x.dtype} {tuple(x.shape)} against weight {tuple(weight.shape)}")
        _f32("weight", weight, 1)
        hidden = x.shape[-1]
        row_stride = x.stride(-2) if x.dim() > 1 else hidden
        if x.dim() > 2 and x.stride(-3) != row_stride * x.shape[-2]:  # not one fixed row stride: pack it
            x, row_stride = x.contiguous(), hidden
        return x, row_stride, x.numel() // hidden

    def _rms_norm(self, x, weight, eps, num_threads):
        x, row_stride, rows = self._norm_rows(x, weight)
        out = torch.empty(x.shape, dtype=x.dtype)
        self._lib.rms_norm(x.data_ptr(), row_stride, None, None, weight.data_ptr(), out.data_ptr(), rows,
                           x.shape[-1], eps, num_threads)
        return out

    def _add_rms_norm(self, x, residual, weight, eps, num_threads):
        x, row_stride, rows = self._norm_rows(x, weight)
        residual = residual.contiguous()
        if not (residual.dtype == torch.float32 and residual.shape == x.shape):
            raise ValueError("add_rms_norm: residual's shape")
        out, residual_out = torch.empty(x.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)
        self._lib.rms_norm(x.data_ptr(), row_stride, residual.data_ptr(), residual_out.data_ptr(), weight.data_ptr(),
                           out.data_ptr(), rows, x.shape[-1], eps, num_threads)
        return out, residual_out

    def _silu_and_mul(self, x, num_threads):
        _f32("x", x, 2)
        rows, width = x.shape
        out = x.new_empty(rows, width // 2)
        self._lib.silu_and_mul(x.data_ptr(), out.data_ptr(), rows, width // 2, num_threads)
        return out

    def _rotary(self, x, positions, cos_cache, sin_cache):
        num_tokens, num_heads, head_dim = x.shape
        if not (x.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == head_dim):
            raise ValueError("rotary_: x must be float32 with contiguous heads")
        _i64("positions", positions)
        if positions.shape != (num_tokens,):
            raise ValueError("rotary_: one position per token")
        _f32("cos_cache", cos_cache, 2), _f32("sin_cache", sin_cache, 2)
        if not (cos_cache.shape[1] * 2 == head_dim and sin_cache.shape == cos_cache.shape):
            raise ValueError("rotary_: cache width")
        self._lib.rotary(x.data_ptr(), x.stride(0), num_tokens, num_heads, head_dim, positions.data_ptr(),
                         cos_cache.data_ptr(), sin_cache.data_ptr())

    def _paged_attention(self, q, k_cache, v_cache, seq_ids, query_start_loc, seq_lens, block_table, scale,
                         sliding_window, long_queries, out, num_threads):
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        if not (q.dtype == torch.float32 and q.stride(2) == 1 and q.stride(1) == head_dim and q.shape[2] == head_dim):
            raise ValueError("paged_attention: q must be float32 [tokens, heads, head_dim] with contiguous heads")
        if not (k_cache.dtype in (torch.float16, torch.float32) and k_cache.is_contiguous() and v_cache.is_contiguous()
                and v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype):
            raise ValueError("paged_attention: KV cache")
        _f32("out", out)
        if out.shape != q.shape:
            raise ValueError("paged_attention: out's shape")
        for name, t in (("seq_ids", seq_ids), ("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
                        ("block_table", block_table)):
            _i64(name, t)
        kernel = self._lib.prefill_attention if long_queries else self._lib.paged_attention
        kernel(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.float16),
               block_size, q.shape[1], num_kv_heads, head_dim, seq_ids.data_ptr(), seq_ids.numel(),
               query_start_loc.data_ptr(), seq_lens.data_ptr(), block_table.data_ptr(), block_table.shape[1], scale,
               sliding_window, out.data_ptr(), num_threads)

    def _decoder_layer(self, layer, step, hidden, residual, num_threads):
        _f32("hidden", hidden, 2)
        if not (residual is None or (residual.shape == hidden.shape and residual.is_contiguous())):
            raise ValueError("decoder_layer: residual")
        hidden_out, residual_out = torch.empty_like(hidden), torch.empty_like(hidden)
        self._lib.decoder_layer(layer, step, hidden.data_ptr(), None if residual is None else residual.data_ptr(),
                                hidden_out.data_ptr(), residual_out.data_ptr(), num_threads)
        return hidden_out, residual_out


# decode_layer.c's structs, field for field (checked against the library's own sizes at load)
class Q4Linear(ctypes.Structure):
    _fields_ = [("qs", _P), ("d", _P), ("m", _P), ("bias", _P), ("out_features", _I64), ("in_features", _I64),
                ("int8_activations", _I64)]


class DecoderLayer(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("num_heads", _I64), ("num_kv_heads", _I64), ("head_dim", _I64),
                ("intermediate", _I64), ("eps", _F), ("scale", _F), ("window", _I64),
                ("input_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("qkv", Q4Linear), ("o", Q4Linear), ("gate_up", Q4Linear), ("down", Q4Linear),
                ("cos_cache", _P), ("sin_cache", _P)]


class DecodeStep(ctypes.Structure):
    _fields_ = [("num_tokens", _I64), ("positions", _P), ("slots", _P), ("k_cache", _P), ("v_cache", _P),
                ("kv_f16", _I64), ("block_size", _I64), ("seq_ids", _P), ("query_start_loc", _P), ("seq_lens", _P),
                ("block_table", _P), ("num_seqs", _I64), ("max_blocks", _I64)]


def describe_install() -> str:
    """One line for `make install`: the variants built and the one this CPU gets."""
    built = built_variants()
    if not built:
        return ("ember: no CPU kernel library was built (no C compiler? install gcc and run make install again); "
                "Ember will run on its reference PyTorch ops, several times slower")
    chosen = best_variant(cpu_flags(), built)
    return (f"ember: CPU kernels built: {', '.join(v.name for v in VARIANTS if v.name in built)}; this CPU runs "
            f"{chosen.name if chosen else 'none of them (the reference PyTorch ops)'}")


if __name__ == "__main__":
    print(describe_install())
