"""TLS by default: the job's cluster refuses clients without its certificate.

A local cluster (``client_for``, what every job uses) listens on ``tls://`` only and
its dashboard on 127.0.0.1; the job's own client computes, while a plain client, a
``tcp://`` client and a client with another CA's certificate are refused. A remote
TLS cluster (real ``dask scheduler`` and ``dask worker`` processes with certificates
from ``streamem cluster certs``) runs ``reconstruct --scheduler tls://...`` with
``--tls-*`` and gives the threaded map; every wrong certificate is one line, exit 2,
within ``--scheduler-timeout``.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamem.bench.chaos import LoopbackCluster
from streamem.cli import main
from streamem.errors import InputError
from streamem.io.mrc import read_map


def _add(a, b):
    return a + b


#: Another process on the machine: connects without the job's certificate, and would
#: run code on the job's workers if that worked.
_OTHER_PROCESS = """
from distributed import Client
from distributed.security import Security
try:
    client = {attempt}
except BaseException as exc:
    print("REFUSED", type(exc).__name__)
else:
    print("RAN CODE", client.submit(sum, [1, 2]).result())
"""


def test_a_plain_client_is_refused_and_the_jobs_own_client_works():
    from distributed.security import Security

    from streamem.dist.cluster import client_for, connect_scheduler

    with client_for(n_workers=1) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert client.submit(_add, 1, 2).result() == 3  # the job's own client works

        # anyone on the machine can read the address (the dashboard shows it); other
        # processes try it without the job's certificate, one per way of trying
        attempts = {
            "no certificate": f"Client({address!r}, timeout=3)",
            "tcp://": f"Client({address.replace('tls://', 'tcp://')!r}, timeout=3)",
            "another CA": f"Client({address!r}, security=Security.temporary(), timeout=3)",
        }
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-c", _OTHER_PROCESS.format(attempt=attempt)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for name, attempt in attempts.items()
        }
        for name, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:  # hanging is refused too: no client came back
                proc.kill()
                out = proc.communicate()[0] + "REFUSED (hung)"
            assert "RAN CODE" not in out and "REFUSED" in out, (name, out)

        # ... and streamem's own --scheduler says why in one line, at once
        for target, security, words in [
            (address, None, "needs TLS settings"),
            (address.replace("tls://", "tcp://"), None, "the scheduler speaks TLS"),
            (address, Security.temporary(), "not signed by"),
        ]:
            t0 = time.monotonic()
            with pytest.raises(InputError) as err:
                connect_scheduler(target, 10, security)
            assert words in err.value.one_line(), err.value.one_line()
            assert time.monotonic() - t0 < 10
        assert client.submit(_add, 2, 3).result() == 5  # the refusals changed nothing


def test_cluster_certs_makes_a_ca_and_certificates_it_signed(capsys, tmp_path):
    from cryptography import x509

    folder = tmp_path / "certs"
    assert main(["cluster", "certs", str(folder), "--hostname", "10.0.0.5"]) == 0
    assert "dask scheduler --protocol tls" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    for role in ("scheduler", "worker", "client"):
        cert = x509.load_pem_x509_certificate((folder / f"{role}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)  # raises if not signed by the CA
        assert stat.S_IMODE((folder / f"{role}-key.pem").stat().st_mode) == 0o600
        assert f"{role}.pem" in (folder / f"dask-tls-{role}.yaml").read_text()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.5" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    before = (folder / "ca.pem").read_bytes()
    assert main(["cluster", "certs", str(folder)]) == 2  # never overwrites a CA
    assert "not overwriting" in capsys.readouterr().err
    assert (folder / "ca.pem").read_bytes() == before


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A TLS ``dask scheduler`` + one ``dask worker`` on loopback, and a small store."""
    root = tmp_path_factory.mktemp("tls")
    store = root / "s.zarr"
    argv = ["simulate", str(store), "--n-particles", "40", "--box", "16", "--chunk-size", "20"]
    assert main([*argv, "--seed", "1"]) == 0
    assert main(["cluster", "certs", str(root / "certs")]) == 0
    assert main(["cluster", "certs", str(root / "other")]) == 0  # another cluster's CA
    cluster = LoopbackCluster(root / "cluster", certs=root / "certs")
    try:
        cluster.add_worker()
        yield cluster, store, root
    finally:
        cluster.close()


def _tls(folder: Path, role: str = "client") -> list[str]:
    return ["--tls-ca-file", str(folder / "ca.pem"), "--tls-cert", str(folder / f"{role}.pem")] + [
        "--tls-key",
        str(folder / f"{role}-key.pem"),
    ]


def test_a_remote_tls_cluster_with_the_clients_certificate(capsys, remote, tmp_path):
    cluster, store, root = remote
    want = tmp_path / "threads.mrc"
    assert main(["reconstruct", str(store), "--truth", "--out", str(want), "--no-cluster"]) == 0
    got = tmp_path / "tls.mrc"
    argv = ["reconstruct", str(store), "--truth", "--out", str(got), "--scheduler"]
    rc = main([*argv, cluster.address, *_tls(root / "certs"), "--scheduler-timeout", "60"])
    assert rc == 0, capsys.readouterr().err
    a, _ = read_map(got)
    b, _ = read_map(want)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("no certificates", "needs TLS settings"),
        ("another CA", "not signed by"),
        ("tcp to TLS", "the scheduler speaks TLS: use tls://"),
        ("tcp with certificates", "use tls://"),
        ("the worker's key for the client's certificate", "not a usable certificate and key"),
        ("a missing key", "--tls-key missing"),
    ],
)
def test_wrong_certificates_are_one_line_within_the_deadline(capsys, remote, tmp_path, case, words):
    cluster, store, root = remote
    tls, tcp = cluster.address, cluster.address.replace("tls://", "tcp://")
    mine, other = root / "certs", root / "other"
    scheduler, extra = {
        "no certificates": (tls, []),
        "another CA": (tls, _tls(other)),
        "tcp to TLS": (tcp, []),
        "tcp with certificates": (tcp, _tls(mine)),
        "the worker's key for the client's certificate": (
            tls,
            _tls(mine)[:4] + ["--tls-key", str(mine / "worker-key.pem")],
        ),
        "a missing key": (tls, _tls(mine)[:4]),
    }[case]
    out = tmp_path / "m.mrc"
    argv = ["reconstruct", str(store), "--truth", "--out", str(out), "--scheduler", scheduler]
    t0 = time.monotonic()
    rc = main([*argv, *extra, "--scheduler-timeout", "5"])
    seconds = time.monotonic() - t0
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert words in lines[0], lines[0]
    assert seconds < 5 + 4, seconds
    assert not out.exists()


def test_gpu_cluster_options_carry_tls_and_the_dashboard_address():
    from streamem.dist.cluster import gpu_cluster_options
    from streamem.dist.security import local_security

    security = local_security()
    options = gpu_cluster_options(security=security, dashboard_address="127.0.0.1:8800")
    assert options["security"] is security and security.require_encryption
    assert options["dashboard_address"] == "127.0.0.1:8800"
    assert gpu_cluster_options()["dashboard_address"] == "127.0.0.1:0"
