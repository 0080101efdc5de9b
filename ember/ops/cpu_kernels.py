"""Ember's C kernels for the CPU path (`ops/csrc/*.c`): compiled for this CPU on first use, cached, called
through ctypes on float32 tensors. Without a C compiler (or with EMBER_CPU_KERNELS=0) `kernels()` is None and
callers keep PyTorch's ops.

They are plain C with OpenMP and no PyTorch headers, so a build takes about a second; linked against
libgomp.so.1, they share the OpenMP runtime PyTorch has already loaded (one thread pool, no oversubscription).
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = ("qlinear.c", "qlinear_i8.c", "pointwise.c", "attention.c", "prefill_attention.c", "decode_layer.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]

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
}

# Queries per sequence up to which the short-query attention kernel serves (decode, speculative
# verification: attention.c); longer ones (prefill chunks) go to the tiled one (prefill_attention.c).
ATTENTION_MAX_QUERY = 16


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ember" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def build(compiler: str, flags: list[str] = FLAGS) -> Path:
    """The shared library for these sources, flags and CPU: from the cache, or compiled into it."""
    src_dir = Path(__file__).parent / "csrc"
    sources = [src_dir / name for name in SOURCES]
    key = hashlib.sha256()
    for part in [compiler, *flags, _cpu_id(), *(s.read_text() for s in sorted(src_dir.glob("*.[ch]")))]:
        key.update(part.encode())
    target = cache_dir() / f"ember_cpu_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling Ember's CPU kernels into %s", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        libs = ["-lmvec", "-lm"] if platform.machine() == "x86_64" else ["-lm"]  # libmvec: vector expf (vector_math.h)
        subprocess.run([compiler, *flags, *map(str, sources), "-o", str(out), *libs], check=True,
                       capture_output=True, text=True)
        os.replace(out, target)  # atomic: concurrent first runs each publish a whole file
    return target


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be built here (the torch ops are used instead)."""
    if os.environ.get("EMBER_CPU_KERNELS", "1") == "0":
        return None
    return load()


def load(flags: list[str] = FLAGS) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() != "Linux":
        log.info("no C compiler found: Ember's CPU kernels are off (PyTorch ops are used)")
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler, flags)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("Ember's CPU kernels could not be built (%s); PyTorch ops are used", str(detail).strip()[:500])
        return None
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    lib.q4_i8_supported.argtypes, lib.q4_i8_supported.restype = [], _INT
    return lib


def int8_activations_supported() -> bool:
    """qlinear_i8.c's matmul is built here (the CPU has AVX512-VNNI)."""
    return kernels() is not None and bool(kernels().q4_i8_supported())


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels apply: float32 CPU tensors (contiguous rows), and the library is built."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors) and (
        kernels() is not None)


def q4_linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 (contiguous) times a 4-bit weight in qlinear.c's layout (qs [N/16, K/32, 16, 16] uint8,
    d and m [N/16, K/32, 16] float32) -> [M, N]."""
    return _q4_matmul(kernels().q4_linear, x, qs, d, m)


def q4_i8_linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """As q4_linear, with x rounded to int8 per block of 32 inputs and qs in qlinear_i8.c's layout
    ([N/16, K/32, 4, 16, 4] uint8)."""
    return _q4_matmul(kernels().q4_i8_linear, x, qs, d, m)


def _q4_matmul(kernel, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    num_rows, in_features = x.shape
    out_features = qs.shape[0] * 16
    out = x.new_empty(num_rows, out_features)
    kernel(x.data_ptr(), num_rows, in_features, qs.data_ptr(), d.data_ptr(), m.data_ptr(), out_features,
           out.data_ptr(), torch.get_num_threads())
    return out


def q8_linear(x: torch.Tensor, qs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 (contiguous) times an int8 weight in qlinear.c's layout (qs [N/16, K, 16], a float32
    scale per output column [N]) -> [M, N]."""
    return _q8_matmul(kernels().q8_linear, x, qs, scale)


def q8_i8_linear(x: torch.Tensor, qs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """As q8_linear, with x rounded to int8 per block of 32 inputs and qs in qlinear_i8.c's layout
    ([N/16, K/4, 16, 4] uint8: q + 128)."""
    return _q8_matmul(kernels().q8_i8_linear, x, qs, scale)


def _q8_matmul(kernel, x: torch.Tensor, qs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    num_rows, in_features = x.shape
    out = x.new_empty(num_rows, qs.shape[0] * 16)
    kernel(x.data_ptr(), num_rows, in_features, qs.data_ptr(), scale.data_ptr(), qs.shape[0] * 16, out.data_ptr(),
           torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """RMSNorm(x) or (RMSNorm(x + residual), x + residual) over the last dim; rows of x may be strided
    (x [..., H] with unit inner stride and rows at a fixed stride), residual contiguous."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    row_stride = x.stride(-2) if x.dim() > 1 else hidden
    if x.dim() > 2 and x.stride(-3) != row_stride * x.shape[-2]:  # not one fixed row stride: pack it
        x = x.contiguous()
        row_stride = hidden
    out = torch.empty(x.shape, dtype=x.dtype)
    residual_out = None if residual is None else torch.empty(x.shape, dtype=x.dtype)
    kernels().rms_norm(x.data_ptr(), row_stride, None if residual is None else residual.data_ptr(),
                       None if residual_out is None else residual_out.data_ptr(), weight.data_ptr(), out.data_ptr(),
                       rows, hidden, eps, torch.get_num_threads())
    return out if residual is None else (out, residual_out)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [M, 2d] contiguous -> [M, d]
    rows, width = x.shape
    out = x.new_empty(rows, width // 2)
    kernels().silu_and_mul(x.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
    return out


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Rotates x [num_tokens, num_heads, head_dim] (heads contiguous within a token) in place."""
    num_tokens, num_heads, head_dim = x.shape
    kernels().rotary(x.data_ptr(), x.stride(0), num_tokens, num_heads, head_dim, positions.data_ptr(),
                     cos_cache.data_ptr(), sin_cache.data_ptr())


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], heads contiguous within a token
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] contiguous, float32 or float16
    v_cache: torch.Tensor,
    seq_ids: torch.Tensor,  # [n] int64: the sequences to attend (their rows of `out` are written)
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int64
    seq_lens: torch.Tensor,  # [num_seqs] int64
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int64
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim] contiguous
    long_queries: bool = False,  # the tiled kernel for prefill chunks (prefill_attention.c)
) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    kernel = kernels().prefill_attention if long_queries else kernels().paged_attention
    kernel(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), is_half(k_cache), block_size, q.shape[1],
        num_kv_heads, head_dim, seq_ids.data_ptr(), seq_ids.numel(), query_start_loc.data_ptr(), seq_lens.data_ptr(),
        block_table.data_ptr(), block_table.shape[1], scale, sliding_window or 0, out.data_ptr(),
        torch.get_num_threads())


def is_half(cache: torch.Tensor) -> int:
    """The kernels' kv_f16 flag: 1 for a float16 cache, 0 for float32."""
    assert cache.dtype in (torch.float16, torch.float32), f"a {cache.dtype} KV cache"
    return int(cache.dtype == torch.float16)


# decode_layer.c's structs, field for field
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


def decoder_layer(layer: DecoderLayer, step: DecodeStep, hidden: torch.Tensor, residual: torch.Tensor | None):
    """(hidden_out, residual_out) of one decoder layer; hidden [T, H] float32 contiguous."""
    hidden_out, residual_out = torch.empty_like(hidden), torch.empty_like(hidden)
    kernels().decoder_layer(ctypes.byref(layer), ctypes.byref(step), hidden.data_ptr(),
                            None if residual is None else residual.data_ptr(), hidden_out.data_ptr(),
                            residual_out.data_ptr(), torch.get_num_threads())
    return hidden_out, residual_out
