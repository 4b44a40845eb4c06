"""Process and thread settings that let torch's CPU forward loops run at the hardware limit."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameter numbers (malloc.h).
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 1 << 30
_applied = False


def keep_freed_memory() -> bool:
    """Stop glibc handing freed activation memory back to the kernel between forward passes.

    By default every block above 128 KiB is mapped fresh from the kernel and unmapped when freed,
    so each forward pass page-faults its whole working set in again: measured here as 10-45 % of a
    CPU forward loop's time spent in the kernel. Serving all blocks from the heap (no mmap) with a
    1 GiB top pad keeps freed memory in the process for the next pass. RSS stays at the loop's
    peak working set, which the batch size bounds, instead of dropping between passes.
    Idempotent; returns False (and changes nothing) where the C library has no ``mallopt``.
    """
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other non-glibc C libraries
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TOP_PAD, _TOP_PAD_BYTES) == 1
    return _applied


def yield_to_the_model(nice: int) -> None:
    """Run the calling thread at nice ``nice`` (never at a higher priority than it has).

    For the threads that read, decode and store images, beside a model that computes on the same cores. At the
    model's own priority they take the cores from it while it runs: resnet18 Grad-CAM on 2 cores keeps ~1.8 of
    them busy, and host work of ~8 CPU-ms per image in the same process made each model call ~12 % slower. At
    nice 19 they run in the slots the model leaves idle, and still at full speed when it waits for them: the
    queue worker's Grad-CAM went from 0.81 to 0.91 of model-only (medians of 6 interleaved rounds). Not in
    ``salient run``, whose read-ahead is one group of batches deep: there it gave 0.92 against 0.95.
    Linux only: there a nice value is a thread's own, where elsewhere ``setpriority`` would lower the whole
    process, model included. The model's thread must be started by a thread that kept its priority: a new
    thread inherits its creator's."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):  # a sandbox that refuses setpriority: all threads stay equal, as before
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
