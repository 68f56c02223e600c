"""Keep the C allocator from returning and re-faulting working memory.

Each call of a layer allocates and frees the same few megabytes of stacked
arrays many times (one set per Newton step and chunk). With glibc's default
settings, blocks of this size are mapped fresh from the kernel and unmapped
on release, so every step pays page faults on memory it just gave back; on
virtual machines that roughly doubles the time of the refinement. Raising
glibc's mmap and trim thresholds keeps such blocks in the heap for reuse.

This changes a process-wide setting: at most ``_TRIM`` bytes of freed
memory per heap may stay with the process instead of going back to the
system. Set the environment variable ``OPTLAYER_MALLOC_TUNING=0`` before
importing optlayer to keep the allocator's defaults. Other C libraries
(musl, macOS, Windows) are left alone.
"""

import ctypes
import ctypes.util
import os
import platform

_MB = 1 << 20
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap rather than fresh mappings.
_MMAP = 32 * _MB
# Free memory at the top of a heap is returned to the system above this.
_TRIM = 128 * _MB
# Extra memory requested whenever a heap grows.
_TOP_PAD = 16 * _MB


def tune():
    """Apply the settings once; return True if they were applied."""
    setting = os.environ.get("OPTLAYER_MALLOC_TUNING", "1").strip().lower()
    if setting in ("0", "no", "false", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, _TRIM) == 1
    ok &= mallopt(_M_TOP_PAD, _TOP_PAD) == 1
    return bool(ok)


MALLOC_TUNED = tune()
