import platform
import subprocess
import sys

import pytest

PAGE_FAULTS_OF_REPEATED_STEPS = """
import resource, sys, torch
from brainvq.runtime import reuse_freed_memory
if sys.argv[1] == "keep":
    assert reuse_freed_memory()

def page_faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.ones(megabytes * 2**20 // 4) for megabytes in (32, 64, 16, 128, 8)]
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print([page_faults_of_a_step() for _ in range(6)][-1])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_a_steps_freed_memory_is_reused_instead_of_page_faulted_in_again():
    def faults_of_the_sixth_step(mode: str) -> int:
        completed = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_REPEATED_STEPS, mode],
                                   capture_output=True, text=True, check=True)
        return int(completed.stdout)

    # 248 MB of 4 kB pages: glibc unmaps the blocks of over 32 MB on free, and they fault in again every step.
    default = faults_of_the_sixth_step("default")
    if default < 30_000:
        pytest.skip(f"{default} page faults with glibc's defaults: this kernel backs the blocks with huge pages")
    assert faults_of_the_sixth_step("keep") < 1_000


def test_devices_by_name_number_and_kind(monkeypatch):
    import torch

    from brainvq.errors import ConfigError
    from brainvq.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no Apple GPU"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU"):
        with pytest.raises(ConfigError, match="'cuda:N'"):
            resolve_device(bad)


def test_tf32_off_turns_tf32_off_inside_and_restores_the_settings_after():
    import torch

    from brainvq.runtime import tf32_off

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with tf32_off():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def fresh_bf16_answer():
    """`cpu_bf16_is_faster` remembers its answer per process: forget it before and after a test that fakes it."""
    from brainvq import runtime

    runtime.cpu_bf16_is_faster.cache_clear()
    yield runtime
    runtime.cpu_bf16_is_faster.cache_clear()


def test_auto_precision_on_a_cpu_is_bf16_only_where_bf16_products_time_clearly_faster(monkeypatch, fresh_bf16_answer):
    import torch

    runtime = fresh_bf16_answer
    seconds = {}
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(runtime, "matmul_seconds", lambda dtype, **_: seconds[dtype])
    cpu = torch.device("cpu")
    # fp32 and bf16 seconds -> the choice: bf16 must be at least BF16_SPEED_MARGIN (1.25) x as fast.
    for fp32, bf16, expected in ((2.0, 1.0, "bf16"), (1.25, 1.0, "bf16"), (1.2, 1.0, "fp32"), (1.0, 1.9, "fp32")):
        seconds.update({torch.float32: fp32, torch.bfloat16: bf16})
        runtime.cpu_bf16_is_faster.cache_clear()
        assert runtime.resolve_precision("auto", cpu) == expected, (fp32, bf16)
    assert runtime.resolve_precision("fp32", cpu) == "fp32" and runtime.resolve_precision("bf16", cpu) == "bf16"

    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: False)  # emulated bf16: fp32, without timing anything
    monkeypatch.setattr(runtime, "matmul_seconds", lambda *args, **kwargs: pytest.fail("timed emulated bf16"))
    runtime.cpu_bf16_is_faster.cache_clear()
    assert runtime.resolve_precision("auto", cpu) == "fp32"


def test_timing_the_precisions_leaves_the_seeded_random_sequence_alone():
    import torch

    from brainvq.runtime import matmul_seconds

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert matmul_seconds(torch.bfloat16, size=16) > 0
    assert torch.equal(torch.rand(4), expected)
