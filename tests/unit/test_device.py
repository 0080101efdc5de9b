"""Device, dtype and quantization selection ("auto" and explicit), and the CLI's clean error for a bad choice."""
import pytest
import torch

from ember.cli import main
from ember.config import CacheConfig, ModelConfig
from ember.runner.device import resolve_device, resolve_dtype, resolve_kv_cache_dtype, resolve_quantization

HAS_CUDA = torch.cuda.is_available()
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_follows_what_torch_sees():
    assert resolve_device("auto") == (torch.device("cuda") if HAS_CUDA else CPU)
    assert resolve_device("cpu") == CPU
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", CUDA) == torch.bfloat16
    assert resolve_dtype("float16", CUDA) == torch.float16


def test_quantization_by_device_and_checkpoint():
    assert resolve_quantization("auto", True, CPU) == "int4"
    assert resolve_quantization("auto", True, CUDA) == "int8"
    assert resolve_quantization("auto", False, CUDA) is None
    assert resolve_quantization("none", True, CPU) is None
    assert resolve_quantization("int8", False, CPU) == "int8"
    with pytest.raises(ValueError, match="int4 runs on the CPU only"):
        resolve_quantization("int4", False, CUDA)


def test_kv_cache_dtype_by_path():
    assert resolve_kv_cache_dtype("auto", torch.float32, quantized_c_kernels=True) == torch.float16
    assert resolve_kv_cache_dtype("auto", torch.float32, quantized_c_kernels=False) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, quantized_c_kernels=False) == torch.bfloat16
    assert resolve_kv_cache_dtype("float32", torch.float32, quantized_c_kernels=True) == torch.float32
    assert resolve_kv_cache_dtype("float16", torch.float32, quantized_c_kernels=False) == torch.float16
    with pytest.raises(ValueError, match="needs float32 activations"):
        resolve_kv_cache_dtype("float16", torch.bfloat16, quantized_c_kernels=False)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="use --device cpu"):
        resolve_device("cuda")
    assert main(["complete", "Hi", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember: error: --device cuda:") and "Traceback" not in err


def test_config_rejects_unknown_values(capsys):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        ModelConfig(device="tpu")
    with pytest.raises(ValueError, match="quantize must be"):
        ModelConfig(quantize="int5")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, float32 or float16"):
        CacheConfig(kv_cache_dtype="fp8")
    ModelConfig(device="cuda:1")  # valid whether or not that GPU exists (checked when the engine starts)
    assert main(["complete", "Hi", "/no/such/model.gguf"]) == 2
    assert "/no/such/model.gguf" in capsys.readouterr().err
