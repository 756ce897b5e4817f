"""Build a natural-site federation ``OUT/<site>/<class>/*`` from the brain tumor MRI set (symlinks, no copies).

Real federations are sites with their own class mix and size, not a pooled folder cut by a Dirichlet draw.
This lays out such sites from the de-duplicated brain tumor set: each site gets the number of images of
each class its spec asks for, drawn without replacement (seeded), so no image and no duplicate of one lies
at two sites. The default spec is skewed on purpose: a large mixed site, a site dominated by one class
(about 93 %), a small site where the rarest classes elsewhere are common, and a held-out site that is
80 % one class (``--holdout site_d`` for ``fedmedclip simulate --partition natural``).

    python -m bench.natural_sites --out /tmp/sites [--scale 0.5] [--seed 0] [--spec spec.json]

``--spec``: a JSON object ``{"site": {"class": count, ...}, ...}``; ``--scale`` multiplies every count
(at least 1 image of a class a site asks for). The layout's own ``sites.json`` records what was built.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from shared.data import DataConfigError, deduplicate, default_data_root, scan_image_folder

#: site -> class -> images (classes of the brain tumor set: glioma, meningioma, notumor, pituitary)
DEFAULT_SPEC: dict[str, dict[str, int]] = {
    "site_a": {"glioma": 120, "meningioma": 100, "notumor": 110, "pituitary": 90},  # large, mixed
    "site_b": {"glioma": 6, "meningioma": 5, "notumor": 190, "pituitary": 4},  # one class: 93 %
    "site_c": {"glioma": 60, "meningioma": 20, "notumor": 10, "pituitary": 40},  # small, rare classes common
    "site_d": {"glioma": 15, "meningioma": 10, "notumor": 15, "pituitary": 160},  # held out: 80 % one class
}


def build_sites(
    out: Path | str,
    spec: dict[str, dict[str, int]] | None = None,
    *,
    data: Path | str | None = None,
    scale: float = 1.0,
    seed: int = 0,
) -> dict[str, dict[str, int]]:
    """Lay out ``spec``'s sites under ``out`` as symlinks to de-duplicated images of ``data``; returns the counts."""
    spec = spec or DEFAULT_SPEC
    ds, _ = deduplicate(scan_image_folder(data or default_data_root()))
    labels = ds.labels()
    rng = np.random.default_rng(seed)
    pools = {name: list(rng.permutation(np.flatnonzero(labels == i))) for i, name in enumerate(ds.class_names)}
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataConfigError(f"{out} is not empty; give a new folder")
    built: dict[str, dict[str, int]] = {}
    for site, counts in spec.items():
        built[site] = {}
        for cls, n in counts.items():
            if cls not in pools:
                raise DataConfigError(f"site {site}: class {cls!r} is not one of {list(ds.class_names)}")
            want = max(1, round(n * scale)) if n > 0 else 0
            if want > len(pools[cls]):
                raise DataConfigError(f"site {site}: {want} images of {cls} asked, {len(pools[cls])} left")
            folder = out / site / cls
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(want):
                src = ds.samples[int(pools[cls].pop())].path
                os.symlink(src, folder / src.name)
            built[site][cls] = want
    (out / "sites.json").write_text(json.dumps({"seed": seed, "scale": scale, "sites": built}, indent=1))
    return built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.natural_sites", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="an empty or new folder")
    p.add_argument("--data", default=None, help="the brain tumor set (default: $FEDMEDCLIP_DATA, else beside the repo)")
    p.add_argument("--spec", default=None, help='JSON file {"site": {"class": count}}; default: the skewed 4 sites')
    p.add_argument("--scale", type=float, default=1.0, help="multiply every count (e.g. 0.5 for a quicker run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text()) if args.spec else None
    built = build_sites(args.out, spec, data=args.data, scale=args.scale, seed=args.seed)
    for site, counts in built.items():
        total = sum(counts.values())
        top = max(counts, key=counts.get)
        print(f"{site}: {total} images {counts} (largest class {top}: {counts[top] / max(total, 1):.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
