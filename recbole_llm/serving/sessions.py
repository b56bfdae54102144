"""ONNX Runtime sessions: the options every session of an artifact runs with, and the cores it may use.

Set here so that the runtime, the service and the benchmarks measure the same thing.
"""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (``docker --cpus``,
    Kubernetes CPU limits), rounded up; not the host's count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def session_options(intra_op_threads: int | None = None):
    """(onnxruntime.SessionOptions, the settings as a dict): what every session of an artifact runs with, set
    here so the runtime, the service and the benchmarks measure the same thing.

    One intra-op thread per usable core (``intra_op_threads`` to override; ONNX Runtime's default counts
    the host's cores, not a container's share), operators run one after another (the graph is a chain:
    inter-op parallelism only adds threads), every graph optimization, and the CPU memory arena on (buffers
    reused across calls)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or usable_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    settings = {"intra_op_num_threads": options.intra_op_num_threads, "inter_op_num_threads": 1,
                "execution_mode": "sequential", "graph_optimization_level": "all", "cpu_mem_arena": True}
    return options, settings
