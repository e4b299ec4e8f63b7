"""``--gateway URL``: run a job on a new Dask cluster of a dask-gateway server.

A dask-gateway server (``deployments/gateway``) starts clusters for authenticated
users on its backend (local processes, Kubernetes, a job queue). With ``--gateway``
a job asks it for a cluster with the options given as ``--gateway-option NAME=VALUE``
(the server's options: ``streamem ... --gateway URL --gateway-option list`` prints
them), scales it to ``--gateway-workers N`` (or adapts between ``MIN:MAX``), runs on
it, and shuts the cluster down at the end, also when the job fails.

Credentials come from dask-gateway's own Dask config (never from the command line,
where other users could read them): ``gateway.auth.type`` (``basic``, ``kerberos``,
``jupyterhub``) and ``gateway.auth.kwargs``, e.g. ``DASK_GATEWAY__AUTH__TYPE=basic``
and ``DASK_GATEWAY__AUTH__KWARGS__PASSWORD=...``. Security: the gateway makes a TLS
certificate for each cluster and hands it only to its owner's client
(``cluster.security``); scheduler and workers accept no other connection.

Everything that can go wrong before the job starts (dask-gateway not installed, the
server unreachable, refused credentials, an unknown option or a bad value) is an
InputError: one line, exit 2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from streamem.errors import InputError

log = logging.getLogger("streamem")

#: How to get ``--gateway``'s client library.
GATEWAY_INSTALL = 'pip install "streamem[gateway]"'
#: Seconds to wait for the cluster's first worker (a cloud backend may pull images).
WORKER_START_TIMEOUT_S = 600.0


def add_gateway_arguments(group) -> None:
    """``--gateway``, ``--gateway-option`` and ``--gateway-workers`` on an argparse group."""
    group.add_argument(
        "--gateway",
        metavar="URL",
        help="run on a new cluster of this dask-gateway server (http://HOST:PORT); "
        "credentials from the Dask config (gateway.auth.*); shut down at the end",
    )
    group.add_argument(
        "--gateway-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a cluster option of the gateway (repeatable; 'list' prints them)",
    )
    group.add_argument(
        "--gateway-workers",
        default="2",
        metavar="N|MIN:MAX",
        help="workers of the gateway cluster: N, or adapt between MIN and MAX (2)",
    )


def parse_workers(text: str) -> tuple[int, int | None]:
    """``"4"`` -> (4, None) (scale); ``"1:8"`` -> (1, 8) (adapt). InputError otherwise."""
    where = f"--gateway-workers {text}"
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise InputError(where, "not a number of workers N nor a range MIN:MAX") from None
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0], None
    if len(parts) == 2 and 0 <= parts[0] <= parts[1] and parts[1] >= 1:
        return parts[0], parts[1]
    raise InputError(where, "need N >= 1, or MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")


def apply_options(cluster_options, pairs: list[str]) -> None:
    """Set ``NAME=VALUE`` pairs on dask-gateway ``Options``, each parsed as its default's type.

    The server validates (bounds, choices); a refused value, an unknown name or a pair
    without ``=`` is an InputError that lists what the server offers.
    """
    offered = ", ".join(f"{k}={cluster_options[k]!r}" for k in cluster_options)
    for pair in pairs:
        where = f"--gateway-option {pair}"
        name, sep, text = pair.partition("=")
        if not sep or name not in cluster_options:
            raise InputError(where, f"not one of the gateway's options ({offered or 'none'})")
        default = cluster_options[name]
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                value = text.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            elif isinstance(default, dict):
                value = json.loads(text)
            else:
                value = text
            cluster_options[name] = value
        except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise InputError(where, f"refused ({' '.join(str(exc).split())})") from None


@contextmanager
def gateway_client(
    url: str,
    option_pairs: list[str] = (),
    workers: str = "2",
    gpu: bool = False,
) -> Iterator:
    """A ``distributed.Client`` on a new cluster of the gateway at ``url``; shuts it down.

    option_pairs: ``NAME=VALUE`` cluster options; workers: ``N`` or ``MIN:MAX``
    (:func:`parse_workers`); gpu: the workers compute with CuPy (:class:`streamem.dist.device.DevicePlugin`).
    """
    minimum, maximum = parse_workers(workers)
    where = f"--gateway {url}"
    try:
        from dask_gateway import Gateway
    except ImportError:
        raise InputError(where, f"dask-gateway is not installed: {GATEWAY_INSTALL}") from None
    gateway = Gateway(url)  # auth: the Dask config's gateway.auth (module docstring)
    try:
        cluster_options = _ask(gateway.cluster_options, where)
        if list(option_pairs) == ["list"]:
            offered = ", ".join(f"{k}={cluster_options[k]!r}" for k in cluster_options)
            raise InputError(where, f"cluster options: {offered or 'none'}")
        apply_options(cluster_options, list(option_pairs))
        cluster = _ask(lambda: gateway.new_cluster(cluster_options), where)
        try:
            if maximum is None:
                cluster.scale(minimum)
            else:
                cluster.adapt(minimum=minimum, maximum=maximum)
            client = cluster.get_client(set_as_default=False)
            try:
                client.wait_for_workers(max(minimum, 1), timeout=WORKER_START_TIMEOUT_S)
                _prepare(client, gpu, where)
                log.info(
                    "dask-gateway cluster %s, dashboard %s", cluster.name, cluster.dashboard_link
                )
                yield client
            finally:
                client.close()
        finally:
            cluster.shutdown()
            close_gateway(cluster.gateway)  # the cluster's own Gateway: closed, for good
    finally:
        close_gateway(gateway)


def close_gateway(gateway) -> None:
    """Close a ``dask_gateway.Gateway`` once, for good.

    ``Gateway.__del__`` closes again, and with current distributed its stopped loop
    runner raises there ("Accessing the loop property while the loop is not running"),
    printed as an ignored exception at exit; without the runner ``__del__`` skips it.
    """
    if "_loop_runner" not in gateway.__dict__:
        return
    try:
        gateway.close()
    except RuntimeError:  # already closed (GatewayCluster.close closes its own Gateway)
        pass
    gateway.__dict__.pop("_loop_runner")


def _ask(call, where: str):
    """``call()`` against the gateway's HTTP API; its failures as one line."""
    import aiohttp

    try:
        return call()
    except aiohttp.ClientResponseError as exc:
        if exc.status in (401, 403):
            raise InputError(
                where,
                f"the gateway refused the credentials (HTTP {exc.status}): set gateway.auth "
                "in the Dask config (e.g. DASK_GATEWAY__AUTH__TYPE=basic and "
                "DASK_GATEWAY__AUTH__KWARGS__PASSWORD)",
            ) from None
        raise InputError(where, f"the gateway answered HTTP {exc.status} ({exc.message})") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(where, f"cannot reach the gateway ({text[:200]})") from None
    except ValueError as exc:  # a refused option (the server validates too)
        raise InputError(where, " ".join(str(exc).split())[:200]) from None


def _prepare(client, gpu: bool, where: str) -> None:
    from streamem.dist.quiet import quiet_input_errors

    quiet_input_errors(client)  # bad input in a task: one line, not a worker traceback
    if gpu:
        from streamem.dist.device import DevicePlugin

        try:
            client.register_plugin(DevicePlugin("cupy"))
        except ImportError:
            raise InputError(where, "--gpu: the gateway's workers cannot import CuPy") from None


def check_gateway_args(args) -> None:
    """Refuse ``--gateway`` with options that choose another cluster (InputError)."""
    for flag, given in (
        ("--scheduler", getattr(args, "scheduler", None)),
        ("--no-cluster", getattr(args, "no_cluster", False)),
        ("--n-workers", getattr(args, "n_workers", None)),
    ):
        if given:
            raise InputError(None, f"give --gateway or {flag}, not both")
    parse_workers(args.gateway_workers)


@contextmanager
def gateway_client_for_args(args) -> Iterator:
    """:func:`gateway_client` from a command's parsed ``--gateway*`` options."""
    check_gateway_args(args)
    with gateway_client(
        args.gateway,
        args.gateway_option,
        args.gateway_workers,
        getattr(args, "gpu", False),
    ) as client:
        yield client


def run_on_gateway(args, job):
    """``job(client)`` on a new gateway cluster (``--gateway``); the cluster is shut down."""
    with gateway_client_for_args(args) as client:
        return job(client)
