"""Particle stores on object storage: ``s3://bucket/particles.zarr`` and other fsspec URLs.

Only the particle store may be remote (import writes it; every job reads it); run
folders, maps and STAR files stay local. A remote store is opened by URL through
zarr's fsspec store, so each Dask task opens the URL itself and reads its chunks
straight from the object store: the client never relays images.

- **Where its path is.** :class:`StoreURL` is what :attr:`ParticleStore.path` is for a
  remote store: the URL as text (``str(store.path)`` is what tasks receive), with the
  few ``Path`` manners the jobs use (``name``, ``parent``, ``/``, ``absolute()``,
  ``resolve()``, ``exists()``; it is never a local file or folder). ``Path(url)`` would fold ``s3://`` into ``s3:/``: never build one.
- **Credentials and endpoints** are fsspec's configuration (``~/.config/fsspec``,
  ``FSSPEC_S3_*`` or ``AWS_*`` variables, or ``--storage-options JSON``).
  :func:`configure_storage` puts options into this process's fsspec configuration and
  into ``FSSPEC_<PROTOCOL>`` in the environment, so the workers of a local cluster
  started afterwards inherit them; workers of a cluster started elsewhere need the same
  configuration there (or the variables in their environment).
- **Output safety where it can apply.** An object store has no rename, so a remote
  store cannot be written under a temporary name: :func:`remote_output` refuses an
  existing store without ``--overwrite`` and one streamem did not write (no
  ``.streamem-output`` object) even with it, writes in place, puts the marker last (a
  store without it is incomplete) and deletes what it wrote when the command fails. A
  local output is never inside a remote input (:func:`is_url` inputs are skipped by
  the local path checks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamem.errors import InputError

LOCAL_PROTOCOLS = ("file", "local")
MARKER_OBJECT = ".streamem-output"


def is_url(path: Any) -> bool:
    """Whether ``path`` names a store by a non-local URL (``s3://...``, ``gs://...``)."""
    text = str(path)
    if "://" not in text:
        return False
    return text.split("://", 1)[0].lower() not in LOCAL_PROTOCOLS


class StoreURL(str):
    """A remote store's URL, standing in for a ``Path`` where jobs use one."""

    def __new__(cls, url: str):
        return super().__new__(cls, str(url).rstrip("/"))

    @property
    def protocol(self) -> str:
        return self.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    def absolute(self) -> StoreURL:
        return self

    def resolve(self) -> StoreURL:
        return self

    @property
    def parent(self) -> StoreURL:
        return StoreURL(self.rsplit("/", 1)[0])

    def __truediv__(self, other) -> StoreURL | Path:
        """``url / "name"``; an absolute local path stays itself (as with ``Path``)."""
        if Path(str(other)).is_absolute():
            return Path(other)
        return StoreURL(f"{self}/{other}")

    def is_file(self) -> bool:
        return False

    def is_dir(self) -> bool:
        return False

    def exists(self) -> bool:
        fs, root = filesystem(self)
        try:
            return bool(fs.exists(root))
        except OSError as exc:
            raise InputError(self, f"cannot reach the object store ({_first_line(exc)})") from None

    def __reduce__(self):
        return (StoreURL, (str(self),))


def filesystem(url: str):
    """The fsspec filesystem of ``url`` (configured as fsspec's config says) and the path
    in it. InputError when the protocol's package (e.g. s3fs for ``s3://``) is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as exc:
        protocol = str(url).split("://", 1)[0]
        raise InputError(url, f"{protocol}:// stores need a package: {_first_line(exc)}") from None
    except ValueError as exc:
        raise InputError(url, f"not a store URL ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON as a dict (InputError naming the option otherwise)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(None, f"--storage-options is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InputError(None, "--storage-options must be a JSON object ({...})")
    return value


def configure_storage_options(options: Mapping[str, Any]) -> None:
    """``--storage-options``: ``{"endpoint_url": ..., ...}`` configures ``s3``; a JSON
    object of objects keyed by fsspec protocols (``{"gcs": {...}, "s3": {...}}``)
    configures each of them (:func:`configure_storage`)."""
    from fsspec.registry import known_implementations

    if options and all(
        k in known_implementations and isinstance(v, dict) for k, v in options.items()
    ):
        for protocol, opts in options.items():
            configure_storage(opts, protocol)
    else:
        configure_storage(options, "s3")


def configure_storage(options: Mapping[str, Any], protocol: str = "s3") -> None:
    """Add ``options`` (fsspec filesystem arguments: ``endpoint_url``, ``key``, ``secret``,
    ``client_kwargs``, ...) to fsspec's configuration of ``protocol``, here and, through
    ``FSSPEC_<PROTOCOL>``, in processes started from now on (a local cluster's workers)."""
    if not options:
        return
    import fsspec.config

    conf = fsspec.config.conf.setdefault(protocol, {})
    conf.update(options)
    os.environ[f"FSSPEC_{protocol.upper()}"] = json.dumps(conf)


def read_marker(url: str) -> dict | None:
    """The ``.streamem-output`` JSON of a remote folder, or None."""
    fs, root = filesystem(url)
    try:
        return json.loads(fs.cat_file(f"{root}/{MARKER_OBJECT}"))
    except (FileNotFoundError, ValueError):
        return None


@contextmanager
def remote_output(url: str, overwrite: bool = False, command: str | None = None) -> Iterator[str]:
    """Yield ``url`` to write a new remote store into (module docstring: the rules)."""
    from streamem.io.atomic import NOT_OURS, marker_text

    url = StoreURL(url)
    fs, root = filesystem(url)
    if url.exists():
        if not overwrite:
            raise InputError(url, "output exists (use --overwrite to replace it)")
        marker = read_marker(url)
        if not (isinstance(marker, dict) and marker.get("tool") == "streamem"):
            raise InputError(url, NOT_OURS)
        fs.rm(root, recursive=True)  # no rename on an object store: the old one goes first
    try:
        yield url
        fs.pipe_file(f"{root}/{MARKER_OBJECT}", marker_text(command).encode())
    except BaseException:
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
        raise
