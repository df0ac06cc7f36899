"""A training process returns freed tensors' memory to the OS (train/allocator.py): with glibc's dynamic mmap
threshold a freed 4 MiB activation's pages stay in the process; with the threshold fixed they do not."""
import subprocess
import sys

import pytest

from tunesmith.train.allocator import return_freed_tensors_to_the_os

CHILD = """
import sys
import torch
from tunesmith.train.allocator import return_freed_tensors_to_the_os
if sys.argv[1] == "fixed":
    assert return_freed_tensors_to_the_os()
def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
big = torch.ones(6 << 20)             # 24 MiB, mapped: freeing it raises the dynamic threshold to 24 MiB
del big
before = anon_mib()
blocks, live = [], []
for _ in range(64):                   # 64 x 4 MiB activations, each followed by a small tensor that stays alive,
    blocks.append(torch.ones(1 << 20))  # as a step's outputs and statistics do between its temporaries
    live.append(torch.ones(1024))
del blocks
print(anon_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not return_freed_tensors_to_the_os(),
                    reason="glibc only: other C libraries manage their heap otherwise")
def test_freed_activations_leave_the_process():
    def retained(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert retained("dynamic") > 200      # 256 MiB freed, most of it still held by the heap
    assert retained("fixed") < 16         # returned at once
