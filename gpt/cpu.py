"""How a run uses the CPU it trains on: how many threads, and memory kept from one step to the next.

    threads = use_cpu(processes=1)   # once, at start-up: sets torch's threads, keeps freed memory

Threads. PyTorch starts one thread per core it may run on (os.sched_getaffinity: `taskset` and
container cpusets shrink it), but it does not look at a container's CPU quota (`docker --cpus 2`
on a 64-core host still gives 64 threads, each of which then waits for its share). Here a run
takes the cores it may use, capped by the quota and shared between the processes of one machine
(torchrun). An OMP_NUM_THREADS set by the user, or by torchrun, wins.

Memory. Every training step allocates the same activation buffers and frees them again. glibc's
malloc returns large freed blocks to the operating system (blocks from mmap at once; the top of
the heap once more than M_TRIM_THRESHOLD is free), so the next step gets fresh pages, and the
kernel zeroes and maps each one at its first touch: tens of thousands of page faults a second,
which on some virtual machines took half of the CPU time of a step. `keep_freed_memory` tells
malloc to serve blocks up to 32 MiB (its largest mmap threshold) from the heap and never to trim
it, so a step's memory is reused by the next step. The process keeps its peak memory, which a
training run needs again at every step anyway.
"""

import ctypes
import math
import os
from pathlib import Path

import torch

# mallopt(3) parameters of glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LARGEST_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses more on 64-bit machines (HEAP_MAX_SIZE / 2)
NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: free memory is kept
CGROUP = Path("/sys/fs/cgroup")  # where Linux shows this process's cgroup (a test points it elsewhere)


def use_cpu(processes: int = 1) -> int:
    """Set torch's thread count for one of `processes` training processes on this machine, and keep
    freed memory for reuse; returns the thread count."""
    threads = training_threads(processes)
    torch.set_num_threads(threads)
    keep_freed_memory()
    return threads


def training_threads(processes: int = 1) -> int:
    """OMP_NUM_THREADS if set, else this process's share of the usable cores (at least 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, usable_cores() // processes)


def usable_cores() -> int:
    """The cores this process may run on, capped by its cgroup's CPU quota (if any)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 cpu.max, or v1's cfs files);
    None without a quota."""
    root = CGROUP
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]  # "max 100000" or "200000 100000"
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        limit = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if limit <= 0 else limit / period
    except (OSError, ValueError):
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module docstring).
    False where the C library is not glibc (macOS, musl): nothing changes there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
