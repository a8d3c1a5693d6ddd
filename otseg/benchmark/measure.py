"""Timing and peak-memory measurement for the benchmark.

Times: ``time.perf_counter`` around each call on the CPU; CUDA events around
each call, then a synchronisation, on a GPU (the latency of one call, the
host's work included). On a GPU also the time per call of calls queued back
to back (``queued_ms``), as in a training loop, where the host prepares the
next call while the GPU runs the last. Peak memory: the CUDA caching
allocator's counter on a GPU; on the CPU the kernel's resident-set high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set
before the call, after returning freed heap memory to the system.
"""

import ctypes
import functools
import gc
import statistics
import threading
import time

import torch

MIB = 2**20


def synchronize(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, repeats, device):
    """Wall time of ``repeats`` calls of ``fn``, each measured on its own.

    Args:
        fn: a callable with no arguments.
        repeats: how many calls to time (>= 1).
        device: the device ``fn`` runs on; CUDA work is timed with events.

    Returns:
        list of milliseconds, one per call.
    """
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn, device, repeats=None, budget_s=1.0, max_repeats=20):
    """Median time of ``fn`` after one untimed warm-up call.

    Args:
        fn: a callable with no arguments.
        device: the device ``fn`` runs on.
        repeats: timed calls; None chooses ``budget_s / time of the first
            timed call`` calls, between 1 and ``max_repeats``.
        budget_s: time to spend on the timed calls when ``repeats`` is None.
        max_repeats: most timed calls when ``repeats`` is None.

    Returns:
        (median ms, number of timed calls, warm-up seconds, what the warm-up
        call returned).
    """
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    if repeats is None:
        # The first timed call sets the count (a warm-up may include compiling).
        times = time_calls(fn, 1, device)
        repeats = max(1, min(max_repeats, int(budget_s * 1e3 / max(times[0], 1e-3))))
        times += time_calls(fn, repeats - 1, device)
    else:
        times = time_calls(fn, repeats, device)
    return statistics.median(times), repeats, warmup_s, result


def queued_ms(fn, device, repeats):
    """Time per call of ``repeats`` calls of ``fn`` queued back to back.

    One CUDA event before the first call and one after the last, one
    synchronisation at the end: while the GPU runs a call the host prepares
    the next, so the mean per call tends to the longer of the GPU's and the
    host's work per call, and a call that reads a value on the host (like
    the reference's stopping test) waits for the GPU each time. It is a mean
    over one window, so a host stall within it (garbage collection, say)
    counts in full: it can exceed the median latency of ``median_ms``. On
    the CPU, ``time.perf_counter`` around the calls.

    Args:
        fn: a callable with no arguments (called once untimed first).
        device: the device ``fn`` runs on.
        repeats: calls to time (>= 1).

    Returns:
        milliseconds per call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    fn()
    synchronize(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) * 1e3 / repeats


def copy_bandwidth_gbs(device, mib=1024, repeats=10):
    """Device-to-device copy bandwidth in GB/s (bytes read + written per second):
    the achievable memory bandwidth that the benchmark's GB/s column is
    compared with. CUDA devices only.

    Args:
        device: a CUDA device.
        mib: size of the copied tensor in MiB (several times the L2 cache).
        repeats: timed copies; the median is taken.
    """
    src = torch.empty(mib * MIB // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms, _, _, _ = median_ms(lambda: dst.copy_(src), device, repeats=repeats)
    src = dst = None  # noqa: F841  (free before emptying the cache)
    torch.cuda.empty_cache()
    return 2 * mib * MIB / (ms * 1e-3) / 1e9


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda pad: None


def _release_freed_memory():
    gc.collect()
    _malloc_trim()(0)


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _RssSampler:
    """Polls VmRSS every millisecond in a thread: a lower bound of the peak."""

    def __enter__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(1e-3):
            self.peak = max(self.peak, _proc_status_kib("VmRSS"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _proc_status_kib("VmRSS"))


class PeakMemory:
    """Peak memory that a call allocates above what was held before it.

    On CUDA: ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus the allocation before the call. On the
    CPU, the first method that passes a self-test (a 400 MiB tensor must read
    as 400 MiB within 10%):

    - "VmHWM": free memory back to the system (``gc.collect``,
      ``malloc_trim(0)``), read VmRSS, reset VmHWM by writing 5 to
      ``/proc/self/clear_refs``, run, read VmHWM; peak = VmHWM - VmRSS before;
    - "VmRSS sampled": VmRSS polled every 1 ms during the call (a lower bound:
      short peaks can be missed);
    - none: peaks read as None.

    Attributes:
        method: a description of the method in use.
        self_test_mib: what the self-test measured (CPU), else None.
    """

    SELF_TEST_MIB = 400

    def __init__(self, device):
        self.device = torch.device(device)
        self.self_test_mib = None
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above the allocation before the call"
            self._measure = self._cuda
            return
        self.method = "none (no /proc/self/status: peak memory is not measured)"
        self._measure = lambda fn: None
        for method, measure in (
            ("VmHWM - VmRSS before (reset via /proc/self/clear_refs, after gc + malloc_trim)", self._hwm),
            ("VmRSS polled every 1 ms above VmRSS before (a lower bound; clear_refs not usable)", self._sampled),
        ):
            try:
                got = measure(lambda: torch.ones(self.SELF_TEST_MIB * MIB // 4).sum())
            except OSError:
                continue
            if got is not None and abs(got - self.SELF_TEST_MIB) <= 0.1 * self.SELF_TEST_MIB:
                self.method, self._measure, self.self_test_mib = method, measure, got
                break

    def __call__(self, fn):
        """Run ``fn()`` once and return its peak memory in MiB (None: not measured)."""
        return self._measure(fn)

    def _cuda(self, fn):
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / MIB

    @staticmethod
    def _hwm(fn):
        _release_freed_memory()
        before = _proc_status_kib("VmRSS")
        _reset_hwm()
        fn()
        return (_proc_status_kib("VmHWM") - before) / 1024

    @staticmethod
    def _sampled(fn):
        _release_freed_memory()
        before = _proc_status_kib("VmRSS")
        with _RssSampler() as sampler:
            fn()
        return (sampler.peak - before) / 1024
