"""``streamem bench project --local``: one row per slice block, on a small slice set,
and the E-step's point order against radius order."""

from streamem.bench.project import LOCAL_BLOCKS, measure_local_blocks, print_local_blocks


def test_local_blocks_time_every_block_size(capsys):
    rows = measure_local_blocks(box=32, n_images=4, per_image=8, repeats=1)
    assert [r["block"] for r in rows] == list(LOCAL_BLOCKS)
    assert all(
        r["slices"] == 32 and r["points_per_slice"] > 100 and r["order"] == "estep" for r in rows
    )
    assert all(
        r["project_ns_per_point"] > 0
        and r["insert_ns_per_point"] > 0
        and r["insert_single_ns_per_point"] > 0
        for r in rows
    )
    radius = measure_local_blocks(box=32, n_images=4, per_image=8, repeats=1, blocks=(16,),
                                  order="radius")  # fmt: skip
    assert [(r["block"], r["order"]) for r in radius] == [(16, "radius")]
    assert radius[0]["points_per_slice"] == rows[0]["points_per_slice"]  # the same points
    print_local_blocks(rows + radius, 32)
    out = capsys.readouterr().out
    assert "whole call" in out and "32 slices" in out and "16 by radius" in out
    assert "block 16: the E-step's point order / radius order: projection" in out
