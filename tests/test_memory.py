"""utils.layerwise.fix_mmap_threshold: why a streamed walk's peak no longer grows with the depth."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20

# in a fresh process (mallopt is process-wide): free one 24 MiB block (glibc raises its mmap threshold
# to its size: it does so up to 32 MiB), then touch 16 blocks of 16 MiB and free every other one; print how
# much resident memory the 8 kept blocks and the 8 freed ones left
CHILD = """
import sys
sys.path.insert(0, {root!r})
import torch
from utils.layerwise import fix_mmap_threshold

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))

if {fixed!r}:
    assert fix_mmap_threshold()
big = torch.ones(24 * 2 ** 20 // 4)
del big
before = rss()
blocks = [torch.ones(16 * 2 ** 20 // 4) for _ in range(16)]
kept = blocks[1::2]
del blocks
print(rss() - before)
"""


def resident_after_freeing(fixed: bool) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, fixed=fixed)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_fixed_mmap_threshold_returns_freed_blocks_to_the_system():
    default, fixed = resident_after_freeing(False), resident_after_freeing(True)
    # default: the freed 16 MiB blocks are holes in the heap and stay resident (about 256 MiB in all)
    assert default > 224 * MIB, default / MIB
    # fixed: each block was mmapped and the freed ones unmapped; the 8 kept ones are what is left
    assert 120 * MIB < fixed < 144 * MIB, fixed / MIB
