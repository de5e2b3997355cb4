"""Memory sizes from the command line, and the peak host/device memory of each stage for the log.

Host peaks are the kernel's high-water mark of the resident set (``VmHWM``), reset at the start of each
stage through ``/proc/self/clear_refs`` where the kernel allows it (otherwise the figure is the peak since
the process started, and the log says so). Device peaks are ``torch.cuda.max_memory_allocated``.

Resetting ``VmHWM`` hides earlier peaks from anyone who reads it later (a benchmark measuring the whole
process): ``process_peak_rss`` is the process's true high-water mark, the reset ones included.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

from LLMPruner.options import parse_memory  # noqa: E402,F401  (re-exported)


def host_rss(kind: str = "VmRSS") -> int:
    """Resident set (``VmRSS``) or its peak (``VmHWM``) of this process, in bytes (0 if unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(kind + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


#: The highest ``VmHWM`` seen just before a reset (0 until the first one).
_PEAK_BEFORE_RESETS = 0


def process_peak_rss() -> int:
    """Peak resident set of the whole process so far, in bytes: ``VmHWM``, or the highest value it had
    before ``stage`` reset it, whichever is larger (0 if unknown)."""
    return max(_PEAK_BEFORE_RESETS, host_rss("VmHWM"))


def _reset_host_peak() -> bool:
    global _PEAK_BEFORE_RESETS
    _PEAK_BEFORE_RESETS = process_peak_rss()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def stage(name: str, device: torch.device | str, peaks: dict | None = None):
    """Log wall time, peak host RSS and peak device memory of the block; store them in ``peaks``."""
    device = torch.device(device)
    reset = _reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        host = host_rss("VmHWM")
        dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        record = {"seconds": round(time.perf_counter() - t0, 2), "peak_host_rss_mb": round(host / 2**20, 1),
                  "peak_device_mb": None if dev is None else round(dev / 2**20, 1)}
        if peaks is not None:
            peaks[name] = record
        logger.info("stage %-22s %7.2f s, peak host RSS %8.1f MB%s, peak device %s", name, record["seconds"],
                    record["peak_host_rss_mb"], "" if reset else " (since start)",
                    "n/a (cpu)" if dev is None else f"{record['peak_device_mb']:.1f} MB")


def return_freed_memory() -> bool:
    """Make glibc give freed blocks above 64 KiB back to the kernel at once (``mallopt(M_MMAP_THRESHOLD)``).

    glibc's default threshold grows with every large block freed, after which layer-sized tensors come
    from the heap and the heap's high-water mark stays in the resident set: streaming 30 layers would
    then cost the host memory of several. Process-wide; a no-op off glibc. Returns whether it applied."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
