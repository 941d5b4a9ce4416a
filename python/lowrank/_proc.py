"""This process's memory as the Linux kernel reports it (``/proc/self``): the resident size and its
high-water mark, a reset of that mark, and handing freed heap back first. Read by ``lowrank
finetune``'s peak memory, the benchmarks' fresh-process training steps and the leak test; where
``/proc`` is missing the readings are None and the reset says it could not."""

from __future__ import annotations

import ctypes
import gc
from typing import Optional


def status_kb(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``, ...), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Resets ``VmHWM`` to the resident size now (``/proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collects garbage and returns freed heap pages to the system (glibc's ``malloc_trim``), so the
    resident size reads what is still in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_mmap_threshold(nbytes: int = 64 << 10) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap, returned to the system when freed
    (glibc's ``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc from raising the threshold as large
    blocks are freed). The resident size then follows the memory in use instead of what the adaptive
    threshold happened to keep: a peak reading compares what two programs allocate, not their
    allocation histories. Costs page faults on every large allocation; for measuring processes only.
    False where it cannot be set."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
    except (OSError, AttributeError):
        return False
