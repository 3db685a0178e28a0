"""Measuring instruments: step timers, peak memory, parameter and state sizes.

Everything here is backend-neutral except the device-memory probes, which
import the active backend's own module lazily (the benchmark is a tool, not
part of the adapter library, so it may look at the backend it runs on).
"""

import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# --- time -------------------------------------------------------------------


def time_calls(fn, count):
    """Calls `fn()` `count` times; returns each call's wall time in seconds.

    `fn` must block until its result exists (Keras's `train_on_batch` and
    `predict_on_batch` return NumPy values, so they do).
    """
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summarize(seconds):
    """Median, quartiles and count of a list of durations, in milliseconds."""
    ms = sorted(1000.0 * s for s in seconds)
    if len(ms) >= 4:
        q1, _, q3 = statistics.quantiles(ms, n=4)
    else:
        q1, q3 = ms[0], ms[-1]
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": ms[0],
        "n": len(ms),
    }


# --- host memory --------------------------------------------------------------


def _status_kib(field):
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes():
    """The process's resident set size now (Linux), else None."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def release_free_memory():
    """Collects garbage and hands freed heap pages back to the OS.

    Without `malloc_trim`, memory freed by a compilation stays resident and
    would hide the difference between cases in a peak-RSS reading.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakRSS:
    """Peak resident memory of this process over a window (Linux).

    `start()` resets the kernel's high-water mark (`/proc/self/clear_refs`,
    value 5) and `peak()` reads it back (`VmHWM`), so the figure covers
    exactly the window, sampled by the kernel at page granularity, not by a
    polling thread. Where the reset is unavailable, falls back to
    `ru_maxrss` (the peak over the process's whole life) and says so.
    """

    def __init__(self):
        self.method = None

    def start(self):
        release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (whole process)"

    def peak(self):
        if self.method == "VmHWM after clear_refs":
            kib = _status_kib("VmHWM")
            if kib is not None:
                return kib * 1024
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory(step, steps):
    """Runs `step()` `steps` times and returns the peak memory of that
    window: `peak_rss_bytes` and `memory_method` (see `PeakRSS`), plus
    `device` and `device_peak_bytes` where the backend reports a device."""
    device = accelerator()
    tracker = PeakRSS()
    if device:
        reset_device_peak()
    tracker.start()
    for _ in range(steps):
        step()
    result = {"peak_rss_bytes": tracker.peak(), "memory_method": tracker.method}
    if device:
        result["device"] = device
        result["device_peak_bytes"] = device_peak_bytes()
    return result


# --- device memory --------------------------------------------------------------


def accelerator():
    """`"gpu"`/`"tpu"` when the active backend computes on one, else None."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        platform = jax.default_backend()
        return None if platform == "cpu" else platform
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else None
    return None


def reset_device_peak():
    """Resets the device's peak-memory counter where the backend can."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")
    # JAX has no reset: the worker process is fresh per case, so its
    # lifetime peak is the case's peak.


def device_peak_bytes():
    """Peak device memory in use (bytes), or None when unknown."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            stats = jax.local_devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use")
        if backend == "torch":
            import torch

            return torch.cuda.max_memory_allocated()
        if backend == "tensorflow":
            import tensorflow as tf

            return tf.config.experimental.get_memory_info("GPU:0")["peak"]
    except Exception:  # a probe must never fail the benchmark
        return None
    return None


# --- sizes -----------------------------------------------------------------------


def variable_bytes(variables):
    """Total bytes held by Keras variables."""
    import keras

    total = 0
    for var in variables:
        dtype = keras.backend.standardize_dtype(var.dtype)
        total += math.prod(var.shape) * np.dtype(dtype).itemsize
    return int(total)


def count_params(variables):
    return int(sum(math.prod(v.shape) for v in variables))


def optimizer_state_bytes(optimizer):
    """Bytes of the optimizer's per-weight state (slots), excluding scalars
    such as the iteration counter and the learning rate."""
    return variable_bytes(v for v in optimizer.variables if len(v.shape) > 0)


def machine():
    """A short description of the machine the numbers come from."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as info:
            mem = int(info.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gib": None if mem is None else round(mem / 2**30, 1),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
    }


# --- one entry in a fresh process ----------------------------------------------

# The line `keras_lowrank.bench.worker` prints its result on.
RESULT_TAG = "KERAS_LOWRANK_BENCH_RESULT "




def in_fresh_process(request, what, timeout):
    """Runs `keras_lowrank.bench.worker` on `request` in a fresh Python process and returns
    its result; `what` names the entry in the error if the worker fails."""
    env = dict(os.environ)
    # The worker must import this very checkout of the package.
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-m", "keras_lowrank.bench.worker"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(
        f"keras_lowrank.bench: the memory worker failed for {what} "
        f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
