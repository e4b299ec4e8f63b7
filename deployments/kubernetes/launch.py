"""Start streamem's DaskCluster from Python (dask-kubernetes operator, KubeCluster).

    pip install "streamem[kubernetes]"
    python deployments/kubernetes/launch.py --workers 4 --image REGISTRY/streamem:0.1.0
    python deployments/kubernetes/launch.py --gpus 1 --image REGISTRY/streamem-cuda:0.1.0 \
        --name streamem-gpu --memory 32Gi
    python deployments/kubernetes/launch.py --print > cluster.yaml   # the manifest only

The spec is ``dask_kubernetes.operator.make_cluster_spec``'s, made into the one of
``daskcluster.yaml`` (``daskcluster-gpu.yaml`` with ``--gpus``): current
distributed's ``dask scheduler``/``dask worker`` (make_cluster_spec still writes
``dask-scheduler``), TLS from the ``streamem-tls`` Secret, the store's PVC on
``/data``, streamem's worker environment, the scheduler's HTTP API routes for the
operator's graceful retirement, and with GPUs ``dask cuda worker`` with
``nvidia.com/gpu`` limits on GPU nodes. tests/test_deploy_kubernetes.py checks that
the two give the same resource and that both validate against the operator's CRDs.
"""

from __future__ import annotations

import argparse

TLS_DIR = "/etc/streamem/tls"
#: streamem's worker environment (streamem.dist.cluster): malloc settings, one BLAS thread.
WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**30),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
#: distributed's default scheduler routes plus its HTTP API (the operator retires through it).
HTTP_ROUTES = [
    "distributed.http.scheduler.prometheus",
    "distributed.http.scheduler.info",
    "distributed.http.scheduler.json",
    "distributed.http.health",
    "distributed.http.proxy",
    "distributed.http.statics",
    "distributed.http.scheduler.api",
]
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}


def _env(pairs: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


def _tls_args() -> list[str]:
    return ["--tls-ca-file", f"{TLS_DIR}/ca.crt", "--tls-cert", f"{TLS_DIR}/tls.crt",
            "--tls-key", f"{TLS_DIR}/tls.key"]  # fmt: skip


def _volumes(claim: str, secret: str) -> tuple[list[dict], list[dict]]:
    mounts = [{"name": "data", "mountPath": "/data"},
              {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}]  # fmt: skip
    volumes = [
        {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "tls", "secret": {"secretName": secret, "defaultMode": 0o400}},
    ]
    return mounts, volumes


def cluster_spec(
    name: str = "streamem",
    image: str = "streamem:0.1.0",
    n_workers: int = 2,
    cores: int = 4,
    memory: str = "16Gi",
    gpus: int = 0,
    claim: str = "streamem-data",
    tls_secret: str = "streamem-tls",
    node_selector: dict[str, str] | None = None,
) -> dict:
    """The ``DaskCluster`` resource (a dict) for streamem; see the module docstring.

    cores, memory: each worker pod's (requests = limits; the Dask worker gets 1 GiB
    less than the pod for its own overhead). gpus: ``nvidia.com/gpu`` per worker pod
    (``dask cuda worker``, pods on ``node_selector``, default the GPU operator's label).
    """
    from dask_kubernetes.operator import make_cluster_spec

    spec = make_cluster_spec(
        name=name, image=image, n_workers=n_workers, worker_command="dask worker"
    )
    spec["metadata"]["labels"] = {"app.kubernetes.io/name": "streamem"}
    mounts, volumes = _volumes(claim, tls_secret)
    encryption = {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}

    worker = spec["spec"]["worker"]["spec"]
    (w,) = worker["containers"]
    limit_gib = int(memory.removesuffix("Gi")) - 1
    w["args"] = (["dask", "cuda", "worker"] if gpus else ["dask", "worker"]) + [
        f"tls://{name}-scheduler:8786", "--name", "$(DASK_WORKER_NAME)",
        "--nthreads", str(cores), "--memory-limit", f"{limit_gib}GiB",
        "--dashboard-address", "8788", *_tls_args(),
    ]  # fmt: skip
    pre_spawn = "{" + ", ".join(f"'{k}': '{v}'" for k, v in WORKER_ENV.items()) + "}"
    w["env"] = _env(
        {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": pre_spawn, **WORKER_ENV, **encryption}
    )
    pod = {"cpu": str(cores), "memory": memory}
    if gpus:
        pod["nvidia.com/gpu"] = str(gpus)
    w["resources"] = {"requests": dict(pod), "limits": dict(pod)}
    w["volumeMounts"] = mounts
    w["imagePullPolicy"] = "IfNotPresent"
    worker["volumes"] = volumes
    if gpus:
        worker["nodeSelector"] = dict(node_selector or GPU_NODE_SELECTOR)
        worker["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]

    scheduler = spec["spec"]["scheduler"]
    (s,) = scheduler["spec"]["containers"]
    s["args"] = ["dask", "scheduler", "--host", "0.0.0.0", "--protocol", "tls", "--port", "8786",
                 "--dashboard-address", ":8787", *_tls_args()]  # fmt: skip
    s["env"] = _env(
        {
            "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": repr(HTTP_ROUTES),
            **encryption,
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": f"{TLS_DIR}/ca.crt",
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": f"{TLS_DIR}/tls.crt",
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": f"{TLS_DIR}/tls.key",
        }
    )
    s["resources"] = {
        "requests": {"cpu": "1", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    }
    s["volumeMounts"] = mounts
    s["imagePullPolicy"] = "IfNotPresent"
    for port in s["ports"] + scheduler["service"]["ports"]:
        if port["name"] == "tcp-comm":  # the comm port speaks TLS only
            port["name"] = "tls-comm"
        if port.get("targetPort") == "tcp-comm":
            port["targetPort"] = "tls-comm"
    scheduler["spec"]["volumes"] = volumes
    return spec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", default="streamem")
    p.add_argument("--image", default="streamem:0.1.0", help="built from deployments/docker")
    p.add_argument("--workers", type=int, default=2, help="worker pods (2)")
    p.add_argument("--adapt", metavar="MIN:MAX", help="adapt between MIN and MAX pods instead")
    p.add_argument("--cores", type=int, default=4, help="cores per worker pod (4)")
    p.add_argument("--memory", default="16Gi", help="memory per worker pod, in Gi (16Gi)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per worker pod")
    p.add_argument("--claim", default="streamem-data", help="the store's PVC (storage.yaml)")
    p.add_argument(
        "--tls-secret", default="streamem-tls", help="Secret with ca.crt, tls.crt, tls.key"
    )
    p.add_argument("--namespace", help="(the current context's)")
    p.add_argument("--print", action="store_true", help="print the manifest; start nothing")
    args = p.parse_args(argv)
    spec = cluster_spec(
        args.name, args.image, args.workers, args.cores, args.memory, args.gpus,
        args.claim, args.tls_secret,
    )  # fmt: skip
    if args.print:
        import yaml

        print(yaml.safe_dump(spec, sort_keys=False))
        return
    from dask_kubernetes.operator import KubeCluster

    # the cluster outlives this script: delete it with `kubectl delete daskcluster NAME`
    cluster = KubeCluster(
        custom_cluster_spec=spec, namespace=args.namespace, shutdown_on_close=False
    )
    if args.adapt:
        low, high = (int(n) for n in args.adapt.split(":"))
        cluster.adapt(minimum=low, maximum=high)
    print(f"DaskCluster {args.name}: scheduler tls://{args.name}-scheduler:8786 in the cluster")
    print(
        f"  kubectl exec deploy/{args.name}-scheduler -- streamem ... --scheduler tls://{args.name}-scheduler:8786"
    )


if __name__ == "__main__":
    main()
