"""The thread-count comparison both scoring benchmarks print with `--competing-load`: a run with PyTorch's default of
one thread per core (the old rule) against one with `choose_thread_counts` (the cores not busy now; what `qualiclip
score` sets), timed alternately, first on the machine as found, then beside one CPU-bound process."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from qualiclip_hf.scoring.resources import choose_thread_counts, usable_cores


def _spin() -> None:
    while True:
        pass


def compare_thread_counts(images_per_second: Callable[[int, int, bool], float], repeats: int) -> None:
    """
    Prints the table of RESULTS.md's competing-load sections.

    Args:
        images_per_second: `(repeat, workers, competing) -> images/s` of one run at the current torch thread count
            (`workers`: the decode workers `choose_thread_counts` gives now).
        repeats: Runs of each thread count, alternately, so that a change in the machine's load hits both alike; the
            medians are compared.
    """
    cores = usable_cores()
    rows = []
    for competing in (False, True):
        hog = None
        if competing:
            hog = multiprocessing.Process(target=_spin, daemon=True)
            hog.start()
            time.sleep(1.0)
        try:
            workers, new_threads = choose_thread_counts()
            rates: dict[int, list[float]] = {cores: [], new_threads: []}
            for repeat in range(repeats):
                for threads in rates:
                    torch.set_num_threads(threads)
                    rates[threads].append(images_per_second(repeat, workers, competing))
            load = os.getloadavg()
        finally:
            if hog is not None:
                hog.terminate()
                hog.join()
        old, new = float(np.median(rates[cores])), float(np.median(rates[new_threads]))
        rows.append((competing, cores, old, new_threads, new, load))
    print("| machine | old: threads | img/s | new: threads | img/s | new / old | load average (1, 5, 15 min) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for competing, old_threads, old, new_threads, new, load in rows:
        machine = "with a competing CPU load" if competing else "as found"
        loads = ", ".join(f"{value:.2f}" for value in load)
        print(f"| {machine} | {old_threads} | {old:.1f} | {new_threads} | {new:.1f} | {new / old:.2f}x | {loads} |")
