"""Start a SLURM-backed Dask cluster for streamem jobs (dask-jobqueue) and keep it up.

    pip install "streamem[slurm]"
    python deployments/slurm/launch.py --jobs 4 --cores 16 --memory 64GB \
        --walltime 08:00:00 --account mylab --partition cpu --interface ib0 \
        --scheduler-file ~/streamem-scheduler.json &
    streamem refine3d particles.zarr --ref ref.mrc --out run --scheduler ~/streamem-scheduler.json

The scheduler runs in this process (on the login or submit node); each SLURM job
runs ``--processes`` Dask workers with ``cores / processes`` threads each (the E-step
task is single-threaded by design, so one process per core is the default). With
``--gpus N`` each job asks ``--gres=gpu:N`` and runs ``dask cuda worker`` (one
worker per GPU, computing with CuPy: streamem's ``--gpu``). With ``--tls-ca-file``,
``--tls-cert`` and ``--tls-key`` the scheduler and workers talk TLS only
(``distributed.security.Security``, ``tls://`` addresses); the client then needs the
same CA and a certificate of its own (Dask config ``distributed.comm.tls.*``).

Worker environment: the malloc settings and one BLAS thread per worker that
``streamem.dist.cluster`` gives its local workers, set through Dask's
``distributed.nanny.pre-spawn-environ`` (a plain ``export`` is not enough: the nanny
would overwrite ``MALLOC_TRIM_THRESHOLD_`` with its own 64 KiB, which made the E-step
2-3x slower).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

#: The worker environment of streamem's local clusters (streamem.dist.cluster.client_for:
#: one malloc arena and 1 GiB thresholds, streamem.dist.allocator, measured by
#: ``streamem bench refine-memory --allocator``).
WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**30),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
#: dask-jobqueue's default walltime is 30 minutes: too short for a refinement.
DEFAULT_WALLTIME = "08:00:00"


def job_prologue(worker_env: dict[str, str] = WORKER_ENV) -> list[str]:
    """Shell lines run in each job before the workers start (the nanny's environment)."""
    environ = "{" + ", ".join(f"'{k}': '{v}'" for k, v in worker_env.items()) + "}"
    # Dask reads DASK_* variables as Python literals: this one is a dict
    lines = [f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{environ}"']
    lines += [f"export {k}={v}" for k, v in worker_env.items()]  # the job shell itself
    return lines


def security_from_files(ca_file: str, cert: str, key: str):
    """A TLS-only ``Security`` whose scheduler, worker and client use one certificate."""
    from distributed.security import Security

    for name, path in (("--tls-ca-file", ca_file), ("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise SystemExit(f"{name} {path}: no such file")
    return Security(
        tls_ca_file=ca_file,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
        tls_client_cert=cert,
        tls_client_key=key,
        require_encryption=True,
    )


def make_cluster(
    cores: int = 16,
    memory: str = "64GB",
    processes: int | None = None,
    walltime: str = DEFAULT_WALLTIME,
    account: str | None = None,
    partition: str | None = None,
    interface: str | None = None,
    gpus: int = 0,
    security=None,
    log_directory: str | None = None,
    shared_temp_directory: str | None = None,
    job_extra_directives: list[str] | None = None,
):
    """A ``dask_jobqueue.SLURMCluster`` with streamem's worker settings (no jobs yet).

    cores, memory: per SLURM job. processes: Dask workers per job (default one per
    core, or one per GPU with ``gpus``). gpus: GPUs per job (``--gres=gpu:N``, workers
    are ``dask cuda worker``). security: a ``distributed.security.Security`` (TLS).
    """
    from dask_jobqueue import SLURMCluster

    if gpus < 0 or cores < 1:
        raise SystemExit("--cores must be at least 1 and --gpus at least 0")
    extra = list(job_extra_directives or [])
    options: dict = {}
    if gpus:
        extra.append(f"--gres=gpu:{gpus}")
        processes = gpus if processes is None else processes
        # python -m dask cuda worker: one worker per visible GPU (dask-cuda's CLI plugin)
        options["worker_command"] = "dask cuda worker"
    processes = cores if processes is None else processes
    if security is not None:
        options["security"] = security
        options["protocol"] = "tls://"
        if shared_temp_directory is not None:
            options["shared_temp_directory"] = shared_temp_directory
    return SLURMCluster(
        cores=cores,
        processes=processes,
        memory=memory,
        walltime=walltime,
        account=account,
        queue=partition,
        interface=interface,
        job_script_prologue=job_prologue(),
        job_extra_directives=extra,
        log_directory=log_directory,
        **options,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs (default 4)")
    p.add_argument("--adapt", metavar="MIN:MAX", help="adapt between MIN and MAX jobs instead")
    p.add_argument("--cores", type=int, default=16, help="cores per job (16)")
    p.add_argument("--processes", type=int, help="workers per job (one per core or GPU)")
    p.add_argument("--memory", default="64GB", help="memory per job (64GB)")
    p.add_argument("--walltime", default=DEFAULT_WALLTIME, help=f"({DEFAULT_WALLTIME})")
    p.add_argument("--account", help="SLURM account (--account)")
    p.add_argument("--partition", help="SLURM partition (--partition)")
    p.add_argument("--interface", help="network interface of scheduler and workers (ib0)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per job: --gres=gpu:N")
    p.add_argument("--tls-ca-file", help="CA certificate (PEM): TLS for every connection")
    p.add_argument("--tls-cert", help="certificate (PEM) of scheduler, workers, clients")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--log-directory", help="where SLURM writes the jobs' output")
    p.add_argument("--scheduler-file", default="scheduler.json", help="(scheduler.json)")
    args = p.parse_args(argv)
    tls = (args.tls_ca_file, args.tls_cert, args.tls_key)
    if any(tls) and not all(tls):
        raise SystemExit("give --tls-ca-file, --tls-cert and --tls-key together")
    cluster = make_cluster(
        cores=args.cores,
        memory=args.memory,
        processes=args.processes,
        walltime=args.walltime,
        account=args.account,
        partition=args.partition,
        interface=args.interface,
        gpus=args.gpus,
        security=security_from_files(*tls) if all(tls) else None,
        log_directory=args.log_directory,
    )
    if args.adapt:
        low, high = (int(n) for n in args.adapt.split(":"))
        cluster.adapt(minimum_jobs=low, maximum_jobs=high)
    else:
        cluster.scale(jobs=args.jobs)
    from distributed import Client

    client = Client(cluster, security=cluster.security)
    client.write_scheduler_file(args.scheduler_file)
    print(cluster.job_script())
    print("dashboard:", client.dashboard_link, "scheduler file:", args.scheduler_file)
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:  # Ctrl-C: cancel the jobs, remove the scheduler file
        Path(args.scheduler_file).unlink(missing_ok=True)
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
