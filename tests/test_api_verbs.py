"""The Python API has every CLI verb, with the CLI's options (streamem.api, api_cli, api_verbs)."""

import dataclasses
import inspect

import numpy as np
import pytest

import streamem.api as sm
from streamem.api_cli import cli_actions, cli_verbs
from streamem.errors import InputError
from streamem.io.mrc import read_map

#: The options dataclass each hand-written verb takes (its fields carry CLI options).
OPTIONS = {
    "refine3d": sm.RefineOptions,
    "class2d": sm.Class2DOptions,
    "class3d": sm.Class3DOptions,
}


def test_every_cli_verb_is_an_api_verb_or_declared_cli_only():
    verbs = set(cli_verbs())
    assert {"import", "export", "pick", "extract", "postprocess", "reconstruct"} <= verbs
    assert set(sm.VERBS) | set(sm.CLI_ONLY) == verbs
    assert not set(sm.VERBS) & set(sm.CLI_ONLY)
    assert all(len(reason) > 20 for reason in sm.CLI_ONLY.values())
    for verb, function in sm.VERBS.items():
        assert callable(function), verb
        exported = [name for name in sm.__all__ if getattr(sm, name) is function]
        assert exported, f"{verb}: its function is not in streamem.api.__all__"


def _api_names(verb: str) -> set[str]:
    names = set(inspect.signature(sm.VERBS[verb]).parameters)
    if verb in OPTIONS:
        names |= {f.name for f in dataclasses.fields(OPTIONS[verb])}
    return names


@pytest.mark.parametrize("verb", sorted(sm.VERBS))
def test_each_cli_option_is_carried_by_the_api(verb):
    dests = set(cli_actions(verb))
    names = _api_names(verb)
    aliases = sm.CLI_NAMES.get(verb, {})
    assert set(aliases) <= dests, f"stale entries in CLI_NAMES[{verb!r}]"
    missing = []
    for dest in sorted(dests):
        if dest in aliases:
            target = aliases[dest]
        elif verb in sm.CLI_NAMES and dest in sm.EXECUTION_OPTIONS:
            target = "client"  # the hand-written verbs take a distributed.Client
        else:
            target = dest
        if target not in names:
            missing.append(f"--{dest.replace('_', '-')} -> {target}")
    assert not missing, f"{verb}: CLI options without an API parameter: {missing}"


@pytest.mark.parametrize("verb", sorted(set(sm.VERBS) - set(sm.CLI_NAMES)))
def test_generated_verbs_have_the_parsers_defaults(verb):
    params = inspect.signature(sm.VERBS[verb]).parameters
    for dest, action in cli_actions(verb).items():
        p = params[dest]
        if not action.option_strings:
            assert p.default is inspect.Parameter.empty, dest
        elif not action.required and not isinstance(action.default, str):
            assert p.default == action.default, dest
    assert params["client"].default is None


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    store = sm.simulate(root / "p.zarr", 40, box_size=24, pixel_size_A=4.0, snr=1.0, seed=1)
    return root, store


def test_export_import_reconstruct_mask_from_python(small_store):
    root, store = small_store
    star = sm.export(store.path, root / "out.star")
    assert star == root / "out.star" and star.is_file()
    again = sm.import_particles(star, root / "again.zarr", chunk_size=16)
    assert again.n_particles == store.n_particles and again.box_size == 24
    np.testing.assert_array_equal(again.read_chunk(0, 40).images, store.read_chunk(0, 40).images)
    assert sm.info(again).path == again.path

    path = sm.reconstruct(store.path, out=root / "map.mrc", truth=True, no_cluster=True)
    volume, voxel = read_map(path)
    assert volume.shape == (24, 24, 24) and voxel == pytest.approx(4.0, rel=1e-4)
    mask = sm.mask_create(path, out=root / "mask.mrc", threshold=float(volume.max()) / 4)
    values, _ = read_map(mask)
    assert 0 < np.mean(values > 0.5) < 1


def test_api_refuses_what_the_cli_refuses(small_store):
    root, store = small_store
    with pytest.raises(TypeError):
        sm.reconstruct(store.path, out=root / "x.mrc", no_such_option=1)
    with pytest.raises(InputError, match="--subset"):
        sm.reconstruct(store.path, out=root / "x.mrc", subset=3)
    with pytest.raises(InputError, match="--maxres"):
        sm.reconstruct(store.path, out=root / "x.mrc", maxres="abc")
    (root / "exists.mrc").write_bytes(b"user data")
    with pytest.raises(InputError):
        sm.reconstruct(store.path, out=root / "exists.mrc", truth=True, no_cluster=True)
    assert (root / "exists.mrc").read_bytes() == b"user data"
    assert not (root / "x.mrc").exists()


def test_a_client_runs_the_work_on_its_tls_cluster(small_store):
    from streamem.dist.cluster import client_for

    root, store = small_store
    with client_for(n_workers=1) as client:
        assert client.scheduler.address.startswith("tls://")
        path = sm.reconstruct(store.path, out=root / "tls.mrc", truth=True, client=client)
        assert any("reconstruct" in str(k) or "backproject" in str(k) for k in _task_keys(client))
    a, _ = read_map(path)
    b, _ = read_map(sm.reconstruct(store.path, out=root / "t.mrc", truth=True, no_cluster=True))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def _task_keys(client) -> list:
    """Keys of tasks the scheduler ran (its task-stream records)."""
    return [r.get("key") for r in client.get_task_stream() or []] or list(
        client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    )
