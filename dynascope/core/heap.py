"""`heap_up_to`: glibc's malloc tuned so that a training step's large tensors are reused by the next step.

Above its mmap threshold (at most 32 MiB by default) glibc maps each allocation afresh, and the kernel faults its
pages in on first use. The demo's logits, [16, 128, 4096] fp32, are exactly 32 MiB: each training step's logits
and their gradients, and each probe batch's probabilities, were faulted in page by page (8,193 faults each). At
64 MiB (the default) the demo trains 25% faster for 82 MB more peak memory, to the same bytes (BENCHMARKS.md).
Processes of their own apply it: the `dynascope` executable, `python -m dynascope.cli`, and `analyze --workers`'s
workers.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def heap_up_to(mib: int = 64) -> bool:
    """Have glibc serve allocations of up to `mib` MiB from its heap, and keep twice that free there; whether it
    took. Not where the environment tunes malloc itself (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or
    GLIBC_TUNABLES naming glibc.malloc), off Linux, on another C library, or on glibc before 2.35, which caps the
    threshold at 32 MiB (there a fixed trim threshold alone would turn the dynamic mmap threshold off)."""
    if (not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; musl has none
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, mib << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * mib << 20))
