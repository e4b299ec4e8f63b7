"""Execution options shared by every Dask job's command, and running a job with them."""

from __future__ import annotations


def add_cluster_options(p) -> None:
    """Options shared by every Dask job."""
    g = p.add_argument_group("execution")
    g.add_argument("--scheduler", help="address or scheduler file of an existing Dask cluster")
    g.add_argument(
        "--n-workers", type=int, default=None, help="local workers (default: one per core)"
    )
    g.add_argument("--threads-per-worker", type=int, default=1)
    g.add_argument(
        "--gpu", action="store_true", help="run on GPUs with dask-cuda (one worker per GPU)"
    )
    g.add_argument(
        "--no-cluster", action="store_true", help="run in this process on threads (no dashboard)"
    )


def run_job(args, job):
    """``job(client)`` as the execution options ask: threads with --no-cluster, else a cluster."""
    from streamem.dist.cluster import run_with_client

    return run_with_client(
        job,
        use_cluster=not args.no_cluster,
        scheduler=args.scheduler,
        n_workers=args.n_workers,
        threads_per_worker=args.threads_per_worker,
        gpu=args.gpu,
    )


def add_continue_option(parser) -> None:
    """``--continue``: resume an iterative job (refine3d, class3d, class2d)."""
    parser.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="resume the run in --out after its newest complete iteration",
    )
