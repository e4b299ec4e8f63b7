"""A dask-gateway server for streamem on one host (its local backend).

    pip install dask-gateway-server "streamem[gateway]"
    STREAMEM_GATEWAY_PASSWORD=... dask-gateway-server -f deployments/gateway/dask_gateway_config.py

Users then run any streamem job on a cluster of their own:

    export DASK_GATEWAY__AUTH__TYPE=basic DASK_GATEWAY__AUTH__KWARGS__PASSWORD=...
    streamem refine3d particles.zarr --ref ref.mrc --out run \
        --gateway http://127.0.0.1:8000 --gateway-workers 4 --gateway-option worker_cores=2

Environment read here (all optional):
``STREAMEM_GATEWAY_ADDRESS`` (the proxy: HTTP API, dashboards and the schedulers' TLS
route, default ``127.0.0.1:8000``),
``STREAMEM_GATEWAY_PASSWORD`` (the shared password of the simple authenticator; without
it any password is accepted, so set it), ``STREAMEM_GATEWAY_HOST`` (where schedulers and
workers listen, default ``127.0.0.1``: this host only), ``STREAMEM_GATEWAY_MAX_CORES``.

Security: the gateway makes a TLS certificate per cluster; every scheduler and
worker accepts only TLS connections with it, and the client gets it from the gateway
(``cluster.security``), so no other process can use a user's cluster. The local
backend runs each cluster as the user who asked for it (the server runs as root);
for other hosts use dask-gateway's Kubernetes or jobqueue backends with the same
``ClusterConfig`` settings.
"""

# ruff: noqa: F821  (``c`` is the traitlets config object dask-gateway-server provides)
import os
import sys

from dask_gateway_server.backends.local import LocalBackend, UnsafeLocalBackend
from dask_gateway_server.options import Float, Integer, Options

#: streamem's worker environment (streamem.dist.cluster: one malloc arena, 1 GiB thresholds, one
#: BLAS thread per worker); through the nanny, which would otherwise set its own.
WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**30),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
HOST = os.environ.get("STREAMEM_GATEWAY_HOST", "127.0.0.1")
MAX_CORES = int(os.environ.get("STREAMEM_GATEWAY_MAX_CORES", str(os.cpu_count() or 1)))


class StreamemLocalBackend(LocalBackend if os.geteuid() == 0 else UnsafeLocalBackend):
    """The local backend with schedulers and workers on ``HOST`` (its default: 0.0.0.0).

    As root, clusters run as their users (LocalBackend); otherwise as the server's user
    (UnsafeLocalBackend: one user, no separation, for a personal gateway or a test).
    """

    default_host = HOST

    def set_file_permissions(self, paths, username):
        # dask-gateway-server 2026.3's setup_working_directory adds the certificate's
        # path with paths.extend(path), i.e. one character at a time ("/", "t", ...):
        # give the user its folders and the two certificate files instead
        folders = [p for p in paths if len(p) > 1]
        super().set_file_permissions(folders + list(self._get_tls_paths(folders[0])), username)


ADDRESS = os.environ.get("STREAMEM_GATEWAY_ADDRESS", "127.0.0.1:8000")
# the public proxy serves the HTTP API, the dashboards and the schedulers' TLS route on
# one port (dask-gateway's default, so a client needs only the URL); the private API
# server listens on a free loopback port, and clusters call it back through the proxy
c.Proxy.address = ADDRESS
c.DaskGateway.address = "127.0.0.1:0"
c.Backend.api_url = f"http://{ADDRESS}/api"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = os.environ.get("STREAMEM_GATEWAY_PASSWORD", "")
c.DaskGateway.backend_class = StreamemLocalBackend

# current distributed has `dask scheduler`/`dask worker` (no dask-scheduler entry point);
# the server's own Python, so its environment's streamem is what the workers import
c.ClusterConfig.scheduler_cmd = [sys.executable, "-m", "dask", "scheduler"]
c.ClusterConfig.worker_cmd = [sys.executable, "-m", "dask", "worker"]
c.ClusterConfig.environment = {
    **WORKER_ENV,
    "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": repr(WORKER_ENV),
}
c.ClusterConfig.idle_timeout = 3600.0  # a cluster nobody uses for an hour is stopped


def _options_handler(options):
    """The user's choices as ClusterConfig fields (one thread per core: single-threaded tasks)."""
    return {
        "worker_cores": options.worker_cores,
        "worker_threads": options.worker_cores,
        "worker_memory": int(options.worker_memory_GiB * 2**30),
    }


c.Backend.cluster_options = Options(
    Integer("worker_cores", default=1, min=1, max=MAX_CORES, label="cores per worker"),
    Float("worker_memory_GiB", default=2.0, min=0.5, max=256.0, label="memory per worker (GiB)"),
    handler=_options_handler,
)
