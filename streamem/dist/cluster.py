"""Clusters: a local one by default, an existing scheduler, or GPUs via dask-cuda.

The default ``LocalCluster`` listens on localhost only. A remote scheduler is
reached at ``--scheduler ADDRESS`` (``tls://`` addresses use the security
settings of the Dask config, e.g. ``distributed.comm.tls.*``) or through a
scheduler file.

``--scheduler`` is an address if it contains ``://`` or is ``HOST:PORT``; anything
else is a scheduler file. A scheduler file that does not exist yet is waited for
(a SLURM script starts the scheduler and the job together), but only if it names an
existing file, ends in ``.json`` or contains a folder; a bare word such as
``notaurl`` is refused at once rather than waited for.

Connecting has one deadline (``--scheduler-timeout``, default 30 s) that covers
waiting for the scheduler file, the TCP connection and distributed's handshake.
distributed's own ``timeout=`` does not bound the handshake: ``comm.core.connect``
retries the TCP connect until its timeout, but then awaits the peer's handshake
with no timeout, so a peer that accepts and never answers hangs the client for as
long as the kernel keeps the socket open. So the connection is first probed under
an overall ``asyncio.wait_for`` deadline (a refused connection fails at once), and
only then handed to ``Client``.

GPUs (``gpu=True``): a ``dask_cuda.LocalCUDACluster`` with one worker process per
visible GPU (``CUDA_VISIBLE_DEVICES`` chooses them), its scheduler and dashboard on
127.0.0.1 like the CPU cluster's (dask-cuda would otherwise take Dask's default
``:8787`` on every interface). Every GPU worker gets a
:class:`streamem.dist.device.DevicePlugin`, which is how a task knows it computes with
CuPy (:func:`streamem.dist.device.model_on_device`). Device memory: when ``rmm``
imports (the ``[gpu]`` extra installs ``rmm-cu12``), each worker starts an RMM pool
of 80% of its GPU and CuPy allocates from it (``rmm_allocator_external_lib_list``):
the pool is made once per worker, so the E-step's many short-lived temporaries of
changing sizes cost no ``cudaMalloc``, and dask-cuda's device-memory accounting sees
what CuPy holds. Without ``rmm``, CuPy's own memory pool (its default allocator) does
the same caching per process, so nothing is set; 20% of the GPU stays outside the
RMM pool for cuBLAS/cuFFT workspaces, which do not allocate through CuPy.
``--gpu`` without CuPy, without dask-cuda or with no visible GPU is refused with one
line before anything starts (:func:`check_gpu`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import dask

from streamem.errors import InputError

log = logging.getLogger("streamem")

#: Seconds to wait for a scheduler (its file, the connection and the handshake).
DEFAULT_SCHEDULER_TIMEOUT_S = 30.0
#: Dask's default scheduler port, used when an address has none.
DEFAULT_SCHEDULER_PORT = 8786
#: ``HOST:PORT`` without a protocol (IPv6 hosts in brackets).
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):[^/\\]*$")


@contextmanager
def client_for(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    gpu: bool = False,
    memory_limit: str | None = "auto",
    scheduler_timeout_s: float = DEFAULT_SCHEDULER_TIMEOUT_S,
) -> Iterator:
    """A ``distributed.Client`` for the job; closes what it started.

    scheduler: None for a new local cluster, an address (``tcp://host:8786``), or
    the path of a scheduler file (waited for up to ``scheduler_timeout_s``).
    Bad options and unreachable schedulers raise InputError before anything starts.
    """
    from distributed import Client, LocalCluster

    # distributed configures its loggers at import; keep our log readable
    for noisy in ("distributed", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bokeh warns about its websocket origin wildcard; the dashboard listens on 127.0.0.1
    logging.getLogger("bokeh").setLevel(logging.ERROR)

    check_cluster_options(n_workers, threads_per_worker, scheduler_timeout_s)
    if scheduler:
        client = connect_scheduler(scheduler, scheduler_timeout_s)
        if gpu:  # the cluster's workers must have GPUs and CuPy (dask cuda worker)
            _register_device(client, where=f"--scheduler {scheduler}")
        _announce(client)
        try:
            yield client
        finally:
            client.close()
        return
    # glibc's malloc thresholds for the workers (streamem bench refine-memory --allocator:
    # one refine3d E-step chunk of 128 images at box 128, full radius, child processes,
    # mean of 2 calls; a shared 2-core machine, so seconds are within ~20%):
    #   Dask nanny default (trim 64 KiB: fixes the mmap threshold at 128 KiB, every large
    #   temporary a fresh mmap, page faults)      39.6 s  peak 774 MiB, kept after 205 MiB
    #   both thresholds 256 MiB (our earlier choice) 14.8 s  peak 942 MiB, kept 374 MiB
    #   glibc defaults (dynamic mmap threshold)      17.1 s  peak 794 MiB, kept 226 MiB
    #   MALLOC_ARENA_MAX=2                           14.4 s  peak 793 MiB, kept 226 MiB
    #   both thresholds 32 MiB                       12.1 s  peak 805 MiB, kept 236 MiB
    # Since the E-step works in bounded sub-batches (streamem.em.memory), its big
    # temporaries are tens of MiB: 32 MiB thresholds reuse them from the heap (no page
    # faults) and hand larger ones (accumulators, chunk images) back to the system.
    # One BLAS thread per worker: the workers already use every core.
    worker_env = {
        "MALLOC_TRIM_THRESHOLD_": str(32 * 2**20),
        "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    dask.config.set({"distributed.nanny.pre-spawn-environ": worker_env})
    if gpu:
        check_gpu()
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            **gpu_cluster_options(threads_per_worker, memory_limit, _importable("rmm"))
        )
    else:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=memory_limit,
            silence_logs=logging.WARNING,
        )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    try:
        if gpu:
            _register_device(client, where=None)
        _announce(client)
        yield client
    finally:
        client.close()
        cluster.close()


def _announce(client) -> None:
    from streamem.dist.quiet import quiet_input_errors

    quiet_input_errors(client)  # bad input in a task: one line, not a worker traceback
    n = len(client.scheduler_info().get("workers", {}))
    log.info("Dask: %d workers, dashboard %s", n, client.dashboard_link)


def run_with_client(job, use_cluster: bool = True, **cluster_options):
    """``job(client)`` on a cluster from :func:`client_for`, or ``job(None)`` (threads).

    With ``gpu=True`` and no cluster, the threaded scheduler's tasks compute with CuPy
    (:func:`streamem.dist.device.use_device`); dask-cuda is not needed then.
    """
    if not use_cluster:
        from streamem.dist.device import use_device

        gpu = cluster_options.get("gpu", False)
        if gpu:
            check_gpu(need_dask_cuda=False)
        with use_device("cupy" if gpu else None):
            return job(None)
    with client_for(**cluster_options) as client:
        return job(client)


# -- GPUs --------------------------------------------------------------------------------

#: How to get what ``--gpu`` needs.
GPU_INSTALL = 'pip install "streamem[gpu]"'
#: Share of each GPU's memory in the RMM pool (the rest: cuBLAS/cuFFT workspaces).
RMM_POOL_FRACTION = 0.8


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, a broken package
        return False


def gpu_problem(need_dask_cuda: bool = True) -> str | None:
    """What ``--gpu`` lacks on this machine, as one line (None when all is there).

    Checks, in order: CuPy imports; ``cupy.cuda.runtime.getDeviceCount()`` is at
    least 1 (no driver or no visible device raises, or gives 0); dask-cuda imports
    (for a GPU cluster). A machine without a GPU is told so, not to install more.
    """
    import os

    try:
        import cupy
    except ImportError:
        return f"--gpu needs CuPy, which is not installed: {GPU_INSTALL}"
    try:
        n_gpus = int(cupy.cuda.runtime.getDeviceCount())
        reason = "no CUDA device"
    except Exception as exc:  # CUDARuntimeError without a driver, or a broken install
        n_gpus, reason = 0, _reason(exc)
    if n_gpus < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
        return (
            f"--gpu found no visible GPU ({reason}{shown}): run without --gpu, or where "
            "an NVIDIA GPU and its driver are visible"
        )
    if need_dask_cuda:
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            return f"--gpu needs dask-cuda, which is not installed: {GPU_INSTALL}"
    return None


def check_gpu(need_dask_cuda: bool = True) -> None:
    """InputError (one line, :func:`gpu_problem`) unless ``--gpu`` can run here."""
    problem = gpu_problem(need_dask_cuda)
    if problem is not None:
        raise InputError(None, problem)


def gpu_cluster_options(
    threads_per_worker: int = 1, memory_limit: str | None = "auto", rmm_available: bool = False
) -> dict:
    """Keyword arguments of ``dask_cuda.LocalCUDACluster`` (module docstring).

    One worker per visible GPU (``n_workers`` left to dask-cuda, which counts
    ``CUDA_VISIBLE_DEVICES``); scheduler and dashboard on 127.0.0.1 (a free port);
    with ``rmm_available`` an RMM pool behind CuPy's allocator, else CuPy's own pool.
    """
    options = {
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "threads_per_worker": threads_per_worker,
        "memory_limit": memory_limit,
        "silence_logs": logging.WARNING,
    }
    if rmm_available:
        options["rmm_pool_size"] = RMM_POOL_FRACTION
        options["rmm_allocator_external_lib_list"] = ["cupy"]
    return options


def _register_device(client, where: str | None) -> None:
    """Register the CuPy :class:`~streamem.dist.device.DevicePlugin` on every worker."""
    from streamem.dist.device import DevicePlugin

    try:
        client.register_plugin(DevicePlugin("cupy"))
    except ImportError:
        client.close()
        raise InputError(
            where, f"--gpu: the cluster's workers cannot import CuPy ({GPU_INSTALL} there)"
        ) from None


# -- options and schedulers --------------------------------------------------------------


def check_cluster_options(
    n_workers: int | None,
    threads_per_worker: int | None,
    scheduler_timeout_s: float | None = DEFAULT_SCHEDULER_TIMEOUT_S,
) -> None:
    """Refuse worker counts and timeouts that would hang or fail later (InputError)."""
    # LocalCluster(n_workers=0) starts a scheduler with no workers: the job then waits forever
    if n_workers is not None and n_workers < 1:
        raise InputError(None, f"--n-workers must be at least 1 (got {n_workers})")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise InputError(
            None, f"--threads-per-worker must be at least 1 (got {threads_per_worker})"
        )
    if scheduler_timeout_s is not None and not scheduler_timeout_s > 0:
        raise InputError(
            None,
            f"--scheduler-timeout must be a positive number of seconds (got {scheduler_timeout_s})",
        )


def is_scheduler_address(scheduler: str) -> bool:
    """True for ``PROTOCOL://...`` or ``HOST:PORT``; False for a scheduler-file path."""
    return "://" in scheduler or bool(_HOST_PORT.match(scheduler))


def check_scheduler_address(address: str, where: str) -> str:
    """A valid distributed address (``tcp://`` added to ``HOST:PORT``), else InputError.

    ``where`` names what the user gave (``--scheduler X`` or the scheduler file) in
    the error. ``tls://`` and ``wss://`` need TLS settings in the Dask config.
    """
    from distributed.comm import registry
    from distributed.comm.addressing import parse_host_port

    if "://" not in address:
        address = f"tcp://{address}"
    scheme, _, loc = address.partition("://")
    try:
        registry.get_backend(scheme)
    except ValueError:
        raise InputError(
            where, f"unknown protocol {scheme}:// (expected tcp://HOST:PORT or tls://HOST:PORT)"
        ) from None
    if scheme in ("tcp", "tls", "ws", "wss"):
        try:
            host, port = parse_host_port(loc, DEFAULT_SCHEDULER_PORT)
        except ValueError:
            raise InputError(where, f"{loc!r} is not HOST:PORT (PORT a number)") from None
        if not host:
            raise InputError(where, f"no host in {address!r} (expected {scheme}://HOST:PORT)")
        if not 0 < port < 65536:
            raise InputError(where, f"port {port} is not between 1 and 65535")
    if scheme in ("tls", "wss") and _tls_settings() is None:
        raise InputError(
            where,
            f"a {scheme}:// scheduler needs TLS settings (distributed.comm.tls.ca-file, "
            "distributed.comm.tls.client.cert and .key in the Dask config, or "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE etc.)",
        )
    return address


def _tls_settings():
    """The client's ``ssl.SSLContext`` from the Dask config, or None when there is none."""
    from distributed.security import Security

    return Security().get_connection_args("client").get("ssl_context")


def scheduler_file_address(path: Path, timeout_s: float) -> str:
    """The address in a scheduler file, waiting up to ``timeout_s`` for the file to appear."""
    where = f"--scheduler {path}"
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if path.exists():
            raise InputError(where, "is not a file (a scheduler file is JSON with an 'address')")
        if time.monotonic() >= deadline:
            raise InputError(
                where, f"no scheduler file appeared within {timeout_s:g} s (--scheduler-timeout)"
            )
        time.sleep(0.1)
    # the scheduler may be writing it right now: allow a moment for a partial file
    settle = min(deadline, time.monotonic() + 1.0)
    while True:
        try:
            info = json.loads(path.read_text())
            address = info["address"] if isinstance(info, dict) else None
            if not isinstance(address, str) or not address:
                raise KeyError("address")
            break
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as exc:
            if time.monotonic() >= settle:
                problem = (
                    "has no 'address'"
                    if isinstance(exc, KeyError)
                    else f"is not JSON ({type(exc).__name__})"
                )
                raise InputError(
                    where,
                    f"not a Dask scheduler file: it {problem} (written by dask scheduler --scheduler-file)",
                ) from None
            time.sleep(0.1)
    return check_scheduler_address(address, f"{where} (address {address})")


def connect_scheduler(scheduler: str, timeout_s: float = DEFAULT_SCHEDULER_TIMEOUT_S):
    """A ``distributed.Client`` on an existing scheduler, connected within ``timeout_s``.

    ``scheduler``: an address (``tcp://host:8786``, ``host:8786``, ``tls://...``) or a
    scheduler file (waited for). Raises InputError with one line on any failure.
    """
    from distributed import Client
    from distributed.security import Security

    deadline = time.monotonic() + timeout_s
    if is_scheduler_address(scheduler):
        where = f"--scheduler {scheduler}"
        address = check_scheduler_address(scheduler, where)
    else:
        path = Path(scheduler).expanduser()
        if not (path.exists() or path.suffix == ".json" or len(path.parts) > 1):
            raise InputError(
                f"--scheduler {scheduler}",
                "not a scheduler address (tcp://HOST:PORT or HOST:PORT) nor a scheduler "
                "file (an existing file, or a path ending in .json)",
            )
        address = scheduler_file_address(path, timeout_s)
        where = f"--scheduler {scheduler} (address {address})"
    security = Security()
    connection_args = security.get_connection_args("client")
    # a scheduler file that appeared at the last moment still gets a short connect
    remaining_s = max(deadline - time.monotonic(), 2.0)
    _probe(address, remaining_s, connection_args, where)
    remaining_s = max(deadline - time.monotonic(), 2.0)
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": remaining_s}):
            return Client(address, timeout=remaining_s, security=security)
    except (OSError, TimeoutError, ImportError, ValueError) as exc:
        raise InputError(where, f"cannot connect to the Dask scheduler ({_reason(exc)})") from None


def _probe(address: str, timeout_s: float, connection_args: dict, where: str) -> None:
    """Connect and handshake with ``address`` once, all within ``timeout_s``; else InputError."""
    from distributed.comm import connect
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, loc = parse_address(address)
    start = time.monotonic()
    if scheme in ("tcp", "tls", "ws", "wss"):
        # a plain socket first: "refused" and "unknown host" are final, while
        # distributed would retry them until its timeout
        host, port = parse_host_port(loc, DEFAULT_SCHEDULER_PORT)
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except socket.gaierror as exc:
            raise InputError(where, f"unknown host {host!r} ({exc.strerror})") from None
        except ConnectionRefusedError:
            raise InputError(
                where, f"nothing listens at {host}:{port} (connection refused)"
            ) from None
        except OSError as exc:
            raise InputError(
                where, f"cannot reach {host}:{port} within {timeout_s:.0f} s ({_reason(exc)})"
            ) from None
    left_s = max(timeout_s - (time.monotonic() - start), 1.0)

    async def handshake() -> None:
        comm = await connect(address, timeout=left_s, **connection_args)
        await comm.close()

    async def bounded() -> None:
        # connect() retries the TCP connect for left_s, then awaits the handshake with
        # no timeout: the outer deadline (1 s later, so connect's own error wins) bounds it
        await asyncio.wait_for(handshake(), left_s + 1.0)

    # in its own thread: the caller may already run an event loop (Jupyter)
    with ThreadPoolExecutor(1, thread_name_prefix="streamem-probe") as pool:
        try:
            pool.submit(asyncio.run, bounded()).result()
        except TimeoutError:
            raise InputError(
                where,
                f"the peer accepted the connection but gave no Dask handshake within "
                f"{timeout_s:.0f} s (is it a Dask scheduler? is the protocol right?)",
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(
                where, f"cannot connect to the Dask scheduler ({_reason(exc)})"
            ) from None


def _reason(exc: BaseException) -> str:
    """One line for an exception (distributed's messages can span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
