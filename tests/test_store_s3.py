"""Particle stores on object storage, against a local S3 server on loopback (moto).

``streamem import`` writes ``s3://bucket/p.zarr`` (``--storage-options`` JSON), the
store reads back every image as the local import's, ``refine3d`` (two iterations, the least it runs) reads it on a local
cluster whose workers open their chunks from S3 themselves (they inherit the fsspec
configuration), and its first iteration equals the run from the local store. A remote
output is replaced only with ``--overwrite`` and only if streamem wrote it.
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile

pytest.importorskip("s3fs", reason="s3fs is in the test extra (pip install -e '.[test]')")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")

from streamem.cli import main  # noqa: E402
from streamem.io.store import ParticleStore  # noqa: E402

BUCKET = "cryo"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a free port), a bucket, and the options to reach it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    import boto3

    boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    yield options
    server.stop()


@pytest.fixture
def fsspec_conf(monkeypatch):
    """Keep --storage-options from leaking into other tests (it configures the process)."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    monkeypatch.setenv("FSSPEC_S3", "{}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata service


@pytest.fixture(scope="module")
def relion(tmp_path_factory):
    """A simulated set written as RELION STAR + MRCS, and its truth map."""
    root = tmp_path_factory.mktemp("s3data")
    argv = ["simulate", str(root / "sim.zarr"), "--n-particles", "32", "--box", "16"]
    argv += ["--pixel-size", "5", "--snr", "1", "--seed", "4", "--relion", str(root / "relion")]
    assert main(argv) == 0
    return root / "relion" / "particles.star", root / "sim_truth_class001.mrc"


def test_import_refine_from_s3_equals_local(s3, fsspec_conf, relion, tmp_path, capsys):
    star, truth = relion
    opts = ["--storage-options", json.dumps(s3)]
    url = f"s3://{BUCKET}/p.zarr"
    assert main(["import", str(star), url, "--chunk-size", "16", "--shard-size", "32", *opts]) == 0
    assert main(["import", str(star), str(tmp_path / "p.zarr"), "--chunk-size", "16"]) == 0

    remote, local = ParticleStore(url), ParticleStore(tmp_path / "p.zarr")
    assert str(remote.path) == url and remote.shard_size == 32
    np.testing.assert_array_equal(remote.read_chunk(0, 32).images, local.read_chunk(0, 32).images)
    assert remote.read_table().keys() == local.read_table().keys()
    assert not (tmp_path / "s3:").exists()  # nothing written locally under a mangled URL

    # the same refinement (tasks on threads: each opens the URL and reads its chunk)
    common = ["--ref", str(truth), "--max-iterations", "2", "--ini-high", "20", "--no-cluster"]
    assert main(["refine3d", url, "--out", str(tmp_path / "r_s3"), *common, *opts]) == 0
    assert main(["refine3d", str(local.path), "--out", str(tmp_path / "r_local"), *common]) == 0
    for half in (1, 2):
        name = f"run_it001_half{half}_class001_unfil.mrc"
        with (
            mrcfile.open(tmp_path / "r_s3" / name) as a,
            mrcfile.open(tmp_path / "r_local" / name) as b,
        ):
            np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6 * np.abs(b.data).max())
    a = starfile.read(tmp_path / "r_s3" / "run_it001_data.star")["particles"]
    b = starfile.read(tmp_path / "r_local" / "run_it001_data.star")["particles"]
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"):
        np.testing.assert_allclose(a[label].to_numpy(), b[label].to_numpy(), atol=1e-6)


def _worker_reads(url: str, start: int, stop: int):
    import os

    return os.getpid(), ParticleStore(url).read_chunk(start, stop).images


def test_a_cluster_worker_reads_its_chunk_from_s3(s3, fsspec_conf, relion, tmp_path):
    """A worker process (started after --storage-options configured this one) opens the
    URL itself with the inherited fsspec configuration."""
    import os

    from streamem.dist.cluster import client_for
    from streamem.io.importer import import_particles
    from streamem.io.store_url import configure_storage

    configure_storage(s3)
    url = f"s3://{BUCKET}/w.zarr"
    store = import_particles(relion[0], url, chunk_size=16, progress=False)
    with client_for(n_workers=1, threads_per_worker=1) as client:
        pid, images = client.submit(_worker_reads, url, 16, 32).result(timeout=120)
    assert pid != os.getpid()
    np.testing.assert_array_equal(images, store.read_chunk(16, 32).images)


def test_remote_output_safety(s3, fsspec_conf, relion, capsys):
    import s3fs

    star, _ = relion
    opts = ["--storage-options", json.dumps(s3)]
    url = f"s3://{BUCKET}/again.zarr"
    assert main(["import", str(star), url, *opts]) == 0
    capsys.readouterr()
    assert main(["import", str(star), url, *opts]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output exists" in err[0], err
    assert main(["import", str(star), url, "--overwrite", *opts]) == 0
    assert ParticleStore(url).n_particles == 32

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    fs.pipe_file(f"{BUCKET}/theirs.zarr/zarr.json", b"{}")  # somebody else's data
    capsys.readouterr()
    assert main(["import", str(star), f"s3://{BUCKET}/theirs.zarr", "--overwrite", *opts]) == 2
    assert "not written by streamem" in capsys.readouterr().err
    assert fs.cat_file(f"{BUCKET}/theirs.zarr/zarr.json") == b"{}"

    capsys.readouterr()
    assert main(["info", f"s3://{BUCKET}/missing.zarr", *opts]) == 2
    assert "particle store not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's one line
        main(["import", str(star), url, "--storage-options", "[1]"])
    assert exit_.value.code == 2
    assert "--storage-options must be a JSON object" in capsys.readouterr().err
