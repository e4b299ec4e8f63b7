"""``streamem bench chaos``: refine3d while workers join, retire and die; the same map?

A real TLS cluster on loopback (:class:`LoopbackCluster`: ``dask scheduler`` and
``dask worker`` processes with certificates from
:func:`streamem.dist.security.make_certificates`) runs a small refine3d once on a
fixed set of workers (the reference map), then once per seeded moment with one worker
SIGKILLed when that many E-step tasks have finished (:class:`ChaosDriver`; a new
worker replaces it, as an autoscaler would). Each run's final map is compared with the
reference: bit-identical, or FSC against it. The design makes it bit-identical (the
model is a recomputable task, tasks are pure and the tree sum has a fixed order:
:mod:`streamem.dist.iteration`), so anything else is a finding.

``tests/test_elastic.py`` uses the same pieces for the full script: 1 -> 3 workers,
one retired gracefully and one SIGKILLed at seeded moments.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DASK = str(Path(sys.executable).with_name("dask"))
#: In every E-step task key (streamem.em.engine: "refine3d-estep-it001-<start>-<token>").
ESTEP_MARK = "estep-it"


def write_certificates(folder: Path) -> Path:
    """A CA and scheduler/worker/client certificates in ``folder`` (keys mode 0600)."""
    from streamem.dist.security import make_certificates

    folder.mkdir(parents=True, exist_ok=True)
    for name, pem in make_certificates("streamem-chaos", ("127.0.0.1",)).items():
        path = folder / name
        path.write_bytes(pem)
        if name.endswith("-key.pem"):
            path.chmod(0o600)
    return folder


class LoopbackCluster:
    """``dask scheduler`` + ``dask worker`` processes on 127.0.0.1, TLS only.

    Workers run without a nanny (a SIGKILL ends the worker for good, as when a spot
    instance vanishes) and with streamem's worker environment (one BLAS thread), so
    every worker computes a chunk bit for bit like every other.
    """

    def __init__(self, folder: Path, certs: Path | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.certs = certs or write_certificates(self.folder / "certs")
        self.scheduler_file = self.folder / "scheduler.json"
        self.workers: dict[str, subprocess.Popen] = {}
        self._n_started = 0
        self.scheduler = self._spawn(
            [DASK, "scheduler", "--scheduler-file", str(self.scheduler_file)]
            + ["--host", "127.0.0.1", "--port", "0", "--protocol", "tls"]
            + ["--dashboard-address", "127.0.0.1:0"]
            + self._tls("scheduler")
        )
        deadline = time.monotonic() + 60
        while not self.scheduler_file.is_file():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the dask scheduler did not start")
            time.sleep(0.1)
        self.address = json.loads(self.scheduler_file.read_text())["address"]

    def _tls(self, role: str) -> list[str]:
        c = self.certs
        return ["--tls-ca-file", str(c / "ca.pem")] + [
            "--tls-cert",
            str(c / f"{role}.pem"),
            "--tls-key",
            str(c / f"{role}-key.pem"),
        ]

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        from streamem.dist.cluster import WORKER_ENV

        return subprocess.Popen(
            argv,
            cwd=self.folder,
            env=dict(os.environ, **WORKER_ENV),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def security(self):
        """The client's ``Security`` (the client certificate of this cluster's CA)."""
        from streamem.dist.security import client_security

        c = self.certs
        return client_security(c / "ca.pem", c / "client.pem", c / "client-key.pem")

    def add_worker(self) -> str:
        """Start one worker (1 thread); returns its name (``w1``, ``w2``, ...)."""
        self._n_started += 1
        name = f"w{self._n_started}"
        self.workers[name] = self._spawn(
            [DASK, "worker", self.address, "--name", name, "--nthreads", "1"]
            + ["--no-nanny", "--no-dashboard", "--host", "127.0.0.1"]
            + ["--memory-limit", "0"]
            + self._tls("worker")
        )
        return name

    def kill(self, name: str) -> None:
        """SIGKILL a worker: no goodbye to the scheduler, its data gone."""
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait()

    def alive(self) -> list[str]:
        return [n for n, p in self.workers.items() if p.poll() is None]

    def close(self) -> None:
        stop_processes(*self.workers.values(), self.scheduler)


def stop_processes(*procs: subprocess.Popen) -> None:
    """SIGTERM each process group started with ``start_new_session``, then SIGKILL those
    still alive after 20 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _count_estep_tasks(dask_scheduler=None) -> int:
    """On the scheduler: E-step tasks finished so far (all iterations)."""
    plugin = dask_scheduler.plugins.get(EstepCounter.name)
    return 0 if plugin is None else plugin.finished


try:
    from distributed.diagnostics.plugin import SchedulerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    SchedulerPlugin = object


class EstepCounter(SchedulerPlugin):
    """Counts E-step tasks that reached memory (recomputed ones count again)."""

    name = "streamem-estep-counter"

    def __init__(self) -> None:
        self.finished = 0

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "memory" and ESTEP_MARK in str(key):
            self.finished += 1


@dataclass(frozen=True)
class Event:
    """At ``after_tasks`` finished E-step tasks: ``action`` ("add", "retire", "kill")."""

    after_tasks: int
    action: str


def seeded_events(seed: int, n_tasks: int, actions: tuple[str, ...]) -> list[Event]:
    """``actions`` at sorted moments drawn (without repeats where possible) from
    ``[1, n_tasks - 2]`` finished E-step tasks, so each happens mid-run."""
    rng = np.random.default_rng(seed)
    span = np.arange(1, max(2, n_tasks - 1))
    moments = np.sort(rng.choice(span, size=len(actions), replace=len(actions) > len(span)))
    return [Event(int(m), a) for m, a in zip(moments, actions, strict=True)]


class ChaosDriver(threading.Thread):
    """Runs ``events`` against ``cluster`` while a job computes (its own client).

    ``log``: what happened, as (finished tasks, action, worker). The victim of a retire
    or a kill is drawn from the live workers with ``seed``.
    """

    def __init__(self, cluster: LoopbackCluster, events: list[Event], seed: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.events, self.rng = cluster, list(events), np.random.default_rng(seed)
        self.log: list[tuple[int, str, str]] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()
        from distributed import Client

        self.client = Client(cluster.address, security=cluster.security(), timeout="30s")
        self.client.register_plugin(EstepCounter(), name=EstepCounter.name)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)
        self.client.close()

    def run(self) -> None:
        try:
            while self.events and not self._halt.is_set():
                done = self.client.run_on_scheduler(_count_estep_tasks)
                if done >= self.events[0].after_tasks:
                    self._do(self.events.pop(0), done)
                else:
                    time.sleep(0.05)
        except BaseException as exc:  # reported by the caller, not lost in a thread
            self.error = exc

    def _do(self, event: Event, done: int) -> None:
        if event.action == "add":
            self.log.append((done, "add", self.cluster.add_worker()))
            return
        if event.action == "retire":
            # graceful: the scheduler moves the worker's unique data to another worker
            # first, so it needs one (workers added just before may still be starting)
            names = self._registered(at_least=2)
            victim = names[int(self.rng.integers(len(names)))]
            self.client.retire_workers(names=[victim], close_workers=True)
            self.cluster.workers[victim].wait(timeout=60)
        elif event.action == "kill":
            alive = sorted(self.cluster.alive())
            victim = alive[int(self.rng.integers(len(alive)))]
            self.cluster.kill(victim)
        else:
            raise ValueError(f"unknown action {event.action!r}")
        self.log.append((done, event.action, victim))

    def _registered(self, at_least: int, timeout_s: float = 60) -> list[str]:
        """Names of the workers the scheduler knows, once there are ``at_least``."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
            names = sorted(str(w["name"]) for w in workers)
            if len(names) >= at_least or time.monotonic() > deadline:
                return names
            time.sleep(0.1)


def toy_chunk(start: int, stop: int, model: dict) -> float:
    """A pure chunk task for the model-survival check (tests/test_elastic.py): sleeps
    ``model["seconds"]``, returns ``model["scale"] * sum(range(start, stop))``."""
    time.sleep(model["seconds"])
    return float(np.arange(start, stop, dtype=np.float64).sum() * model["scale"])


def wait_for_workers(client, n: int, timeout_s: float = 60) -> None:
    client.wait_for_workers(n, timeout=timeout_s)


@dataclass(frozen=True)
class ChaosData:
    """A small simulated store and starting map for refine3d."""

    store: Path
    reference: np.ndarray
    n_tasks: int


def make_data(folder: Path, n_particles: int, box: int, chunk_size: int, iterations: int):
    from streamem.core.filters import lowpass
    from streamem.io.mrc import read_map
    from streamem.simulate.particles import simulate_particles, truth_volume_paths

    pixel_size_A = 4.0
    store = simulate_particles(
        folder / "p.zarr",
        n_particles,
        box_size=box,
        pixel_size_A=pixel_size_A,
        snr=0.2,
        seed=7,
        chunk_size=chunk_size,
        max_shift_A=4.0,
    )
    truth, _ = read_map(truth_volume_paths(store.path)[0])
    n_chunks = -(-n_particles // chunk_size)
    return ChaosData(store.path, lowpass(truth, 30.0, pixel_size_A), n_chunks * iterations)


def refine_options(iterations: int):
    from streamem.em.refine import RefineOptions

    return RefineOptions(
        max_iterations=iterations, healpix_order=1, offset_range_px=3.0, offset_step_px=1.5
    )


def run_refine(data: ChaosData, out: Path, client, iterations: int) -> np.ndarray:
    """The final map of refine3d on ``client`` (B, B, B) float32."""
    from streamem.em.refine import refine3d

    return refine3d(data.store, data.reference, out, refine_options(iterations), client=client).map


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    """Bit-identical?, the smallest FSC over shells, the largest difference."""
    from streamem.core.fsc import fsc

    curve = np.asarray(fsc(got, want))
    return {
        "identical": bool(np.array_equal(got, want)),
        "min_fsc": float(curve[1:].min()),
        "max_abs_diff": float(np.abs(got - want).max()),
    }


def register_bench(bench_sub) -> None:
    from streamem.commands.execution import add_old_spelling

    p = bench_sub.add_parser(
        "chaos",
        help="refine3d on a TLS loopback cluster with a worker SIGKILLed at seeded moments",
        description=__doc__,
    )
    p.add_argument("--particles", type=int, default=100)
    p.add_argument("--box", type=int, default=24)
    p.add_argument("--chunk-size", type=int, default=10)
    p.add_argument("--iterations", type=int, default=2)
    a = p.add_argument(
        "--n-workers", dest="workers", type=int, default=2, help="workers during each run"
    )
    add_old_spelling(p, a, "--workers")
    p.add_argument("--moments", type=int, default=10, help="seeded kill moments (10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from streamem.dist.cluster import connect_scheduler

    with tempfile.TemporaryDirectory(prefix="streamem-chaos-") as tmp:
        root = Path(tmp)
        data = make_data(root, args.particles, args.box, args.chunk_size, args.iterations)
        cluster = LoopbackCluster(root / "cluster")
        try:
            for _ in range(args.workers):
                cluster.add_worker()
            client = connect_scheduler(cluster.address, 60, cluster.security())
            try:
                wait_for_workers(client, args.workers)
                t0 = time.perf_counter()
                want = run_refine(data, root / "fixed", client, args.iterations)
                fixed_s = time.perf_counter() - t0
                print(f"fixed cluster ({args.workers} workers): {fixed_s:.1f} s")
                same = 0
                for i in range(args.moments):
                    seed = args.seed + i
                    events = seeded_events(seed, data.n_tasks, ("kill",))
                    driver = ChaosDriver(cluster, events, seed)
                    t0 = time.perf_counter()
                    driver.start()
                    try:
                        got = run_refine(data, root / f"run{i}", client, args.iterations)
                    finally:
                        driver.stop()
                    if driver.error is not None:
                        raise driver.error
                    result = compare(got, want)
                    same += result["identical"]
                    print(
                        f"moment {i} (seed {seed}): {driver.log or 'no kill (run ended first)'}; "
                        f"identical={result['identical']} min FSC={result['min_fsc']:.6f} "
                        f"max |diff|={result['max_abs_diff']:.3g}; "
                        f"{time.perf_counter() - t0:.1f} s"
                    )
                    while len(cluster.alive()) < args.workers:  # the autoscaler's replacement
                        cluster.add_worker()
                    wait_for_workers(client, args.workers)
            finally:
                client.close()
        finally:
            cluster.close()
    print(f"same map (bit-identical) after the kill: {same} of {args.moments}")
    return 0 if same == args.moments else 1
