"""glibc's allocator policy for a training process on the CPU: give freed memory back.

glibc serves a large allocation with its own mmap and returns it to the system when freed,
but it raises that size threshold (up to 32 MiB) each time such a block is freed, and from
then on serves blocks up to it from heaps it keeps. Training on a CPU allocates and frees the
same large buffers every step (activations; bitsandbytes dequantizes every 4-bit weight into a
fresh buffer, forward and backward). With glibc's adaptive defaults a 0.5 B QLoRA run grew by
200-400 MiB a step and its peak resident memory was 1.8x that with the policy below; the fp32
run's 1.2x (bench/vla_quant_memory.py, BENCHMARKS.md "VLA quantization"). Fixing both
thresholds at 128 KiB (glibc's own starting value; what ``MALLOC_MMAP_THRESHOLD_=131072
MALLOC_TRIM_THRESHOLD_=131072`` does) keeps memory at what the tensors alive need.

It has a price: a freed block goes back and the next step faults it in again. Measured with
two processes side by side (December 2026): the bench's nf4 QLoRA step took 5% longer (14.07
vs 13.38 s) while its peak fell from 2,259 to 1,135 MiB; a small conv net with 10-40 MB
activations stepped 10-11% slower. So a CPU run applies it when it quantizes
(``quantization.enable``: the run asked to save memory), not otherwise.

A user's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` win: nothing is changed
then. Other C libraries (macOS, Windows, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc():
    """This process's glibc, or None when its C library is another one."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def configure(environ: Mapping[str, str] = os.environ) -> str:
    """Apply the policy to this process (see the module docstring); says what was done."""
    given = [v for v in USER_VARIABLES if environ.get(v, "").strip()]
    if given:
        return f"glibc allocator: {', '.join(given)} set by the user, left as is"
    libc = _glibc()
    if libc is None:
        return "allocator: not glibc, left as is"
    ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    if not ok:
        return "glibc allocator: mallopt refused the thresholds, left as is"
    return (f"glibc allocator: freed blocks of {THRESHOLD // 1024} KiB and more go back to the system "
            f"(mmap and trim thresholds fixed; set {USER_VARIABLES[0]} to choose otherwise)")
