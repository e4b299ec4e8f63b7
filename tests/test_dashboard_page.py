"""The streamem page on the Dask dashboard: its HTML from the event log's messages, the
scheduler plugin before any run, and a small refine3d watched in headless Chromium."""

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

from streamem.bench.chaos import stop_processes
from streamem.core.filters import lowpass
from streamem.dist import dashboard_page
from streamem.dist.cluster import client_for
from streamem.dist.dashboard import announce_page, page_link, publish_iteration
from streamem.dist.dashboard_payload import downsample, iteration_payload, png_base64
from streamem.dist.dashboard_server import DashboardPlugin
from streamem.em.refine import RefineOptions, refine3d
from streamem.io.mrc import read_map
from streamem.simulate.particles import simulate_particles, truth_volume_paths

BOX, PIXEL, N, CHUNK = 24, 5.0, 200, 50
FAST = RefineOptions(max_iterations=2, healpix_order=1, offset_range_px=2.0, offset_step_px=1.0)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _message(run, iteration, resolution_A, fractions=(1.0,), job="refine3d", png=None):
    shells = np.arange(BOX // 2 + 1)
    return {
        "run": run,
        "job": job,
        "iteration": iteration,
        "pixel_size_A": PIXEL,
        "box_size": BOX,
        "n_particles": N,
        "row": {
            "iteration": iteration,
            "resolution_A": resolution_A,
            "angular_step_deg": 15.0,
            "local": False,
            "pose_change_deg": 3.5,
            "offset_change_px": 0.25,
            "classes_changed": None if len(fractions) == 1 else 0.125,
            "class_sizes": list(fractions),
            "box": BOX,
            "seconds": 4.0,
            "phase_seconds": {"coarse": 1.5, "mstep": 0.5},
        },
        "fsc": {
            "frequency_per_A": (shells / (BOX * PIXEL)).tolist(),
            "curves": {"gold-standard": np.exp(-shells / 4.0).tolist()},
        },
        "images": [{"label": "map z", "png": png or png_base64(np.eye(8))}],
        "angdist": None,
    }


def test_page_state_and_html_from_messages():
    events = [
        (1.0, _message("/old", 1, 30.0)),
        (2.0, "not a streamem message"),
        (3.0, _message("/runs/<b>new</b>", 1, 20.0, (0.5, 0.5), job="class3d")),
        (4.0, _message("/runs/<b>new</b>", 2, 18.0, (0.6, 0.4), job="class3d")),
        (5.0, _message("/runs/<b>new</b>", 2, 16.5, (0.7, 0.3), job="class3d")),  # --continue
    ]
    progress = {"job": "class3d", "iteration": 3, "done": 2, "total": 4, "erred": 0}
    state = dashboard_page.page_state(events, progress)
    assert state["run"] == "/runs/<b>new</b>" and state["job"] == "class3d"
    assert [r["iteration"] for r in state["rows"]] == [1, 2]  # the old run is not in it
    assert state["rows"][1]["resolution_A"] == 16.5  # the republished iteration replaced
    body = dashboard_page.render_body(state)
    assert 'id="current-iteration">iteration 2<' in body
    assert 'id="resolution">16.50<' in body
    assert "<b>new</b>" not in body and "&lt;b&gt;new&lt;/b&gt;" in body  # escaped
    assert body.count("<tr>") == 3  # header + two iterations
    assert "<strong>2 / 4</strong> tasks done" in body
    assert '<svg id="fsc-plot"' in body and '<svg id="class-sizes"' in body
    # one FSC line with a point per shell; two class-size lines of two points each
    fsc_svg = body.split('<svg id="fsc-plot"')[1].split("</svg>")[0]
    points = fsc_svg.split('points="')[1].split('"')[0].split()
    assert len(points) == BOX // 2 + 1
    sizes_svg = body.split('<svg id="class-sizes"')[1].split("</svg>")[0]
    assert sizes_svg.count("<polyline") == 2
    assert body.count("data:image/png;base64,") == 1
    page = dashboard_page.render_page(state)
    assert (
        page.startswith("<!DOCTYPE html>")
        and "/fragment" in page
        and "http" not in (page.split("<script>")[1])
    )  # no CDN: the only script is inline and fetches relative to the page
    assert json.loads(dashboard_page.state_json(state))["latest"]["iteration"] == 2


def test_bad_image_text_is_not_embedded_and_empty_state_says_so():
    state = dashboard_page.page_state([(1.0, _message("/r", 1, 20.0, png='x" onerror="1'))])
    assert "onerror" not in dashboard_page.render_body(state)
    empty = dashboard_page.render_body(dashboard_page.page_state([]))
    assert dashboard_page.NO_RUN in empty and "current-iteration" not in empty


def test_downsample_is_a_block_mean():
    image = np.arange(300 * 260, dtype=np.float32).reshape(300, 260)
    small = downsample(image, 128)  # blocks of 3 x 3
    assert small.shape == (100, 86)
    assert small[1, 2] == pytest.approx(image[3:6, 6:9].mean())


def _fake_iteration(tmp_path, state, model, n_with_previous=0.0):
    """iteration_payload's keywords for a run without results on disk (no poses)."""
    ctx = SimpleNamespace(out_dir=tmp_path / "run", results_path=tmp_path / "none.zarr",
                          box_size=BOX, pixel_size_A=PIXEL,
                          store=SimpleNamespace(n_particles=N))  # fmt: skip
    stats = SimpleNamespace(n_with_previous=n_with_previous, pose_change_deg_sum=30.0,
                            offset_change_A_sum=20.0)  # fmt: skip
    return dict(ctx=ctx, iteration=3, state=state, model=model, stats=stats,
                phase_seconds={"mstep": np.float64(0.5)}, changed=0.25, seconds=2.0)  # fmt: skip


def test_payloads_of_class3d_and_class2d(tmp_path):
    rng = np.random.default_rng(0)
    K = 2
    class3d = {
        "resolution_A": 20.0,
        "fractions": np.array([0.75, 0.25]),
        "fsc": rng.random((K, BOX // 2 + 1)),
        "maps": rng.random((K, BOX, BOX, BOX)),
    }
    grid = SimpleNamespace(fine_angular_step_deg=7.5, local_sigma_deg=None)
    model = SimpleNamespace(grid=grid, work_box=20, pixel_size_A=PIXEL)
    payload = iteration_payload("class3d", **_fake_iteration(tmp_path, class3d, model, 10.0))
    msgpack.packb(payload)  # plain data only (Client.log_event refuses anything else)
    row = payload["row"]
    assert row["angular_step_deg"] == 7.5 and row["class_sizes"] == [0.75, 0.25]
    assert row["pose_change_deg"] == 3.0 and row["offset_change_px"] == pytest.approx(0.4)
    assert row["classes_changed"] == 0.25 and row["box"] == 20
    assert list(payload["fsc"]["curves"]) == ["class 1", "class 2"]
    assert [i["label"] for i in payload["images"]] == [f"class {k} {a}" for k in (1, 2)
                                                        for a in "zyx"]  # fmt: skip
    assert payload["angdist"] is None  # no results on disk
    class2d = {"resolution_A": 25.0, "fractions": np.array([0.5, 0.3, 0.2]),
               "class_images": rng.random((3, BOX, BOX))}  # fmt: skip
    model2d = SimpleNamespace(psi_deg=np.arange(0, 360, 10.0), box_size=BOX)
    payload = iteration_payload("class2d", **_fake_iteration(tmp_path, class2d, model2d))
    assert payload["row"]["angular_step_deg"] == 10.0 and payload["fsc"] is None
    assert payload["row"]["pose_change_deg"] is None  # no previous poses
    assert [i["label"] for i in payload["images"]] == ["class 1 50.0%", "class 2 30.0%",
                                                       "class 3 20.0%"]  # fmt: skip
    html = dashboard_page.render_body(dashboard_page.page_state([(1.0, payload)]))
    assert "class averages" in html and html.count("data:image/png;base64,") == 3
    halves = rng.random((2, BOX, BOX, BOX))
    refine = {"resolution_A": 30.0, "halves": halves, "fsc": rng.random(BOX // 2 + 1)}
    payload = iteration_payload("refine3d", **_fake_iteration(tmp_path, refine, model, 10.0))
    assert [i["label"] for i in payload["images"]] == ["map z", "map y", "map x"]
    assert payload["images"][1]["png"] == png_base64(halves.mean(axis=0)[:, BOX // 2])
    assert list(payload["fsc"]["curves"]) == ["gold-standard"]


def test_plugin_counts_chunks_and_publishing_never_breaks_the_run(tmp_path, caplog):
    plugin = DashboardPlugin()
    token = "0123456789ab"
    for start in (0, 50, 100):
        plugin.transition(f"refine3d-estep-it002-{start}-{token}", "released", "waiting",
                          stimulus_id="s")  # fmt: skip
    plugin.transition(f"refine3d-estep-it002-0-{token}", "processing", "memory", stimulus_id="s")
    plugin.transition(f"statistics-sum-refine3d-estep-it002-0-0-{token}", "processing", "memory")
    plugin.transition(("refine3d-estep-it002", 0), "processing", "memory")
    assert plugin.progress() == {"job": "refine3d", "iteration": 2, "done": 1, "total": 3,
                                 "erred": 0}  # fmt: skip
    assert plugin.state()["run"] is None  # no scheduler: no events
    first, second = _message("/r", 1, 20.0), _message("/r", 2, 18.0)
    for message in (first, second):
        plugin.log_event(dashboard_page.TOPIC, message)
    assert first["images"] == [] and first["row"]["iteration"] == 1  # the row stays
    assert len(second["images"]) == 1  # only the newest message keeps its images

    class Broken:
        dashboard_link = "http://127.0.0.1:1/status"

        def register_plugin(self, plugin):
            raise ModuleNotFoundError("No module named 'streamem'")

        def log_event(self, topic, message):
            raise OSError("scheduler gone")

    assert announce_page(Broken()) is False
    assert "install streamem in the scheduler's environment" in caplog.text
    publish_iteration(None, "refine3d")  # no client: nothing to do, nothing built
    grid = SimpleNamespace(fine_angular_step_deg=15.0, local_sigma_deg=None)
    facts = _fake_iteration(tmp_path, {"resolution_A": 30.0}, SimpleNamespace(grid=grid))
    publish_iteration(Broken(), "refine3d", **facts)
    assert "iteration not published (OSError: scheduler gone)" in caplog.text


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _chromium(*args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
         *args],
        capture_output=True, text=True, timeout=90, check=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster_client():
    with client_for(n_workers=1, threads_per_worker=1, memory_limit="2GiB") as client:
        yield client


def test_page_before_any_run(cluster_client):
    url = page_link(cluster_client)
    assert url.endswith("/streamem") and url.startswith("http://127.0.0.1:")
    assert dashboard_page.NO_RUN in _get(url)
    assert json.loads(_get(url + "/state.json"))["run"] is None


def test_page_on_a_remote_scheduler(tmp_path):
    """A scheduler in another process (``dask scheduler``, as on a cluster) gets the
    plugin from the job's client and serves what the client publishes."""
    scheduler_file = tmp_path / "scheduler.json"
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
         "--port", "0", "--dashboard-address", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        with client_for(scheduler=str(scheduler_file), scheduler_timeout_s=60) as client:
            url = page_link(client)
            assert dashboard_page.NO_RUN in _get(url)
            assert client.run_on_scheduler(lambda dask_scheduler: "streamem-dashboard" in
                                           dask_scheduler.plugins)  # fmt: skip
            client.log_event(dashboard_page.TOPIC, _message("/remote/run", 1, 21.0))
            body = _get(url)
            assert 'id="current-iteration">iteration 1<' in body and "/remote/run" in body
    finally:
        stop_processes(scheduler)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_refine3d_page_in_chromium(cluster_client, tmp_path):
    store = simulate_particles(tmp_path / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=0.3,
                               seed=3, chunk_size=CHUNK, max_shift_A=3.0)  # fmt: skip
    ref = lowpass(read_map(truth_volume_paths(store.path)[0])[0], 30.0, PIXEL)
    url = page_link(cluster_client)
    seen, running = [], threading.Event()
    running.set()

    def watch():  # the page's state while the run runs
        while running.is_set():
            seen.append(json.loads(_get(url + "/state.json")))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = refine3d(store, ref, tmp_path / "run", FAST, client=cluster_client)
    finally:
        running.clear()
        watcher.join()
    n_chunks = N // CHUNK
    live = [s["progress"] for s in seen if s["progress"]]
    assert live and all(p["total"] == n_chunks and p["job"] == "refine3d" for p in live)
    assert any(s["latest"] and s["latest"]["iteration"] == 1 for s in seen)  # before the end
    final = json.loads(_get(url + "/state.json"))
    assert final["progress"] == {"job": "refine3d", "iteration": result.iterations,
                                 "done": n_chunks, "total": n_chunks, "erred": 0}  # fmt: skip
    assert [r["iteration"] for r in final["rows"]] == list(range(1, result.iterations + 1))

    dom = _chromium("--dump-dom", url, tmp_path=tmp_path).stdout
    assert f'id="current-iteration">iteration {result.iterations}<' in dom
    assert f'id="resolution">{result.resolution_A:.2f}<' in dom
    fsc_svg = dom.split('<svg id="fsc-plot"')[1].split("</svg>")[0]
    assert len(fsc_svg.split('points="')[1].split('"')[0].split()) == BOX // 2 + 1
    assert dom.count("data:image/png;base64,") == 4  # three sections and the distribution
    assert f"{N} of {N} particles" in dom  # every pose binned (rot wrapped to ±180°)
    assert f"{n_chunks} / {n_chunks}</strong> tasks done" in dom
    shot = tmp_path / "page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,1600", url, tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_class3d_page_in_chromium(cluster_client, tmp_path):
    """class3d on the page: per-class sections, the class-sizes plot with one line per
    class, the iteration and the table, as rendered by headless Chromium."""
    from streamem.em.classify3d import Class3DOptions, classify3d

    store = simulate_particles(tmp_path / "p.zarr", N, box_size=BOX, pixel_size_A=PIXEL, snr=0.3,
                               seed=4, chunk_size=CHUNK, max_shift_A=3.0)  # fmt: skip
    ref = lowpass(read_map(truth_volume_paths(store.path)[0])[0], 30.0, PIXEL)
    options = Class3DOptions(n_classes=2, iterations=2, healpix_order=1, offset_range_px=2.0,
                             offset_step_px=1.0, seed=0)  # fmt: skip
    result = classify3d(store, ref, tmp_path / "class3d", options, client=cluster_client)
    url = page_link(cluster_client)
    final = json.loads(_get(url + "/state.json"))
    assert final["job"] == "class3d" and len(final["rows"]) == result.iterations
    sizes = final["rows"][-1]["class_sizes"]
    assert len(sizes) == 2 and sum(sizes) == pytest.approx(1.0, abs=1e-3)
    dom = _chromium("--dump-dom", url, tmp_path=tmp_path).stdout
    assert f'id="current-iteration">iteration {result.iterations}<' in dom
    lines = dom.split('<svg id="class-sizes"')[1].split("</svg>")[0]
    assert lines.count("<polyline") == 2  # one line per class
    slices = dom.split('<div id="map-slices">')[1].split("</div>")[0]
    assert slices.count("data:image/png;base64,") == 2 * 3  # three sections per class
    assert "class 1" in slices and "class 2" in slices
    shot = tmp_path / "class3d.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,1600", url, tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
