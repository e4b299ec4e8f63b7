"""deployments/kubernetes: every manifest validates against the dask-kubernetes
operator's CRD schemas (the YAML files shipped in the installed package, checked with
jsonschema as strictly as the API server prunes: an unknown field is an error), the
references between the manifests hold, and the Python launcher's spec (built on
``make_cluster_spec``) is the manifests' resource."""

from __future__ import annotations

import copy
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
dask_kubernetes = pytest.importorskip("dask_kubernetes")

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "deployments" / "kubernetes"


def _strict(schema: dict, top: bool = True) -> dict:
    """No unknown fields below the top level, as the API server's pruning would drop them."""
    if isinstance(schema, dict):
        if (
            not top
            and schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value, False)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value, False)
    return schema


@pytest.fixture(scope="module")
def crds() -> dict[str, tuple[str, jsonschema.Draft7Validator]]:
    """kind -> (apiVersion, validator) from the CRD files inside the dask-kubernetes package."""
    root = Path(dask_kubernetes.__file__).parent
    files = sorted(root.glob("**/crds/*.yaml"))
    assert files, f"no CRD YAML files under {root}"
    out = {}
    for path in files:
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        (version,) = [v for v in crd["spec"]["versions"] if v.get("served", True)]
        schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        out[kind] = (f"{group}/{version['name']}", jsonschema.Draft7Validator(schema))
    assert {"DaskCluster", "DaskAutoscaler", "DaskWorkerGroup"} <= set(out)
    return out


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(FOLDER.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _launcher():
    spec = importlib.util.spec_from_file_location("streamem_kube_launch", FOLDER / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _validate(crds, resource: dict) -> list[str]:
    api_version, validator = crds[resource["kind"]]
    errors = [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(resource)]
    if resource["apiVersion"] != api_version:
        errors.append(f"apiVersion {resource['apiVersion']} != {api_version}")
    return errors


def test_every_manifest_validates_against_the_operators_crds(crds):
    docs = _manifests()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["DaskAutoscaler", "DaskCluster", "DaskCluster", "PersistentVolumeClaim"]
    for name, doc in docs:
        if doc["kind"] in crds:
            assert _validate(crds, doc) == [], name


def test_the_strict_schema_catches_typos_and_wrong_types(crds):
    (doc,) = [d for n, d in _manifests() if n == "daskcluster.yaml"]
    bad = copy.deepcopy(doc)
    bad["spec"]["worker"]["replicas"] = "2"
    bad["spec"]["worker"]["spec"]["containers"][0]["volumeMount"] = []
    errors = _validate(crds, bad)
    assert len(errors) == 2 and "'2' is not of type 'integer'" in errors[0] + errors[1]


def test_manifests_refer_to_each_other():
    """Claims, Secret, scheduler service, autoscaler target; TLS everywhere; current CLIs."""
    docs = [d for _, d in _manifests()]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    clusters = {d["metadata"]["name"]: d for d in docs if d["kind"] == "DaskCluster"}
    assert set(clusters) == {"streamem", "streamem-gpu"}
    (autoscaler,) = [d for d in docs if d["kind"] == "DaskAutoscaler"]
    assert autoscaler["spec"]["cluster"] in clusters
    # the autoscaled cluster starts inside the autoscaler's range, and never scales to 0
    # workers (a run would stall with its tasks unassigned)
    low, high = autoscaler["spec"]["minimum"], autoscaler["spec"]["maximum"]
    replicas = clusters[autoscaler["spec"]["cluster"]]["spec"]["worker"]["replicas"]
    assert low >= 1 and low <= replicas <= high and high > low
    dask_cli = {ep.name for ep in entry_points(group="dask_cli")}
    assert {"scheduler", "worker"} <= dask_cli  # `dask scheduler`, `dask worker` exist here
    for name, cluster in clusters.items():
        service = cluster["spec"]["scheduler"]["service"]
        assert service["selector"]["dask.org/cluster-name"] == name
        for role in ("worker", "scheduler"):
            pod = cluster["spec"][role]["spec"]
            (container,) = pod["containers"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["data"]["persistentVolumeClaim"]["claimName"] in claims
            assert volumes["tls"]["secret"]["secretName"] == "streamem-tls"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/data", "/etc/streamem/tls"} <= mounts
            args = container["args"]
            assert args[0] == "dask" and "--tls-ca-file" in args and "--tls-key" in args
        worker_args = cluster["spec"]["worker"]["spec"]["containers"][0]["args"]
        assert f"tls://{name}-scheduler:8786" in worker_args
        assert cluster["spec"]["scheduler"]["spec"]["containers"][0]["args"][:2] == [
            "dask",
            "scheduler",
        ]
    gpu = clusters["streamem-gpu"]["spec"]["worker"]["spec"]
    assert gpu["containers"][0]["args"][:3] == ["dask", "cuda", "worker"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nvidia.com/gpu" not in str(clusters["streamem"]["spec"]["worker"])


def test_scheduler_http_routes_are_distributeds_plus_its_api():
    """The operator's graceful retirement needs distributed.http.scheduler.api."""
    import ast

    import dask
    import distributed  # noqa: F401  (loads distributed's config defaults)

    default = dask.config.get("distributed.scheduler.http.routes")
    for _, doc in _manifests():
        if doc["kind"] != "DaskCluster":
            continue
        env = {
            e["name"]: e["value"] for e in doc["spec"]["scheduler"]["spec"]["containers"][0]["env"]
        }
        routes = ast.literal_eval(env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"])
        assert routes == default + ["distributed.http.scheduler.api"]
        for module in routes:
            assert importlib.util.find_spec(module) is not None, module


def test_worker_environment_is_streamems():
    import ast

    sys_launch = importlib.util.spec_from_file_location(
        "streamem_slurm_launch_k8s", REPO / "deployments" / "slurm" / "launch.py"
    )
    slurm = importlib.util.module_from_spec(sys_launch)
    sys_launch.loader.exec_module(slurm)
    for _, doc in _manifests():
        if doc["kind"] != "DaskCluster":
            continue
        env = {e["name"]: e["value"] for e in doc["spec"]["worker"]["spec"]["containers"][0]["env"]}
        assert (
            ast.literal_eval(env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"]) == slurm.WORKER_ENV
        )
        assert {k: env[k] for k in slurm.WORKER_ENV} == slurm.WORKER_ENV


def test_launcher_spec_is_the_manifests(crds):
    """make_cluster_spec made into streamem's: the same resource as each YAML file."""
    launch = _launcher()
    docs = {n: d for n, d in _manifests() if d["kind"] == "DaskCluster"}
    cpu = launch.cluster_spec()
    gpu = launch.cluster_spec(
        name="streamem-gpu", image="streamem-cuda:0.1.0", n_workers=1, memory="32Gi", gpus=1
    )
    assert cpu == docs["daskcluster.yaml"]
    assert gpu == docs["daskcluster-gpu.yaml"]
    assert _validate(crds, cpu) == [] and _validate(crds, gpu) == []
    # and options reach the resource
    big = launch.cluster_spec(name="em", n_workers=8, cores=16, memory="64Gi")
    (w,) = big["spec"]["worker"]["spec"]["containers"]
    assert big["spec"]["worker"]["replicas"] == 8 and "tls://em-scheduler:8786" in w["args"]
    assert w["resources"]["limits"] == {"cpu": "16", "memory": "64Gi"}
    assert w["args"][w["args"].index("--memory-limit") + 1] == "63GiB"
    assert _validate(crds, big) == []


def test_launcher_prints_the_manifest(capsys):
    launch = _launcher()
    launch.main(["--print", "--workers", "3"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kind"] == "DaskCluster" and printed["spec"]["worker"]["replicas"] == 3
