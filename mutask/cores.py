"""How many cores this process may run on (its CPU affinity, which a container or `taskset`
limits), for torch's threads, ONNX Runtime's threads and the decoding workers."""

import os


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)
