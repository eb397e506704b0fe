"""Interleaved repeats, medians, peak memory: the measuring tools every benchmark shares."""
from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import threading
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    """Wait for queued device work so that wall-clock times are complete."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu", warmup: int = 1) -> dict[str, dict]:
    """Time each callable `repeats` times, cycling through all of them on every round (so that load from
    other jobs on the machine hits every method alike); returns {name: {median_s, times_s}}.

    A callable that raises is recorded with its error and dropped from later rounds.
    """
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
                errors[name] = f"{type(e).__name__}: {e}"[:300]
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in errors:
                continue
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name in fns:
        if name in errors:
            out[name] = {"error": errors[name]}
        else:
            out[name] = {"median_s": statistics.median(times[name]), "times_s": times[name]}
    return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _trim() -> None:
    """Hand freed heap memory back to the OS so that the next RSS baseline is honest (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory_mib(fn: Callable[[], object], device: str = "cpu", interval_s: float = 0.0005) -> float:
    """Peak memory of one call above what was held before it (MiB).

    CUDA: the allocator's peak. CPU: the resident set sampled every `interval_s` by a thread while fn runs
    (torch kernels release the GIL), minus the resident set before; large buffers are mmapped and freed
    at once, so this tracks the tensors alive at the peak to within the sampling interval.
    """
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _trim()
    before = _rss_mib()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(interval_s)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        fn()
        peak[0] = max(peak[0], _rss_mib())
    finally:
        done.set()
        th.join()
    return max(0.0, peak[0] - before)
