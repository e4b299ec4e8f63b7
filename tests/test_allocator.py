"""streamem's processes keep large freed arrays in the malloc heap (streamem.dist.allocator).

glibc's mallinfo2() says how many bytes are in mmap'd blocks (``hblkhd``): with the
settings, a large array allocated in a worker's task thread comes from the heap, so
freeing it keeps its pages for the next one; without them it is a fresh mmap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import numpy as np
import pytest

from streamem.dist.allocator import MALLOC_ENV
from streamem.dist.cluster import client_for

ARRAY_BYTES = 256 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _mallinfo2():
    """glibc's mallinfo2 (None where the C library has none: not glibc ≥ 2.33)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


needs_mallinfo2 = pytest.mark.skipif(_mallinfo2() is None, reason="not glibc ≥ 2.33")


def mmapped_bytes_of_a_large_array_in_a_thread() -> int:
    """Bytes in mmap'd blocks while a 256 MiB array allocated in a new thread is alive."""
    import threading

    mallinfo2, out = _mallinfo2(), []

    def task():
        a = np.ones(ARRAY_BYTES // 8)
        out.append(mallinfo2().hblkhd)
        del a

    t = threading.Thread(target=task)
    t.start()
    t.join()
    return out[0]


@needs_mallinfo2
def test_worker_task_threads_allocate_large_arrays_from_the_heap():
    with client_for(n_workers=1) as client:
        mmapped = client.submit(mmapped_bytes_of_a_large_array_in_a_thread, pure=False).result()
    assert mmapped < ARRAY_BYTES // 2


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_allocator import mmapped_bytes_of_a_large_array_in_a_thread
if sys.argv[1] == "mallopt":
    from streamem.dist.allocator import keep_freed_memory
    assert keep_freed_memory()
print(mmapped_bytes_of_a_large_array_in_a_thread())
"""


@needs_mallinfo2
@pytest.mark.parametrize("how", ["defaults", "environment", "mallopt"])
def test_large_arrays_come_from_the_heap_only_with_the_settings(how):
    import os
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if how == "environment":
        env.update(MALLOC_ENV)
    code = _CHILD.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code, how], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    mmapped = int(done.stdout.split()[-1])
    if how == "defaults":  # the case the settings are for: a thread's array is an mmap
        assert mmapped >= ARRAY_BYTES
    else:
        assert mmapped < ARRAY_BYTES // 2
