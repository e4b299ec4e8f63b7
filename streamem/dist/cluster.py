"""Clusters: a local one by default, an existing scheduler, or GPUs via dask-cuda.

Every cluster started here uses TLS with a certificate made for this run
(:func:`streamem.dist.security.local_security`): only the job's own client holds it,
so no other process can submit work to the workers. Scheduler, workers and dashboard
listen on 127.0.0.1 (the dashboard elsewhere only with ``dashboard_address``). With
``adapt=(MIN, MAX)`` the local cluster adapts its worker count to the load
(``LocalCluster.adapt``); the iteration graph survives workers that come and go
(:mod:`streamem.dist.iteration`). A remote scheduler is reached at
``--scheduler ADDRESS`` or through a scheduler file, with the certificates of
``--tls-ca-file/--tls-cert/--tls-key`` or of the Dask config
(:func:`streamem.dist.security.client_security`). A ``tls://`` address without
certificates, a certificate from another CA and ``tcp://`` to a TLS scheduler are
each refused with one line, at once.

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

from streamem.dist.allocator import MALLOC_ENV, keep_freed_memory
from streamem.errors import InputError

log = logging.getLogger("streamem")

#: Seconds to wait for a scheduler (its file, the connection and the handshake).
DEFAULT_SCHEDULER_TIMEOUT_S = 30.0
#: Dask's default scheduler port, used when an address has none.
DEFAULT_SCHEDULER_PORT = 8786
#: ``HOST:PORT`` without a protocol (IPv6 hosts in brackets).
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):[^/\\]*$")


# The workers' malloc settings (streamem.dist.allocator: one arena, freed memory kept
# for reuse) and one BLAS thread per worker: the workers already use every core.
# They go through distributed.nanny.pre-spawn-environ, since the nanny's own default
# (MALLOC_TRIM_THRESHOLD_=65536) would otherwise replace them.
#: The environment of every worker process streamem starts (the comment above).
WORKER_ENV = {
    **MALLOC_ENV,
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@contextmanager
def client_for(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    gpu: bool = False,
    memory_limit: str | None = "auto",
    scheduler_timeout_s: float = DEFAULT_SCHEDULER_TIMEOUT_S,
    security=None,
    dashboard_address: str | None = None,
    adapt: tuple[int, int] | None = None,
) -> Iterator:
    """A ``distributed.Client`` for the job; closes what it started.

    scheduler: None for a new local cluster (TLS with a temporary certificate), an
    address (``tcp://host:8786``, ``tls://...``), or the path of a scheduler file
    (waited for up to ``scheduler_timeout_s``). security: the client's
    ``distributed.security.Security`` for a remote scheduler (None: the Dask config).
    dashboard_address: where a local cluster's dashboard listens (default
    ``127.0.0.1:0``, a free port on loopback). adapt: (minimum, maximum) workers of an
    adaptive local cluster (``LocalCluster.adapt``) instead of ``n_workers``.
    Bad options and unreachable schedulers raise InputError before anything starts.
    """
    from distributed import Client, LocalCluster

    # distributed configures its loggers at import; keep our log readable
    for noisy in ("distributed", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bokeh warns about its websocket origin wildcard; the dashboard listens on 127.0.0.1
    logging.getLogger("bokeh").setLevel(logging.ERROR)

    check_cluster_options(n_workers, threads_per_worker, scheduler_timeout_s)
    keep_freed_memory()  # the client's M-step, like the workers' E-step
    if adapt is not None:
        check_adapt(adapt, gpu)
    if scheduler:
        client = connect_scheduler(scheduler, scheduler_timeout_s, security)
        if gpu:  # the cluster's workers must have GPUs and CuPy (dask cuda worker)
            _register_device(client, where=f"--scheduler {scheduler}")
        _announce(client)
        try:
            yield client
        finally:
            client.close()
        return
    dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENV})
    from streamem.dist.security import local_security

    dashboard_address = dashboard_address or "127.0.0.1:0"
    cluster_security = local_security()  # TLS: only this process's client holds the key
    if gpu:
        check_gpu()
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            **gpu_cluster_options(
                threads_per_worker,
                memory_limit,
                _importable("rmm"),
                security=cluster_security,
                dashboard_address=dashboard_address,
            )
        )
    else:
        cluster = LocalCluster(
            n_workers=adapt[0] if adapt else n_workers,
            threads_per_worker=threads_per_worker,
            host="127.0.0.1",
            dashboard_address=dashboard_address,
            memory_limit=memory_limit,
            silence_logs=logging.WARNING,
            security=cluster_security,
        )
    try:
        if adapt is not None:
            cluster.adapt(minimum=adapt[0], maximum=adapt[1])
        client = Client(cluster, security=cluster_security)
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
    from streamem.dist.dashboard import announce_page
    from streamem.dist.quiet import quiet_input_errors

    quiet_input_errors(client)  # bad input in a task: one line, not a worker traceback
    n = len(client.scheduler_info().get("workers", {}))
    log.info("Dask: %d workers, dashboard %s", n, client.dashboard_link)
    announce_page(client)  # the /streamem page (a scheduler plugin); logs its link


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
        keep_freed_memory()  # before the threaded scheduler's threads get arenas
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
    threads_per_worker: int = 1,
    memory_limit: str | None = "auto",
    rmm_available: bool = False,
    security=None,
    dashboard_address: str = "127.0.0.1:0",
) -> dict:
    """Keyword arguments of ``dask_cuda.LocalCUDACluster`` (module docstring).

    One worker per visible GPU (``n_workers`` left to dask-cuda, which counts
    ``CUDA_VISIBLE_DEVICES``); scheduler and dashboard on 127.0.0.1 (a free port,
    unless ``dashboard_address``); TLS with ``security`` (LocalCUDACluster passes it
    to LocalCluster, which then uses ``tls://``); with ``rmm_available`` an RMM pool
    behind CuPy's allocator, else CuPy's own pool.
    """
    options = {
        "host": "127.0.0.1",
        "dashboard_address": dashboard_address,
        "threads_per_worker": threads_per_worker,
        "memory_limit": memory_limit,
        "silence_logs": logging.WARNING,
    }
    if security is not None:
        options["security"] = security
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


def check_adapt(adapt: tuple[int, int], gpu: bool = False) -> None:
    """Refuse an ``--adapt MIN:MAX`` that cannot work (InputError)."""
    low, high = adapt
    if gpu:
        raise InputError(None, "--adapt is for CPU clusters (--gpu has one worker per GPU)")
    if low < 1 or high < low:
        raise InputError(None, f"--adapt MIN:MAX needs 1 <= MIN <= MAX (got {low}:{high})")


def parse_adapt(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` as two integers (InputError otherwise; checked by :func:`check_adapt`)."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        adapt = (int(low), int(high))
    except ValueError:
        raise InputError(f"--adapt {text}", "expected MIN:MAX, two whole numbers") from None
    check_adapt(adapt)
    return adapt


def is_scheduler_address(scheduler: str) -> bool:
    """True for ``PROTOCOL://...`` or ``HOST:PORT``; False for a scheduler-file path."""
    return "://" in scheduler or bool(_HOST_PORT.match(scheduler))


def check_scheduler_address(address: str, where: str, security=None) -> str:
    """A valid distributed address (``tcp://`` added to ``HOST:PORT``), else InputError.

    ``where`` names what the user gave (``--scheduler X`` or the scheduler file) in
    the error. ``tls://`` and ``wss://`` need certificates (``security``, a
    ``distributed.security.Security``; None: the Dask config), and certificates that
    require encryption need a TLS address.
    """
    from distributed.comm import registry
    from distributed.comm.addressing import parse_host_port
    from distributed.security import Security

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
    security = security if security is not None else Security()
    has_tls = security.get_connection_args("client").get("ssl_context") is not None
    if scheme in ("tls", "wss") and not has_tls:
        raise InputError(
            where,
            f"a {scheme}:// scheduler needs TLS settings: --tls-ca-file, --tls-cert and "
            "--tls-key (or distributed.comm.tls.ca-file, .client.cert and .client.key in "
            "the Dask config; streamem cluster certs makes them)",
        )
    if scheme in ("tcp", "ws") and security.require_encryption:
        raise InputError(
            where,
            f"TLS certificates are given but the address is {scheme}://: use tls://{loc}",
        )
    return address


def scheduler_file_address(path: Path, timeout_s: float, security=None) -> str:
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
    return check_scheduler_address(address, f"{where} (address {address})", security)


def connect_scheduler(
    scheduler: str, timeout_s: float = DEFAULT_SCHEDULER_TIMEOUT_S, security=None
):
    """A ``distributed.Client`` on an existing scheduler, connected within ``timeout_s``.

    ``scheduler``: an address (``tcp://host:8786``, ``host:8786``, ``tls://...``) or a
    scheduler file (waited for). security: the client's certificates
    (``distributed.security.Security``; None: the Dask config). Raises InputError
    with one line on any failure, TLS refusals included.
    """
    from distributed import Client
    from distributed.security import Security

    security = security if security is not None else Security()
    deadline = time.monotonic() + timeout_s
    if is_scheduler_address(scheduler):
        where = f"--scheduler {scheduler}"
        address = check_scheduler_address(scheduler, where, security)
    else:
        path = Path(scheduler).expanduser()
        if not (path.exists() or path.suffix == ".json" or len(path.parts) > 1):
            raise InputError(
                f"--scheduler {scheduler}",
                "not a scheduler address (tcp://HOST:PORT or HOST:PORT) nor a scheduler "
                "file (an existing file, or a path ending in .json)",
            )
        address = scheduler_file_address(path, timeout_s, security)
        where = f"--scheduler {scheduler} (address {address})"
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
            from streamem.dist.security import refusal

            reason = _reason(exc)
            tls_line = refusal(reason, address)
            if tls_line is None and scheme == "tcp" and _speaks_tls(address, left_s):
                tls_line = (
                    f"the scheduler speaks TLS: use tls://{loc} with its certificates "
                    "(--tls-ca-file, --tls-cert, --tls-key)"
                )
            if tls_line is not None:
                raise InputError(where, tls_line) from None
            raise InputError(where, f"cannot connect to the Dask scheduler ({reason})") from None


def _speaks_tls(address: str, timeout_s: float) -> bool:
    """True if the peer at a ``tcp://`` address answers a TLS ClientHello (a TLS
    scheduler resets distributed's plain-text handshake, which says nothing)."""
    import ssl

    from distributed.comm.addressing import parse_address, parse_host_port

    host, port = parse_host_port(parse_address(address)[1], DEFAULT_SCHEDULER_PORT)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asks whether TLS is spoken, sends nothing
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 5.0)) as raw:
            with context.wrap_socket(raw):
                return True
    except ssl.SSLError as exc:
        # a TLS server that wants our certificate still speaks TLS
        return "ALERT" in str(exc).upper() or "CERTIFICATE" in str(exc).upper()
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    """One line for an exception (distributed's messages can span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
