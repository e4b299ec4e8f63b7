"""Every notebook in notebooks/ runs, top to bottom, in a fresh kernel (nbclient); one twice.

Each notebook writes into its own ``tempfile.mkdtemp()`` folder, so a second run
in a row must pass too (the issue: "fails when re-run, output exists"). The test
prints each notebook's name and time as it runs, also under ``pytest -q``, so the
CI log shows them run.
"""

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
#: Seconds a single cell may take before the run fails.
CELL_TIMEOUT_S = 120
#: The notebook run twice in a row (the re-run test).
TWICE = "01-quickstart"


def _run(path: Path, capsys) -> None:
    notebook = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    assert not errors
    with capsys.disabled():
        print(
            f"\nnotebook {path.stem}: executed in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
    return notebook


def test_the_four_notebooks_exist_and_are_stripped():
    assert [p.stem for p in NOTEBOOKS] == [
        "01-quickstart",
        "02-classification",
        "03-micrographs-to-map",
        "04-cluster",
    ]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name
        assert any("mkdtemp" in c.source for c in code), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, capsys):
    notebook = _run(path, capsys)
    html = [
        o.get("data", {}).get("text/html", "")
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
    ]
    if path.stem != "04-cluster":  # results show themselves: a table and images
        assert any("<table" in h and "<img" in h for h in html), path.name
    if path.stem == TWICE:
        _run(path, capsys)  # a second run in a row, into a new folder, passes too
