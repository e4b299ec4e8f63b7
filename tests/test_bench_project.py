"""``streamem bench project --local``: one row per slice block, on a small slice set."""

from streamem.bench.project import LOCAL_BLOCKS, measure_local_blocks, print_local_blocks


def test_local_blocks_time_every_block_size(capsys):
    rows = measure_local_blocks(box=32, n_images=4, per_image=8, repeats=1)
    assert [r["block"] for r in rows] == list(LOCAL_BLOCKS)
    assert all(r["slices"] == 32 and r["points_per_slice"] > 100 for r in rows)
    assert all(
        r["project_ns_per_point"] > 0
        and r["insert_ns_per_point"] > 0
        and r["insert_single_ns_per_point"] > 0
        for r in rows
    )
    print_local_blocks(rows, 32)
    out = capsys.readouterr().out
    assert "whole call" in out and "32 slices" in out
