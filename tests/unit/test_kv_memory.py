"""The KV pool's lazily zeroed tensors: zeros everywhere (attention reads never-written padding slots
behind a mask), writable, sharing one mapping per tensor."""
import torch

from ember.runner.memory import lazy_zeros, release_freed_memory, settle_heap


def test_lazy_zeros_are_zeros_and_writable():
    shape = (2, 7, 16, 3, 64)
    pool = lazy_zeros(shape, torch.float32)
    assert pool.shape == shape and pool.dtype == torch.float32 and pool.is_contiguous()
    assert torch.equal(pool, torch.zeros(shape))
    pool[1, 3].fill_(2.0)
    assert pool.sum().item() == 2.0 * 16 * 3 * 64
    assert lazy_zeros((4,), torch.bfloat16).tolist() == [0.0] * 4


def test_release_freed_memory_is_harmless():
    release_freed_memory()


def test_settle_heap_is_harmless():
    settle_heap()
    big = torch.ones(64 << 20 >> 2)  # 64 MiB, above the raised mmap threshold
    assert big.sum().item() == big.numel()
