"""keep_freed_memory: tensors of tens of MiB made and freed step after step reuse mapped pages
instead of being faulted in again (what a CPU training step does with its activations)."""

import subprocess
import sys

import pytest

# In a fresh process (the setting is process-wide): page faults of 3 steps after 6 of warm-up.
STEPS = """
import resource, sys, torch
from titan_lite.runtime.host_allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    a = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    b = torch.ones(12 * 2**20)
    return (a[: 12 * 2**20] + b).sum()
for _ in range(6):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_STEP = (64 + 48 + 48) * 2**20 // 4096


def _page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True,
                            text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    assert _page_faults("default") > 2.5 * PAGES_PER_STEP  # mmapped afresh every time
    # the heap's pages, reused (0 in most runs; heap fragmentation costs one 64 MiB block in
    # some)
    assert _page_faults("keep") < PAGES_PER_STEP
