"""Execution options shared by every Dask job's command, and running a job with them.

``--gpu`` (refine3d, class3d, class2d, reconstruct, demo, pick): a dask-cuda cluster,
one worker per visible GPU, each computing with CuPy (:mod:`streamem.dist.cluster`,
:mod:`streamem.dist.device`); with ``--scheduler``, that cluster's workers compute
with CuPy; with ``--no-cluster``, this process's threads do. What ``--gpu`` needs
(CuPy, dask-cuda, a visible GPU) is checked first, by :func:`check_execution`, so a
missing piece is one line and exit 2 before any output exists.

Security (:mod:`streamem.dist.security`): a local cluster always uses TLS with a
certificate of this run; ``--scheduler`` uses ``--tls-ca-file/--tls-cert/--tls-key``
or the Dask config's ``distributed.comm.tls.*``. ``--dashboard-address`` moves a local
cluster's dashboard off 127.0.0.1; ``--adapt MIN:MAX`` makes the local cluster adaptive.

Option spellings are one per meaning across the commands, RELION's where it has one
(issue 18): ``--angpix`` (pixel size, Å), ``--n-workers`` (local Dask workers of a job's
cluster; for the I/O commands without one, this process's threads), ``--iterations``
(class3d/class2d run that many; refine3d at most that many). The old spellings
(``--pixel-size``, ``--workers``, ``-j``, ``--max-iterations``) still parse for one
release, hidden from ``--help`` and silently (a note on stderr would break the
one-line error of a bad value given with them; :func:`add_old_spelling`,
:data:`OLD_SPELLINGS`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

#: old spelling -> the one that replaced it (kept as hidden aliases for one release)
OLD_SPELLINGS = {
    "--pixel-size": "--angpix",
    "--workers": "--n-workers",
    "-j": "--n-workers",
    "--max-iterations": "--iterations",
}


def add_old_spelling(p, action: argparse.Action, *old: str) -> None:
    """Let ``old`` spellings (keys of :data:`OLD_SPELLINGS`) of the option ``action``
    (what ``add_argument`` returned) parse as it does, hidden from ``--help``."""
    p.add_argument(
        *old, dest=action.dest, type=action.type, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def add_shard_size_option(p) -> None:
    """``--shard-size N`` of the commands that write a store (import, simulate)."""
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        metavar="N",
        help="particles per Zarr shard, a multiple of the chunk size (0: unsharded; "
        "default: ~256 MiB shards above 100,000 particles)",
    )


def add_threads_option(p, help: str) -> None:
    """``--n-workers N`` of the I/O commands (import, export, simulate, ctf, pick,
    extract): threads of this process (dest ``workers``; old ``--workers``, ``-j``)."""
    action = p.add_argument("--n-workers", dest="workers", type=int, default=None, help=help)
    add_old_spelling(p, action, "--workers", "-j")


def _add_scheduler_arguments(g) -> None:
    g.add_argument(
        "--scheduler",
        help="an existing Dask cluster: its address (tcp://HOST:PORT, HOST:PORT, tls://...) "
        "or its scheduler file (waited for if it does not exist yet)",
    )
    g.add_argument(
        "--scheduler-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up on --scheduler after this long: its file, connection and handshake (30)",
    )
    g.add_argument(
        "--tls-ca-file",
        metavar="PEM",
        help="TLS for --scheduler: the cluster's CA certificate (with --tls-cert, --tls-key; "
        "default: distributed.comm.tls.* of the Dask config; streamem cluster certs DIR)",
    )
    g.add_argument("--tls-cert", metavar="PEM", help="TLS: this client's certificate")
    g.add_argument("--tls-key", metavar="PEM", help="TLS: this client's private key")
    g.add_argument(
        "--storage-options",
        metavar="JSON",
        type=_storage_options,
        default=None,
        help="fsspec options of a store URL (s3://bucket/p.zarr), e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000"}\' (default: fsspec\'s configuration)',
    )
    from streamem.dist.gateway import add_gateway_arguments

    add_gateway_arguments(g)  # --gateway URL: a new dask-gateway cluster (dist/gateway.py)


def _storage_options(text: str) -> dict:
    """``--storage-options JSON``, put into fsspec's configuration as it is parsed, so the
    store URL opens with it and a local cluster's workers inherit it (io/store_url.py)."""
    from streamem.errors import InputError
    from streamem.io.store_url import configure_storage_options, parse_storage_options

    try:
        options = parse_storage_options(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None
    configure_storage_options(options)
    return options


def add_scheduler_options(p) -> None:
    """``--scheduler``/``--scheduler-timeout`` for jobs that run on local threads by default
    (import, export): with ``--scheduler`` their tasks run on that cluster instead."""
    _add_scheduler_arguments(p.add_argument_group("execution"))


def add_gpu_option(p) -> None:
    """``--gpu`` for jobs that run on local threads by default (pick); see the module."""
    p.add_argument(
        "--gpu",
        action="store_true",
        help="compute on GPUs with CuPy: a dask-cuda cluster (one worker per GPU), or "
        "the GPU workers of --scheduler",
    )
    _add_dashboard_argument(p)


def _add_dashboard_argument(g) -> None:
    g.add_argument(
        "--dashboard-address",
        metavar="HOST:PORT",
        help="where a local cluster's dashboard listens (default 127.0.0.1, a free port; "
        "e.g. 0.0.0.0:8787 to show it to other machines)",
    )


def security_for(args):
    """The client's ``Security`` for ``--scheduler`` (``--tls-*`` or the Dask config)."""
    from streamem.dist.security import client_security

    return client_security(
        getattr(args, "tls_ca_file", None),
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
    )


def check_execution(args) -> None:
    """Refuse execution options that cannot work here (InputError, one line).

    Call it before any output is created; :func:`run_job` and
    :func:`scheduler_client` call it too. ``--gpu`` on this machine needs CuPy, a
    visible GPU and (for the local GPU cluster, not ``--no-cluster``) dask-cuda; with
    ``--scheduler`` the cluster's workers compute, and are checked when it is reached.
    """
    from streamem.dist.cluster import check_gpu

    if getattr(args, "gpu", False) and not getattr(args, "scheduler", None):
        check_gpu(need_dask_cuda=not getattr(args, "no_cluster", False))


@contextmanager
def scheduler_client(args) -> Iterator:
    """A client on ``args.scheduler`` (checked, within ``--scheduler-timeout``), a local
    GPU cluster with ``--gpu`` (commands with :func:`add_gpu_option`), or None (threads)."""
    from streamem.dist.cluster import check_cluster_options, client_for

    if getattr(args, "gateway", None):  # the gateway's workers compute (dist/gateway.py)
        from streamem.dist.gateway import gateway_client_for_args

        with gateway_client_for_args(args) as client:
            yield client
        return
    check_execution(args)
    gpu = getattr(args, "gpu", False)
    if not args.scheduler and not gpu:
        yield None
        return
    check_cluster_options(None, None, args.scheduler_timeout)
    with client_for(
        args.scheduler,
        gpu=gpu,
        scheduler_timeout_s=args.scheduler_timeout,
        security=security_for(args) if args.scheduler else None,
        dashboard_address=getattr(args, "dashboard_address", None),
    ) as client:
        yield client


def add_cluster_options(p) -> None:
    """Options shared by every Dask job."""
    g = p.add_argument_group("execution")
    _add_scheduler_arguments(g)
    g.add_argument(
        "--n-workers", type=int, default=None, help="local workers (default: one per core)"
    )
    g.add_argument("--threads-per-worker", type=int, default=1, help="threads of each worker")
    g.add_argument(
        "--gpu",
        action="store_true",
        help="compute on GPUs with CuPy: a dask-cuda cluster, one worker per visible GPU "
        "(CUDA_VISIBLE_DEVICES); with --no-cluster, this process's GPU",
    )
    g.add_argument(
        "--no-cluster", action="store_true", help="run in this process on threads (no dashboard)"
    )
    g.add_argument(
        "--adapt",
        metavar="MIN:MAX",
        help="an adaptive local cluster: between MIN and MAX workers as the load asks "
        "(instead of --n-workers)",
    )
    _add_dashboard_argument(g)


def run_job(args, job):
    """``job(client)`` as the execution options ask: threads with --no-cluster, else a cluster.

    The options are checked first, so a bad one is refused before any cluster starts.
    """
    from streamem.dist.cluster import check_cluster_options, run_with_client
    from streamem.errors import InputError

    if getattr(args, "gateway", None):  # a new dask-gateway cluster (dist/gateway.py)
        from streamem.dist.gateway import run_on_gateway

        return run_on_gateway(args, job)
    check_cluster_options(args.n_workers, args.threads_per_worker, args.scheduler_timeout)
    if args.scheduler and args.no_cluster:
        raise InputError(None, "give --scheduler or --no-cluster, not both")
    adapt = None
    if getattr(args, "adapt", None):
        from streamem.dist.cluster import check_adapt, parse_adapt

        for flag, given in (
            ("--scheduler", args.scheduler),
            ("--no-cluster", args.no_cluster),
            ("--n-workers", args.n_workers),
        ):
            if given:
                raise InputError(None, f"give --adapt or {flag}, not both")
        adapt = parse_adapt(args.adapt)
        check_adapt(adapt, args.gpu)
    check_execution(args)
    security = security_for(args) if args.scheduler else None
    return run_with_client(
        job,
        use_cluster=not args.no_cluster,
        scheduler=args.scheduler,
        n_workers=args.n_workers,
        threads_per_worker=args.threads_per_worker,
        gpu=args.gpu,
        scheduler_timeout_s=args.scheduler_timeout,
        security=security,
        dashboard_address=getattr(args, "dashboard_address", None),
        adapt=adapt,
    )


def add_continue_option(parser) -> None:
    """``--continue``: resume an iterative job (refine3d, class3d, class2d)."""
    parser.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="resume the run in --out after its newest complete iteration (an unreadable "
        "newest checkpoint falls back to the one before). The same store and options are "
        "needed; safe to change: --iterations and the execution options "
        "(the first iteration's --seed/--no-random-seeds/--perturbation are ignored)",
    )
