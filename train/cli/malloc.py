"""Keep glibc from handing the training step's memory back to the kernel after every step (Linux, glibc only).

A CPU training step allocates and frees the same activation and gradient buffers every step. glibc's malloc serves a
request above M_MMAP_THRESHOLD with a fresh mmap that is unmapped again at free, and returns the free space at the top
of its heap to the kernel once it exceeds M_TRIM_THRESHOLD. Both start at 128 KiB and grow only as freed chunks teach
glibc larger sizes (at most 32 MiB / 64 MiB: the "dynamic threshold" of glibc's malloc.c), so whenever a step's freed
memory tops the trim threshold, the next step touches fresh pages again: a page fault and a zeroed 4 KiB page each
(the measured fault counts per step are in benchmarks/RESULTS.md).

`tune_glibc_malloc()` sets M_MMAP_THRESHOLD = 32 MiB (the largest value glibc's dynamic rule reaches on 64-bit,
DEFAULT_MMAP_THRESHOLD_MAX) and turns heap trimming off (M_TRIM_THRESHOLD = -1, mallopt(3)): the heap stays at the
largest size a step needed, the way torch's CUDA caching allocator keeps device memory, so steady-state RSS is the
step's peak, which the process reaches every step anyway. Requests of 32 MiB and more are still mmapped and returned at free, so a large
model's logits do not stay resident between steps.

Why by hand: the usual remedy is a different allocator (jemalloc / tcmalloc through LD_PRELOAD, as torch's
`torch.backends.xeon.run_cpu` launcher does), which no pip package installs and which must be set before the process
starts. glibc's own `mallopt(3)` does the job from inside the process in two calls. A user's own allocator settings
win: with any MALLOC_* variable (glibc's MALLOC_*_ settings, jemalloc's MALLOC_CONF), a `glibc.malloc.` tunable in
GLIBC_TUNABLES, or an allocator in LD_PRELOAD, nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger requests stay mmapped, returned at free
TRIM_THRESHOLD = -1  # mallopt(3): "-1 disables trimming completely"


def user_allocator_settings(env: Mapping[str, str] = os.environ) -> str | None:
    """The first allocator setting the user made in `env` (a variable's name), else None."""
    for name in env:
        if name.startswith("MALLOC_"):  # glibc's MALLOC_*_ (thresholds, arenas, checks), jemalloc's MALLOC_CONF
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "malloc" in env.get("LD_PRELOAD", ""):  # libjemalloc, libtcmalloc, libmimalloc
        return "LD_PRELOAD"
    return None


def is_glibc() -> bool:
    """True when this process runs on GNU libc (Linux). `os.confstr` names it; musl knows the name but raises."""
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (OSError, ValueError):
        return False


def tune_glibc_malloc() -> bool:
    """Fix glibc's mmap threshold at 32 MiB and turn heap trimming off (see the module docstring); True if set.

    Does nothing (False) off Linux, under another C library, or when the user set allocator options of their own
    (`user_allocator_settings`). Process-wide and permanent for the process: call it from an entry point
    (train/run.py), not from library code. Never raises.
    """
    if not is_glibc() or user_allocator_settings() is not None:
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                            TRIM_THRESHOLD))
    except (OSError, AttributeError):  # no mallopt symbol
        return False
