"""Measuring helpers shared by step 5 and the benchmarks: device sync and process memory (Linux)."""
from __future__ import annotations

import os
import resource

import torch


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work before a clock is read (no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Current resident memory of this process (/proc/self/statm)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
