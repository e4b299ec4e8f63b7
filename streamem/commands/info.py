"""``streamem info STORE.zarr``: what a particle store holds."""

from __future__ import annotations

from streamem.io.store import CTF_FIELDS, POSE_FIELDS, ParticleStore, store_size_bytes


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a particle store", description=__doc__)
    p.add_argument("store", help="particle store (.zarr folder)")
    p.set_defaults(func=run)


def describe(store: ParticleStore) -> str:
    """A human-readable summary of a store."""
    n, b = store.n_particles, store.box_size
    fields = store.fields()
    truth = store.fields("truth")
    size = store_size_bytes(store.path)
    raw = n * b * b * 4
    subsets = store.read_field("rlnRandomSubset")
    lines = [
        f"store        {store.path}",
        f"format       {store.facts['format']} v{store.facts['version']}",
        f"particles    {n}",
        f"box          {b} x {b} px",
        f"pixel size   {store.pixel_size_A:.4f} A",
        f"chunks       {len(store.chunk_bounds())} of {store.chunk_size} particles",
        f"on disk      {size / 2**20:.1f} MiB ({raw / max(size, 1):.2f}x compression)",
        f"half sets    1: {(subsets == 1).sum()}, 2: {(subsets == 2).sum()}",
        f"CTF          {'yes' if all(f in fields for f in CTF_FIELDS) else 'no'}",
        f"poses        {'yes' if all(f in fields for f in POSE_FIELDS) else 'no'}",
        f"classes      {'yes' if 'rlnClassNumber' in fields else 'no'}",
        f"ground truth {', '.join(truth) if truth else 'none'}",
        "optics groups:",
    ]
    for g in store.optics_groups:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in g.items()))
    lines.append(f"fields       {', '.join(fields)}")
    return "\n".join(lines)


def run(args) -> int:
    print(describe(ParticleStore(args.store)))
    return 0
