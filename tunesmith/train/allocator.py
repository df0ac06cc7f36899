"""The C allocator's setting for a training process: freed tensors go back to the operating system.

torch allocates CPU tensors with the C library's malloc. glibc serves a request above its mmap threshold with a
fresh mapping that `free` unmaps at once, and smaller ones from its heap, whose freed pages it keeps. The threshold
starts at 128 KiB but is dynamic: each time a mapped block is freed it rises to that block's size (up to 32 MiB),
so after the first training step nearly every activation ([tokens x hidden] float32: 1.8 MiB at 512 tokens of
Qwen2.5-0.5B, 10 MiB for its MLP) comes from the heap, and the heap keeps the pages of every freed one, scattered
between live blocks, until the process ends. Measured on the SFT benchmark at Qwen's real vocabulary
(bench/RESULTS.md, issue #30): peak RSS 1.93 GiB with the dynamic threshold, 1.71 GiB fixed at 1 MiB. The price is
a page fault per 4 KiB of each fresh mapping (the zeroing of its pages), paid by the blocks of 1-32 MiB.

On a GPU the activations live in CUDA's caching allocator and this changes little; on other C libraries (macOS,
musl) nothing is set.
"""
from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3            # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20   # blocks from 1 MiB up are mapped and unmapped on free; setting it fixes it


def return_freed_tensors_to_the_os() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES (mallopt(M_MMAP_THRESHOLD), which also turns off its
    dynamic rise), so that every freed block of 1 MiB or more is returned to the OS at once. Returns True when set;
    False on a C library that is not glibc (nothing changed). Raises nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has mallopt with other semantics)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
