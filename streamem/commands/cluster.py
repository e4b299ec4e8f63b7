"""``streamem cluster certs DIR``: a CA and TLS certificates for a remote Dask cluster.

Writes ``ca.pem`` and, for each of scheduler, worker and client, ``ROLE.pem`` and
``ROLE-key.pem`` (keys readable by the owner only), plus ``ca-key.pem`` (to sign more
certificates later: keep it off the cluster) and one Dask config file per role,
``dask-tls-ROLE.yaml``, and prints the commands that use them::

    dask scheduler --protocol tls --tls-ca-file DIR/ca.pem --tls-cert DIR/scheduler.pem \
        --tls-key DIR/scheduler-key.pem
    dask worker tls://HOST:8786 --tls-ca-file DIR/ca.pem --tls-cert DIR/worker.pem \
        --tls-key DIR/worker-key.pem
    streamem refine3d ... --scheduler tls://HOST:8786 --tls-ca-file DIR/ca.pem \
        --tls-cert DIR/client.pem --tls-key DIR/client-key.pem

Every holder of a key signed by the CA can use the cluster: hand the client key only
to the cluster's users. An existing DIR with certificates in it is refused (one line,
exit 2) rather than overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from streamem.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("cluster", help="tools for remote Dask clusters (TLS certificates)")
    cluster_sub = p.add_subparsers(dest="cluster_command", metavar="TOOL")
    c = cluster_sub.add_parser(
        "certs",
        help="make a CA and scheduler/worker/client TLS certificates",
        description=__doc__,
    )
    c.add_argument("dir", help="folder for the PEM files (created; must not hold them yet)")
    c.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME|IP",
        help="a host name or IP of the scheduler/workers, put in their certificates "
        "(repeatable; distributed itself does not check names)",
    )
    c.add_argument("--name", default="streamem", help="the cluster's name in the certificates")
    c.add_argument("--days", type=int, default=365, help="validity in days (365)")
    c.set_defaults(func=run_certs)
    p.set_defaults(func=lambda args: p.print_help() or 1)


def run_certs(args) -> int:
    from streamem.dist.security import ROLES, dask_tls_config, make_certificates

    folder = Path(args.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(args.dir, "exists and is not a folder")
    files = make_certificates(args.name, tuple(args.hostname), args.days)
    taken = [name for name in files if (folder / name).exists()]
    if taken:
        raise InputError(args.dir, f"already holds {taken[0]}: not overwriting certificates")
    folder.mkdir(parents=True, exist_ok=True)
    for name, pem in files.items():
        path = folder / name
        private = name.endswith("-key.pem")
        # keys are created owner-only (never readable by others, not even briefly)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    for role in ROLES:
        (folder / f"dask-tls-{role}.yaml").write_text(dask_tls_config(folder, role))
    d = folder.resolve()
    print(f"CA and certificates in {d} (keys mode 600; keep ca-key.pem off the cluster)")
    print(
        f"  dask scheduler --protocol tls --tls-ca-file {d}/ca.pem "
        f"--tls-cert {d}/scheduler.pem --tls-key {d}/scheduler-key.pem"
    )
    print(
        f"  dask worker tls://HOST:8786 --tls-ca-file {d}/ca.pem "
        f"--tls-cert {d}/worker.pem --tls-key {d}/worker-key.pem"
    )
    print(
        f"  streamem COMMAND ... --scheduler tls://HOST:8786 --tls-ca-file {d}/ca.pem "
        f"--tls-cert {d}/client.pem --tls-key {d}/client-key.pem"
    )
    print(f"  (or DASK_CONFIG={d}/dask-tls-client.yaml instead of the --tls-* options)")
    return 0
