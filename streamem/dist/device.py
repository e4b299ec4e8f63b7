"""The model on this worker's device (GPU workers), or unchanged (CPU workers).

The chunk task calls :func:`model_on_device` before the E-step; the E-step then
follows the array namespace of the model's arrays (``core.backend.xp_of``).

How a worker knows its device: the GPU cluster (:func:`streamem.dist.cluster.client_for`
with ``gpu=True``) registers a :class:`DevicePlugin` on every worker. The plugin
names the array namespace of the worker's device (``"cupy"``) and holds the
worker's cache of converted models. A worker without the plugin (every CPU
cluster, an existing cluster reached without ``--gpu``) has no device: models come
back unchanged. On dask's threaded scheduler (``--no-cluster``) there is no worker;
the client chooses with :func:`use_device` (``--gpu --no-cluster``).

The cache: the model is scattered once per iteration, so every task of an
iteration on a worker receives the same Python object. The cache keys on that
object's identity (and holds a reference to it, so a freed model's ``id`` is never
taken for a new one): the first task of an iteration converts, the others reuse
the copy. Hashing the model's arrays (``dask.base.tokenize``) would also identify
it, but costs a pass over all of them per task: for a box-128 refine3d model (two
projectors, 127 MB) tokenize took 215 ms, the identity lookup 2 µs (one core of this
shared machine). One entry per worker: the previous iteration's device copy is dropped
before the new one is made, so device memory holds one model at a time. A model
embedded in every task instead of scattered is deserialised per task: it is then
converted per task (correct, only slower).

What is converted (:func:`to_device`): every NumPy array reachable through the
model's dataclass fields, tuples, lists and dicts (the projectors' Fourier data,
class images, 1/σ², priors, the search grid's arrays, a cache dict's contents),
except the fields a dataclass lists in a ``host_fields`` class attribute (arrays
its E-step needs on the host, such as indices for host-side bookkeeping). Scalars,
strings and objects of other types are kept as they are. The host model is never
modified: dataclasses get new instances through ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
from distributed import WorkerPlugin, get_worker

#: Name of the worker plugin (one per worker; registering again replaces it).
PLUGIN_NAME = "streamem-device"


def to_device(value: Any, xp: ModuleType) -> Any:
    """``value`` with every NumPy array in it converted by ``xp.asarray`` (module docstring).

    value: an array, a dataclass, a tuple/list/dict of these, or anything else (kept).
    xp: the target array namespace (``cupy``, or ``array_api_strict`` in tests).
    Returns the same object where nothing inside it is an array (no needless copies).
    """
    if isinstance(value, np.ndarray):
        return xp.asarray(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        host = set(getattr(type(value), "host_fields", ()))
        changes = {}
        for f in dataclasses.fields(value):
            if not f.init or f.name in host:
                continue
            old = getattr(value, f.name)
            new = to_device(old, xp)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, tuple | list):
        items = [to_device(v, xp) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        # always a new dict: a cache dict filled on the device must not be the host's
        return {k: to_device(v, xp) for k, v in value.items()}
    return value


class DeviceCache:
    """The device copy of the newest model seen by one worker (or one process).

    Thread-safe: a worker's threads may run several chunk tasks at once; one
    converts, the others wait for it. ``conversions`` and ``hits`` count calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._host: Any = None
        self._device: Any = None
        self.conversions = 0
        self.hits = 0

    def get(self, model: Any, convert: Callable[[Any], Any]) -> Any:
        """The device copy of ``model`` (``convert(model)`` the first time it is seen)."""
        with self._lock:
            if self._host is not None and self._host is model:
                self.hits += 1
                return self._device
            # drop the previous model's copy first: its device memory is freed (or back
            # in the pool) before the new copy is allocated
            self._host = self._device = None
            device = convert(model)
            self._host, self._device = model, device
            self.conversions += 1
            return device

    def clear(self) -> None:
        with self._lock:
            self._host = self._device = None


class DevicePlugin(WorkerPlugin):
    """Worker plugin: this worker computes on ``namespace``'s device (module docstring).

    namespace: the module name of the device's array namespace, ``"cupy"`` on GPU
    workers (``"array_api_strict"`` in tests). Imported on the worker at setup, so a
    worker without it fails to start the plugin with the ImportError.
    """

    name = PLUGIN_NAME

    def __init__(self, namespace: str = "cupy") -> None:
        self.namespace = namespace
        self.xp: ModuleType | None = None
        self.cache = DeviceCache()

    def setup(self, worker=None) -> None:
        self.xp = importlib.import_module(self.namespace)
        self.cache = DeviceCache()

    def teardown(self, worker=None) -> None:
        self.cache.clear()

    def __getstate__(self) -> dict:
        # only the namespace's name travels to the workers
        return {"namespace": self.namespace}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["namespace"])


# the process's own device, for dask's threaded scheduler (set by the client)
_process_lock = threading.Lock()
_process_device: tuple[ModuleType, DeviceCache] | None = None


@contextmanager
def use_device(namespace: str | None) -> Iterator[None]:
    """Within the block, tasks outside a Dask worker compute on ``namespace``'s device.

    For dask's threaded scheduler (``--gpu --no-cluster``); None: no device (no-op).
    """
    global _process_device
    if namespace is None:
        yield
        return
    xp = importlib.import_module(namespace)
    with _process_lock:
        previous, _process_device = _process_device, (xp, DeviceCache())
    try:
        yield
    finally:
        with _process_lock:
            _process_device[1].clear()
            _process_device = previous


def _current() -> tuple[ModuleType, DeviceCache] | None:
    """This task's device namespace and cache: the worker's plugin, else the process's."""
    try:
        worker = get_worker()
    except ValueError:  # not in a Dask worker's task
        worker = None
    if worker is not None:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if plugin is None or plugin.xp is None:
            return None
        return plugin.xp, plugin.cache
    return _process_device


def device_namespace() -> ModuleType | None:
    """The array namespace of this task's device (``cupy``), or None on CPU workers."""
    current = _current()
    return None if current is None else current[0]


def device_stats() -> dict | None:
    """This worker's device cache counters (namespace, conversions, hits), or None."""
    current = _current()
    if current is None:
        return None
    xp, cache = current
    return {"namespace": xp.__name__, "conversions": cache.conversions, "hits": cache.hits}


_explicit_caches: dict[str, DeviceCache] = {}


def model_on_device(model: Any, xp: ModuleType | None = None) -> Any:
    """``model`` with its arrays on this worker's device; unchanged on CPU workers.

    model: an E-step model (``EStepModel``, ``Class2DModel``, a ``TemplateBank``...),
        a dataclass whose NumPy arrays (see :func:`to_device`) go to the device.
    xp: the namespace to convert to; None: this worker's (:func:`device_namespace`).
    Returns the cached device copy when this worker has converted this same model
    object before (module docstring), the model itself where there is no device.
    The host model is never modified.
    """
    if xp is None:
        current = _current()
        if current is None:
            return model
        xp, cache = current
    else:
        with _process_lock:
            cache = _explicit_caches.setdefault(xp.__name__, DeviceCache())
    return cache.get(model, lambda m: to_device(m, xp))
