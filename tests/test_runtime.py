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
