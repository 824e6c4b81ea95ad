"""Device resolution and mixed precision (slab.core.device), shared by training and inference."""
import pytest
import torch

import slab.pipeline.inference.forward
import slab.pipeline.training.engine
import slab.pipeline.training.loop
import slab.core.device
from slab.core.device import amp_dtype, autocast, cpu_supports_bf16, resolve_device
from slab.core.errors import SlabError


def test_resolve_device():
    default = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == default and resolve_device("auto").type == default
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", "meta", 3.5):
        with pytest.raises(SlabError, match="^--device: expected cpu, cuda, cuda:N or mps"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_one_line_error():
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(SlabError, match=r"^--device cuda: CUDA is not available on this machine$"):
            resolve_device(device)


def test_amp_only_on_cuda():
    assert amp_dtype(torch.device("cpu"), True) is None
    assert amp_dtype(torch.device("cpu"), False) is None
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert amp_dtype(torch.device("cuda"), True) == expected
        assert amp_dtype(torch.device("cuda"), False) is None


def test_mps_where_available():
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        assert resolve_device("mps").type == "mps" and amp_dtype(resolve_device("mps"), True) is None
    else:
        with pytest.raises(SlabError, match=r"^--device mps: MPS \(Apple GPU\) is not available on this machine$"):
            resolve_device("mps")


def test_precisions(monkeypatch):
    cpu = torch.device("cpu")
    for value in (False, None, "fp32", True, "auto"):
        assert amp_dtype(cpu, value) is None  # float32 on a CPU unless bf16 is asked for
    assert isinstance(cpu_supports_bf16(), bool)
    monkeypatch.setattr(slab.core.device, "cpu_supports_bf16", lambda: True)
    assert amp_dtype(cpu, "bf16") == torch.bfloat16
    monkeypatch.setattr(slab.core.device, "cpu_supports_bf16", lambda: False)
    with pytest.raises(SlabError, match="^--precision bf16: this CPU has no bfloat16 instructions"):
        amp_dtype(cpu, "bf16")
    with pytest.raises(SlabError, match="^--precision fp16: CUDA only"):
        amp_dtype(cpu, "fp16")
    for bad in ("half", "bfloat16", 1.5):
        with pytest.raises(SlabError, match="^precision: expected auto, fp32, bf16 or fp16"):
            amp_dtype(cpu, bad)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bfloat16 instructions")
def test_cpu_bf16_autocast_computes_in_bfloat16():
    cpu = torch.device("cpu")
    a = torch.rand(16, 16)
    with autocast(cpu, amp_dtype(cpu, "bf16")):
        y = a @ a
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), a @ a, rtol=2e-2, atol=5e-2)


def test_autocast_is_a_no_op_without_a_dtype():
    a = torch.rand(4, 4)
    with autocast(torch.device("cpu"), amp_dtype(torch.device("cpu"), True)):
        assert not torch.is_autocast_enabled("cpu")
        y = a @ a
    assert y.dtype == torch.float32 and torch.equal(y, a @ a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_on_cuda_computes_in_the_amp_dtype():
    device = torch.device("cuda")
    dtype = amp_dtype(device, True)
    a = torch.rand(8, 8, device=device)
    with autocast(device, dtype):
        y = a @ a
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), a @ a, rtol=2e-2, atol=2e-2)


def test_one_implementation():
    """Training and inference use these very functions, not copies."""
    assert slab.pipeline.training.loop.resolve_device is slab.pipeline.inference.forward.resolve_device is resolve_device
    for module in (slab.pipeline.training.engine, slab.pipeline.inference.forward):
        assert module.amp_dtype is amp_dtype and module.autocast is autocast


def test_threads_option_and_default_do_not_oversubscribe():
    from slab.core.device import available_cores, configure_threads, default_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        n = default_threads()
        assert 1 <= n <= available_cores()
        assert default_threads(workers=available_cores()) == 1  # workers share the cores
    finally:
        torch.set_num_threads(before)


def test_allocator_setup_applies_on_glibc_and_can_be_turned_off():
    import subprocess
    import sys

    code = "from slab.core.device import configure_allocator; print(configure_allocator())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "SLAB_MALLOC": "default"}).stdout.strip()
    import platform

    assert off == "False"
    assert on == ("True" if platform.libc_ver()[0] == "glibc" else on)
