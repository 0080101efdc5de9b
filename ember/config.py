"""Frozen configuration dataclasses, one per component; each field's default is its CLI flag's default."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


# ember/ops/cpu_variants.py's variant names, best first (config is a leaf: the list is repeated, and a test checks it)
CPU_KERNEL_CHOICES = ("auto", "reference", "avx512_vnni", "avx512", "avx2_vnni", "avx2", "portable")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # GGUF file, Hugging Face folder or hub id; None: the embedded SmolLM2
    # activations and dense weights: auto | float32 | bfloat16 | float16; auto: float32 on a CPU, bfloat16 on a GPU
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's own context length
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto: cuda when PyTorch sees a GPU
    seed: int = 0
    # Weight-only copies: int4 (CPU, batches up to 16 rows), int8 (CPU: up to 16 rows; GPU: every batch);
    # auto: int4 on a CPU / int8 on a GPU when the GGUF file's weights are 4-bit or less
    quantize: str = "auto"  # auto | int4 | int8 | none
    # CPU int4 / int8 matmuls round activations to int8 per block of 32 inputs (llama.cpp's way; ~2x faster);
    # --no-int8-activations keeps float32 activations (exact against the dequantized weights)
    int8_activations: bool = True
    # The CPU kernel library: auto (the best variant built at install that this CPU runs), reference (PyTorch's
    # ops, the test oracle), or a variant: avx512_vnni | avx512 | avx2_vnni | avx2 | portable
    cpu_kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantize not in ("auto", "int4", "int8", "none"):
            raise ValueError(f"quantize must be auto, int4, int8 or none, got {self.quantize!r}")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.cpu_kernels not in CPU_KERNEL_CHOICES:
            raise ValueError(f"cpu_kernels must be one of {', '.join(CPU_KERNEL_CHOICES)}, got {self.cpu_kernels!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_gib: float = 1.0  # CPU: memory budget for the KV block pool
    # GPU: the share of the device's memory Ember may use; the KV pool gets what the weights and a
    # warm-up pass of the largest step leave of it
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # a fixed number of blocks instead of the memory budget (tests force preemption with it)
    enable_prefix_caching: bool = True
    # auto | float32 | float16. auto: float16 where the CPU path runs quantized weights on its C kernels (half the
    # bytes a decode step reads; llama.cpp's default cache type), else the model's dtype. float16: CPU only
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be positive, got {self.kv_cache_memory_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_dtype not in ("auto", "float32", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto, float32 or float16, got {self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


@dataclass(frozen=True)
class SpeculativeConfig:
    # none | ngram (prompt lookup: continue a match of the last tokens earlier in the sequence)
    # | draft (a smaller model of the same vocabulary proposes: --draft-model)
    speculative: str = "none"
    num_speculative_tokens: int = 4  # proposed per step and request
    prompt_lookup_min: int = 2  # ngram: shortest suffix of the sequence to look up
    prompt_lookup_max: int = 4  # ngram: longest (tried first)
    draft_model: str | None = None  # draft: GGUF file, HF folder or hub id

    def __post_init__(self) -> None:
        if self.speculative not in ("none", "ngram", "draft"):
            raise ValueError(f"speculative must be none, ngram or draft, got {self.speculative!r}")
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError("--speculative draft and --draft-model go together")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be positive, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculation: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    # A request's results do not depend on what else is in the batch (vLLM's batch-invariant mode):
    # every matmul runs at a fixed row count and attention per sequence. About 3x slower decode on a CPU.
    batch_invariant: bool = False
    enforce_eager: bool = False  # GPU: no CUDA graphs for decode steps (every step runs eagerly)

    @staticmethod
    def from_flat(**kwargs) -> "EngineConfig":
        """Builds the nested config from flat field names (as the CLI and LLM(**kwargs) give them)."""
        parts = {}
        for name, cls in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig),
                          ("speculation", SpeculativeConfig)):
            names = {f.name for f in fields(cls)}
            parts[name] = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        top = {f.name for f in fields(EngineConfig)} - set(parts)
        unknown = set(kwargs) - top
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        return EngineConfig(**parts, **kwargs)


def default_num_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the model's file or folder name
    max_queued_requests: int = 256  # waiting requests (n counts n times) beyond this get 503 with Retry-After
    drain_timeout: float = 30.0  # seconds in-flight requests may take to finish on SIGTERM before they are aborted
    # ---- access control
    api_key: tuple[str, ...] = ()  # repeatable; when set, every route but /health and the page needs one
    api_key_file: str | None = None  # more keys, one per line
    metrics_public: bool = False  # /metrics answers without a key
    allowed_origins: tuple[str, ...] = ()  # repeatable; browser origins allowed cross-site (CORS); "*": any
    # repeatable; Host names accepted besides IP addresses, localhost names and --host; "*": any (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()
    ssl_certfile: str | None = None  # with --ssl-keyfile: serve HTTPS
    ssl_keyfile: str | None = None
    # ---- bounds on one request
    max_request_body_bytes: int = 8 * 2**20  # larger bodies get 413
    max_n: int = 16  # n and best_of
    max_stop_strings: int = 16
    max_stop_string_length: int = 512  # characters
    max_grammar_bytes: int = 64 * 2**10  # a JSON schema, regex, choice list or grammar, as text
    grammar_compile_timeout: float = 30.0  # seconds; past it the request gets 400
    max_messages: int = 2048  # chat messages in one request
    max_stream_buffer: int = 1024  # outputs queued for a client that does not read; past it the request is aborted
    # Special-token text (e.g. "<|im_end|>") inside chat messages and editor code is plain text; True parses it
    # as control tokens, which lets the text of a message forge turns (prompt injection)
    parse_special_tokens_in_content: bool = False
    # ---- connections
    header_timeout: float = 10.0  # seconds a client may take to send its request line and headers
    body_timeout: float = 30.0  # seconds a client may pause while sending its body (408 after)
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1024  # open connections and requests at once; past it new ones get 503

    def __post_init__(self) -> None:
        for name in ("api_key", "allowed_origins", "allowed_hosts"):  # the CLI gives lists
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be positive, got {self.max_queued_requests}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be non-negative, got {self.drain_timeout}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        for name in ("max_request_body_bytes", "max_n", "max_stop_strings", "max_stop_string_length", "max_grammar_bytes",
                     "max_messages", "max_stream_buffer", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("grammar_compile_timeout", "header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if any(not key.strip() for key in self.api_key):
            raise ValueError("api_key must not be empty")

    def api_keys(self) -> tuple[str, ...]:
        """--api-key values and the lines of --api-key-file (read now: a wrong path is an error at start-up)."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            try:
                with open(self.api_key_file) as f:
                    keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
            except OSError as exc:
                raise FileNotFoundError(f"cannot read --api-key-file {self.api_key_file}: {exc.strerror}") from None
            if len(keys) == len(self.api_key):
                raise ValueError(f"--api-key-file {self.api_key_file} holds no key")
        return tuple(keys)
