"""glibc malloc settings that keep freed memory in the process for the next allocation.

streamem's numerics allocate and free large arrays over and over: per sub-batch
temporaries of tens of MiB, per-task accumulators of hundreds of MiB, and the M-step's
padded volumes. glibc gives a block above its mmap threshold back to the kernel when it
is freed, so the next one is page-faulted and zeroed afresh. In a worker thread the
threshold does not even decide: a thread's own arena is a heap of at most 64 MiB, so
anything larger is always mmap'd. On a virtual machine whose freed pages go back to the
host (free page reporting, balloons: Firecracker, cloud VMs), a page fault costs far
more than the arithmetic on the page. On this project's 2-core Firecracker VM, a
5,000-particle box-128 refinement spent 506 of its 2,009 CPU-s in the kernel with the
earlier 32 MiB thresholds, and 93 of 1,626 with these settings (one paired run of
``streamem bench refine-phases``). ``streamem bench refine-memory --allocator 128``
(one run, second calls; seconds and of them in the kernel, peak RSS of the E-step, then
of the M-step counted afresh in the same process):

    setting                           E-step                M-step
    glibc defaults                    5.3 / 2.5  1020 MiB    8.1 /  4.9  1597 MiB
    Dask nanny default (trim 64 KiB)  5.9 / 3.4   962 MiB   20.2 / 14.4  1523 MiB
    thresholds 32 MiB (before)        4.8 / 2.3  1024 MiB   17.1 / 13.1  1587 MiB
    these, workers' (trim 1 GiB)      3.8 / 1.6  1020 MiB    4.6 /  1.0  1786 MiB
    these, client's (trim 2 GiB)      3.3 / 1.3  1020 MiB    4.3 /  0.8  1786 MiB

The kept heap costs the M-step ~0.2 GB of peak; in the whole refinement the client's
peak still fell (1.77 against 1.89 GiB), as :func:`streamem.core.backprojector.reconstruct`
now drops its temporaries early.

So every streamem process uses one arena (the main heap, which grows without a
64 MiB cap) and thresholds of 1 GiB: large blocks come from the heap, and freed ones
stay there for reuse. The peak RSS stays the peak of what is in use plus fragmentation;
memory is not handed back between tasks, which Dask shows as unmanaged memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("streamem")

#: Bytes above which glibc would mmap a block, and of free heap top a worker keeps.
KEEP_BYTES = 2**30
#: Free heap top the client keeps: the M-step's volumes of the next iteration (at box
#: 128, ~2 GiB) reuse the last one's pages. mallopt takes an int, so 2 GiB − 1 byte.
CLIENT_TRIM_BYTES = 2**31 - 1
#: The environment that gives a new process these settings (glibc reads it at start-up).
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(KEEP_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(KEEP_BYTES),
}
# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_freed_memory(trim_bytes: int = CLIENT_TRIM_BYTES) -> bool:
    """The settings of :data:`MALLOC_ENV` in this running process, through mallopt(3),
    with a free heap top of up to ``trim_bytes`` kept (the client's, by default).

    Threads started afterwards share the main heap; arenas that threads already have
    stay. Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: other parameters
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES),
            mallopt(_M_TRIM_THRESHOLD, int(trim_bytes))]  # fmt: skip
    if not all(done):
        log.debug("mallopt refused a setting: %s", done)
    return all(done)
