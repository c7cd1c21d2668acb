"""How much of the machine a scoring run uses: decode workers, model threads and batch size, chosen in one place for
files, datasets and engines."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time

import torch

__all__ = ["choose_thread_counts", "default_batch_size", "prepare_worker", "runnable_elsewhere", "usable_cores"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def default_batch_size(device: torch.device | str) -> int:
    """
    Images per forward pass when none is given: 1 on a CPU, where a batch of one image is as fast per image as a larger
    one and pads nothing (images of different sizes are padded to a common size in a batch), 8 on an accelerator (CUDA,
    MPS), where batches keep the device busy.
    """
    return 1 if torch.device(device).type == "cpu" else 8


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def runnable_elsewhere(samples: int = 5, interval_s: float = 0.02) -> float:
    """
    How many processes besides this one are running or waiting for a core now: on Linux the mean of a few readings of
    the kernel's count of runnable tasks (`/proc/loadavg`, fourth field), which, unlike the load average, sees a
    process started a second ago; elsewhere the 1-minute load average.
    """
    try:
        readings = []
        for index in range(samples):
            if index:
                time.sleep(interval_s)
            with open("/proc/loadavg") as file:
                readings.append(int(file.read().split()[3].split("/")[0]) - 1)  # minus this process's thread
        return max(0.0, sum(readings) / len(readings))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def choose_thread_counts(cores: int | None = None, load: float | None = None) -> tuple[int, int]:
    """
    How many DataLoader workers decode files, and how many threads PyTorch uses for the model on a CPU.

    - **Workers:** one per core beside the model's, at most 4. A worker decodes with one thread (PyTorch sets one
      thread in its workers, and Pillow decodes in one), and one worker decodes about ten times as many photos per
      second as the model scores on the same core (`benchmarks/RESULTS.md`), so more would only compete for cores.
    - **Model threads:** the cores not already busy, at least 1: `cores - round(load)`. PyTorch's default, one thread
      per core, is right on an idle machine. With the cores busy, its threads wait at every operator for a thread
      that the kernel has descheduled, and scoring collapses (15 to 1.6 images/s on 2 cores with one competing
      process, in the issue that asked for this; `benchmarks/folder_scoring.py --competing-load` measures it).

    Args:
        cores: Usable cores (default: `usable_cores()`).
        load: Processes besides this one that want a core (default: `runnable_elsewhere()`).

    Returns:
        `(num_workers, num_threads)`.
    """
    cores = usable_cores() if cores is None else cores
    load = runnable_elsewhere() if load is None else load
    workers = min(4, max(0, cores - 1))
    threads = max(1, min(cores, cores - round(load)))
    return workers, threads


def prepare_worker(parent_pid: int | None = None) -> None:
    """
    Sets up a decode worker process (a DataLoader worker, a process-pool worker) of a scoring run:

    - **Ctrl-C** reaches the whole process group; the main process answers it (one line, the results kept) and shuts
      the workers down. A worker that answered it itself would print a traceback mid-transfer.
    - **Orphans.** On Linux, the kernel kills the worker when the process that started it dies (`prctl`'s
      `PR_SET_PDEATHSIG`), so that a killed run (SIGKILL, out of memory) leaves no worker holding its memory. A worker
      whose parent is already gone (`parent_pid` no longer its parent) exits at once.

    Args:
        parent_pid: The pid of the process that started the worker (`os.getpid()` there), for the check above.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
