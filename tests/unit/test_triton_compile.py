"""Why: without a GPU the kernel tests run in Triton's interpreter, which checks numerics but not what the GPU
compiler rejects (tl.dot shapes / precision, constexpr misuse, shared-memory overflow). This compiles every Ember
kernel ahead of time for an H100 (sm_90, through ptxas; no GPU needed) at the engine's own launch configs."""
# How: a worker process (this file run as a script) imports triton and ember.ops with TRITON_INTERPRET unset: in
# this process it is set (tests/conftest.py), so every @triton.jit here is interpreted, triton's own tl.sum /
# tl.cdiv included. For each config the worker calls the engine's host wrapper (unified_attention, rms_norm, ...)
# on "meta" tensors (shapes, no data) with the kernel swapped for a recorder, so launch arguments, constexprs and
# num_warps come from the engine's own code; it specializes them as a real launch would and runs triton.compile.
import json
import os
import select
import subprocess
import sys
import traceback

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402

H100_SHARED_PER_BLOCK = 227 * 1024  # bytes of shared memory one block may opt into on sm_90
BLOCK_SIZE = 16  # CacheConfig.block_size: tokens per KV block
REPLY_TIMEOUT_S = 300  # one compile; the worker's start (torch + triton imports) included

# ================================= worker side: runs with TRITON_INTERPRET unset =================================


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _launches(module, names, host_call):
    """{kernel name: recorder} of the launches `host_call()` makes of module's kernels `names`."""
    originals = {name: getattr(module, name) for name in names}
    recorders = {name: _Recorder(kernel) for name, kernel in originals.items()}
    try:
        for name, recorder in recorders.items():
            setattr(module, name, recorder)
        host_call()
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
    return recorders


def _compile(recorder) -> dict:
    """triton.compile of a recorded launch for sm_90, specialized as the JIT launcher would specialize it
    (int 1 -> constexpr, pointers and 16-divisible ints -> tt.divisibility 16)."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, native_specialize_impl

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kernel = recorder.kernel
    assert isinstance(kernel, JITFunction), f"{kernel!r} is not a JITFunction (TRITON_INTERPRET set?)"
    (args, kwargs), = recorder.launches
    params = inspect.signature(kernel.fn).parameters
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in params}  # num_warps, num_stages
    signature, constexprs, attrs, declared = {}, {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = declared[param.name] = value
            continue
        ty, spec = native_specialize_impl(backend, value, param.is_const, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":  # an int equal to 1, or None
            constexprs[param.name] = value
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
    return dict(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                num_warps_requested=options.get("num_warps", 4), cubin_bytes=len(compiled.asm.get("cubin", b"")),
                constexprs=declared, signature=signature)


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q, k, v as LlamaAttention makes them: views of the fused qkv projection's output."""
    qkv = _meta(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


def _attention(dtype, head_dim, num_heads, num_kv_heads, max_query_len, num_seqs, max_context, kernel):
    from ember.ops import triton_attention

    dtype = getattr(torch, dtype)
    q, _, _ = _qkv(max_query_len * num_seqs, num_heads, num_kv_heads, head_dim, dtype)
    kv_cache = _meta(2, num_seqs * max_context // BLOCK_SIZE, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype)
    query_start_loc, seq_lens = _meta(num_seqs + 1, dtype=torch.int32), _meta(num_seqs, dtype=torch.int32)
    block_table = _meta(num_seqs, max_context // BLOCK_SIZE, dtype=torch.int32)
    launches = _launches(triton_attention, ("_attention_kernel", "_reduce_splits_kernel"), lambda: (
        triton_attention.unified_attention(q, kv_cache[0], kv_cache[1], torch.empty_like(q), query_start_loc,
                                           seq_lens, block_table, max_query_len, head_dim ** -0.5)))
    return _compile(launches[kernel])


def _rms_norm(dtype, shape, residual, per_head=False):
    from ember.ops import triton_norm

    dtype = getattr(torch, dtype)
    x = _qkv(shape[0], shape[1], 8, shape[2], dtype)[0] if per_head else _meta(*shape, dtype=dtype)
    weight = _meta(shape[-1], dtype=dtype)
    launches = _launches(triton_norm, ("_rms_norm_kernel",), lambda: (
        triton_norm.fused_add_rms_norm(x, _meta(*shape, dtype=dtype), weight, 1e-5) if residual
        else triton_norm.rms_norm(x, weight, 1e-5)))
    return _compile(launches["_rms_norm_kernel"])


def _rotary(dtype, head_dim, num_heads, num_kv_heads):
    from ember.ops import triton_rotary

    q, k, _ = _qkv(7, num_heads, num_kv_heads, head_dim, getattr(torch, dtype))
    cache = _meta(8192, head_dim // 2, dtype=torch.float32)  # RotaryEmbedding's float32 cos / sin caches
    launches = _launches(triton_rotary, ("_rotary_kernel",), lambda: (
        triton_rotary.rotary(_meta(7, dtype=torch.int64), q, k, cache, cache)))
    return _compile(launches["_rotary_kernel"])


def _silu_and_mul(dtype, d):
    from ember.ops import triton_activation

    x = _meta(7, 2 * d, dtype=getattr(torch, dtype))
    launches = _launches(triton_activation, ("_silu_and_mul_kernel",), lambda: triton_activation.silu_and_mul(x))
    return _compile(launches["_silu_and_mul_kernel"])


def _int8_linear(dtype, m, n, k, bias):
    from ember.ops import triton_linear

    dtype = getattr(torch, dtype)
    weight = triton_linear.TritonInt8Weight(_meta(n, k, dtype=dtype))
    launches = _launches(triton_linear, ("_int8_linear_kernel",), lambda: (
        weight.linear(_meta(m, k, dtype=dtype), _meta(n, dtype=dtype) if bias else None)))
    result = _compile(launches["_int8_linear_kernel"])
    result["config"] = triton_linear._config(m, n)
    return result


WORKER_JOBS = {f.__name__.lstrip("_"): f for f in (_attention, _rms_norm, _rotary, _silu_and_mul, _int8_linear)}


def _serve():
    """One JSON request a line on stdin -> one JSON reply a line on the original stdout (everything else that
    writes to stdout, ptxas included, goes to stderr)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    assert not triton.knobs.runtime.interpret
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"result": WORKER_JOBS[request["job"]](**request["params"])}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
            reply = {"error": "".join(traceback.format_exception(e, limit=-3)),
                     "summary": "".join(traceback.format_exception_only(e)).strip()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# ================================= test side: runs under pytest (TRITON_INTERPRET=1) =================================


class _Worker:
    def __init__(self, tmp_dir):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_dir / "triton-cache")  # a real compile, never a warm cache's hit
        self.log_path = tmp_dir / "worker.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, bufsize=1)

    def run(self, job, **params) -> dict:
        """The worker's result for one compile; the test fails with the compiler's error if there is one."""
        if self.proc.poll() is not None:
            pytest.fail(f"compile worker exited ({self.proc.returncode}):\n{self._log_tail()}")
        self.proc.stdin.write(json.dumps({"job": job, "params": params}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            pytest.fail(f"no reply from the compile worker for {job} {params}:\n{self._log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            pytest.fail(f"{job} {params} does not compile for sm_90: {reply['summary']}\n\n{reply['error']}",
                        pytrace=False)
        result = reply["result"]
        assert result["cubin_bytes"] > 0, "no cubin: ptxas did not run"
        assert result["num_warps"] == result["num_warps_requested"], result
        assert result["shared"] <= H100_SHARED_PER_BLOCK, f"{result['shared']} B of shared memory per block"
        return result

    def _log_tail(self):
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no CUDA backend")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90).version  # runs `ptxas --version`
    except Exception as e:  # noqa: BLE001 - no usable ptxas: nothing can be compiled here
        pytest.skip(f"ptxas unavailable in this triton build: {e}")
    try:  # the launch specialization is Triton-internal (written against 3.9): another version skips, not fails
        from triton.runtime.jit import native_specialize_impl  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton {triton.__version__} lacks the internals this test specializes with: {e}")
    worker = _Worker(tmp_path_factory.mktemp("triton-sm90"))
    yield worker
    worker.close()


# ---- attention ----

LLAMA3_8B = (32, 8)  # (num_heads, num_kv_heads): group 4
SMOLLM2_360M = (15, 5)  # group 3
# mode: ((max_query_len, num_seqs, max_context), the BLOCK_M and NUM_SPLITS unified_attention should pick)
MODES = {
    "prefill": ((300, 2, 512), 64, 1),
    "decode": ((1, 4, 128), 16, 1),  # short contexts: too few keys to split
    "decode_split": ((1, 1, 4096), 16, 32),  # one long context: flash decoding, then the reduce kernel
}
# bfloat16: every head_dim x group; float32 (the slowest to compile): the two real models' shapes only
ATTENTION = [
    (dtype, head_dim, heads, mode) for dtype in ("bfloat16", "float32") for head_dim in (64, 128)
    for heads in (LLAMA3_8B, SMOLLM2_360M) for mode in MODES
    if dtype == "bfloat16" or (head_dim, heads) in ((128, LLAMA3_8B), (64, SMOLLM2_360M))
] + [("float16", 128, LLAMA3_8B, mode) for mode in MODES] + [("bfloat16", 80, LLAMA3_8B, mode) for mode in MODES]


@pytest.mark.parametrize("dtype,head_dim,heads,mode", ATTENTION,
                         ids=[f"{d}-hd{hd}-{h}q{kv}kv-{m}" for d, hd, (h, kv), m in ATTENTION])
def test_attention_kernel(compiler, dtype, head_dim, heads, mode):
    shape, block_m, num_splits = MODES[mode]
    result = compiler.run("attention", dtype=dtype, head_dim=head_dim, num_heads=heads[0], num_kv_heads=heads[1],
                          max_query_len=shape[0], num_seqs=shape[1], max_context=shape[2],
                          kernel="_attention_kernel")
    c = result["constexprs"]
    assert (c["BLOCK_M"], c["NUM_SPLITS"], c["GROUP"], c["BLOCK_SIZE"]) == (
        block_m, num_splits, heads[0] // heads[1], BLOCK_SIZE), c
    assert (c["HEAD_DIM"], c["HEAD_DIM_PAD"], c["UPCAST_DOT"]) == (head_dim, triton.next_power_of_2(head_dim),
                                                                   False), c


REDUCE = [("bfloat16", 128), ("bfloat16", 64), ("bfloat16", 80), ("float32", 128), ("float32", 64),
          ("float16", 128)]


@pytest.mark.parametrize("dtype,head_dim", REDUCE, ids=[f"{d}-hd{hd}" for d, hd in REDUCE])
def test_reduce_splits_kernel(compiler, dtype, head_dim):
    (max_query_len, num_seqs, max_context), _, _ = MODES["decode_split"]
    result = compiler.run("attention", dtype=dtype, head_dim=head_dim, num_heads=32, num_kv_heads=8,
                          max_query_len=max_query_len, num_seqs=num_seqs, max_context=max_context,
                          kernel="_reduce_splits_kernel")
    c = result["constexprs"]
    assert (c["NUM_SPLITS"], c["HEAD_DIM_PAD"]) == (32, triton.next_power_of_2(head_dim)), c


# ---- rms norm ----

NORM = [(d, hidden, residual) for d in ("bfloat16", "float32") for hidden in (4096, 960) for residual in (False, True)]


@pytest.mark.parametrize("dtype,hidden,residual", NORM,
                         ids=[f"{d}-h{h}-{'residual' if r else 'plain'}" for d, h, r in NORM])
def test_rms_norm_kernel(compiler, dtype, hidden, residual):
    result = compiler.run("rms_norm", dtype=dtype, shape=[7, hidden], residual=residual)
    c = result["constexprs"]
    assert (c["BLOCK"], c["HAS_RESIDUAL"]) == (triton.next_power_of_2(hidden), residual), c


def test_rms_norm_kernel_per_head(compiler):
    """Qwen3's q/k norm: RMSNorm over each head of a view of the fused qkv output."""
    result = compiler.run("rms_norm", dtype="bfloat16", shape=[7, 32, 128], residual=False, per_head=True)
    assert result["constexprs"]["BLOCK"] == 128


# ---- rotary ----

ROTARY = [(head_dim, heads) for head_dim in (128, 64) for heads in (LLAMA3_8B, SMOLLM2_360M)]


@pytest.mark.parametrize("head_dim,heads", ROTARY, ids=[f"bfloat16-hd{hd}-{h}q{kv}kv" for hd, (h, kv) in ROTARY])
def test_rotary_kernel(compiler, head_dim, heads):
    result = compiler.run("rotary", dtype="bfloat16", head_dim=head_dim, num_heads=heads[0], num_kv_heads=heads[1])
    c = result["constexprs"]
    assert (c["HALF"], c["BLOCK_Q_HEADS"], c["BLOCK_K_HEADS"]) == (
        head_dim // 2, triton.next_power_of_2(heads[0]), triton.next_power_of_2(heads[1])), c


# ---- silu_and_mul ----


def test_silu_and_mul_kernel(compiler):
    result = compiler.run("silu_and_mul", dtype="bfloat16", d=14336)  # Llama-3-8B's intermediate size
    assert result["constexprs"]["BLOCK"] == 1024


# ---- int8 linear ----

# _config's three regimes (decode, short, prefill) for the qkv / o (N 4096) and gate_up (N 2 * 14336) shapes
LINEAR = [("bfloat16", m, n, bias) for m in (1, 32, 512) for n in (4096, 14336 * 2) for bias in (False, True)] + [
    ("float32", m, 4096, False) for m in (1, 32, 512)]


@pytest.mark.parametrize("dtype,m,n,bias", LINEAR,
                         ids=[f"{d}-M{m}-N{n}-K4096-{'bias' if b else 'nobias'}" for d, m, n, b in LINEAR])
def test_int8_linear_kernel(compiler, dtype, m, n, bias):
    result = compiler.run("int8_linear", dtype=dtype, m=m, n=n, k=4096, bias=bias)
    c, config = result["constexprs"], result["config"]
    assert {k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")} == {
        k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    assert result["num_warps"] == config["num_warps"]
    assert (c["HAS_BIAS"], c["DOT_IN_FP32"]) == (bias, False), c


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
