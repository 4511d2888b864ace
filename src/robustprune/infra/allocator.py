"""The allocator setting of the robustprune command (glibc's ``mallopt``; no torch import, so ``--help`` stays fast)."""
from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of handing it back to the OS at once; True where it applied.

    Bounds and certified training allocate and free tensors of tens of MB per step; with glibc's defaults every one
    is a fresh ``mmap`` whose pages the kernel faults in and zeroes again, which took a third of full CROWN's time
    (docs/benchmarks.md). Blocks up to 32 MiB then come from the heap, and up to 1 GiB of free heap is kept. The
    robustprune command sets this for its own process; a library import never changes the allocator. Elsewhere
    (macOS, musl) it does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter is linked with
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(mallopt(m_trim_threshold, 1 << 30))
