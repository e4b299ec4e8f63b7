"""deployments/slurm: the SLURMCluster launcher, on a real single-node SLURM.

The session fixture starts munged, slurmctld and slurmd (Debian's ``slurm-wlm`` and
``munge``, as root, no cgroups) with a minimal ``slurm.conf`` for this host on
loopback, and a small refine3d runs through ``SLURMCluster`` with TLS: its map must
equal a run on local threads. Without root or the binaries the SLURM tests skip
with the reason (.ci/run installs them).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _launcher():
    spec = importlib.util.spec_from_file_location(
        "streamem_slurm_launch", REPO / "deployments" / "slurm" / "launch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """``NodeName=... CPUs=... RealMemory=...`` of this host, as slurmd measures it."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    return line + " NodeAddr=127.0.0.1 State=UNKNOWN"


def _slurm_conf(root: Path, node: str, munge_socket: Path) -> str:
    name = node.split()[0].split("=", 1)[1]
    return f"""\
ClusterName=streamemtest
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{node}
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""


def _wait(predicate, timeout_s: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs if p.exists())
    raise RuntimeError(f"{what} within {timeout_s:.0f} s\n{tails}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node SLURM (partition ``debug``); SLURM_CONF set for its clients."""
    if os.geteuid() != 0:
        pytest.skip("a test SLURM needs root (slurmd runs jobs as their users)")
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM binaries missing: {missing} (apt-get install slurm-wlm munge)")
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)  # munged refuses sockets in group/world-writable folders
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.socket"
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, _node_line(), munge_socket))
    env = dict(os.environ, SLURM_CONF=str(conf))
    logs = [root / "munged.log", root / "slurmctld.log", root / "slurmd.log"]
    started: list[Path] = []
    try:
        subprocess.run(
            ["munged", "--force", f"--socket={munge_socket}", f"--key-file={key}",
             f"--log-file={root / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
             f"--seed-file={root / 'munge' / 'munged.seed'}"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        started.append(root / "munged.pid")
        # -i: ignore a stale state; both daemonise and write their pid files
        subprocess.run(["slurmctld", "-i", "-f", str(conf)], env=env, check=True, timeout=30)
        started.append(root / "slurmctld.pid")
        subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True, timeout=30)
        started.append(root / "slurmd.pid")

        def idle() -> bool:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True
            ).stdout
            return out.strip() == "idle"

        _wait(idle, 60, "the SLURM node did not become idle", logs)
    except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
        _stop(started)
        pytest.skip(f"could not start a test SLURM: {str(exc)[:2000]}")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(conf))
    yield root
    mp.undo()
    subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
    _stop(started)


def _stop(pid_files: list[Path]) -> None:
    """SIGTERM each daemon we started (newest first) and wait for it to exit."""
    for pid_file in reversed(pid_files):
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 15)
        except (OSError, ValueError, IndexError):
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)


def test_slurm_starts(slurm):
    out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True)
    assert out.stdout.split() == ["debug*", "idle"]


# -- a refine3d through SLURMCluster -------------------------------------------------------

BOX, PIXEL, N = 24, 4.0, 100


def _tls_files(folder: Path) -> tuple[str, str, str]:
    """A CA and one certificate/key pair (PEM files) from distributed's temporary ones."""
    from distributed.security import Security

    temporary = Security.temporary()
    paths = []
    for name, pem in (
        ("ca.pem", temporary.tls_ca_file),
        ("cert.pem", temporary.tls_client_cert),
        ("key.pem", temporary.tls_client_key),
    ):
        (folder / name).write_text(pem)
        (folder / name).chmod(0o600)
        paths.append(str(folder / name))
    return tuple(paths)


REFINE_ARGS = ["--healpix-order", "1", "--offset-range", "3", "--offset-step", "1.5",
               "--max-iterations", "2"]  # fmt: skip


def _refine(store: Path, root: Path, out: str, *execution: str) -> np.ndarray:
    """``streamem refine3d`` as a user types it; the final map."""
    from streamem.cli import main
    from streamem.io.mrc import read_map

    args = ["refine3d", str(store), "--ref", str(root / "ref.mrc"), "--out", str(root / out)]
    assert main(args + REFINE_ARGS + list(execution)) == 0
    return read_map(root / out / "run_class001.mrc")[0]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A small simulated store, its 30 Å reference and refine3d's map on local threads."""
    from streamem.core.filters import lowpass
    from streamem.io.mrc import read_map, write_map
    from streamem.simulate.particles import simulate_particles, truth_volume_paths

    root = tmp_path_factory.mktemp("slurm-refine")
    store = simulate_particles(
        root / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=0.2, seed=3,
        chunk_size=50, max_shift_A=4.0,
    )  # fmt: skip
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    write_map(root / "ref.mrc", lowpass(truth, 30.0, PIXEL), PIXEL)
    return root, Path(store.path), _refine(Path(store.path), root, "local", "--no-cluster")


def test_job_script_has_what_streamem_needs(tmp_path):
    """Walltime, account, partition, interface, GPUs, TLS and the worker environment."""
    from distributed.security import Security

    launch = _launcher()
    cluster = launch.make_cluster(
        cores=8, memory="32GB", walltime="12:00:00", account="lab", partition="gpu",
        interface="lo", gpus=2, security=Security.temporary(),
        shared_temp_directory=str(tmp_path),
    )  # fmt: skip
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://")
    finally:
        cluster.close()
    for directive in ("-t 12:00:00", "-A lab", "-p gpu", "--gres=gpu:2", "--mem=30G"):
        assert f"#SBATCH {directive}" in script, directive
    command = script.strip().splitlines()[-1]
    assert " -m dask cuda worker tls://" in command
    assert "--interface lo" in command and "--tls-ca-file" in command
    assert "--nthreads 4" in command  # 8 cores over one worker per GPU
    assert "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=" in script
    assert "export MALLOC_MMAP_THRESHOLD_=1073741824" in script


def test_launcher_worker_env_is_the_local_clusters():
    """The launcher's worker environment is what streamem's own LocalCluster workers get."""
    from streamem.dist.cluster import client_for

    launch = _launcher()
    with client_for(n_workers=1) as client:
        env = next(iter(client.run(lambda: dict(os.environ)).values()))
    assert {k: env.get(k) for k in launch.WORKER_ENV} == launch.WORKER_ENV


def test_refine3d_through_slurm_equals_local(slurm, small_run, tmp_path):
    """A real SLURM job runs the workers (TLS, loopback); the map equals the local run's."""
    from distributed import Client

    from streamem.core.fsc import fsc

    root, store, local_map = small_run
    ca, cert, key = _tls_files(tmp_path)
    launch = _launcher()
    cluster = launch.make_cluster(
        cores=2, processes=2, memory="4GB", walltime="00:10:00", account="streamem-test",
        partition="debug", interface="lo", security=launch.security_from_files(ca, cert, key),
        log_directory=str(tmp_path / "logs"),
    )  # fmt: skip
    try:
        cluster.scale(jobs=1)
        with Client(cluster, security=cluster.security) as client:
            client.wait_for_workers(2, timeout=90)
            client.write_scheduler_file(str(tmp_path / "scheduler.json"))
            envs = client.run(lambda: {k: os.environ.get(k) for k in launch.WORKER_ENV})
            assert all(e == launch.WORKER_ENV for e in envs.values()), envs
            jobs = subprocess.run(
                ["squeue", "-h", "-o", "%a %P %l %T"], capture_output=True, text=True
            ).stdout.split()
            assert jobs == ["streamem-test", "debug", "10:00", "RUNNING"], jobs
            # the client's side of TLS: streamem's own options, as a user gives them
            slurm_map = _refine(
                store, root, "slurm", "--scheduler", str(tmp_path / "scheduler.json"),
                "--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key,
            )  # fmt: skip
    finally:
        cluster.close()
    curve = fsc(local_map, slurm_map)
    assert np.min(curve[1 : BOX // 2]) > 0.999, curve
