"""Peak-memory helpers for benchmarks that run their workload in a child process.

The child reports its own peak RSS (``VmHWM`` of /proc/self/status), reset after
start-up by writing "5" to /proc/self/clear_refs: a child's ``ru_maxrss`` can start at
the parent's RSS, and RUSAGE_CHILDREN is the maximum over every child so far.
"""

from __future__ import annotations

import resource


def status_kib(key: str) -> int:
    """A /proc/self/status field in KiB (``VmRSS``, ``VmHWM``); ru_maxrss where absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> None:
    """Reset this process's peak-RSS counter (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
