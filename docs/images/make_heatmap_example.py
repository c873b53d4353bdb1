"""Make ``docs/images/heatmap-example.png`` from a ``padim demo`` run (synthetic data only).

Usage (after ``padim demo --workdir demo-work``)::

    python docs/images/make_heatmap_example.py demo-work/store docs/images/heatmap-example.png

Picks the highest-scoring scratch, spot and crack of the demo night from the report and puts each
image beside its heat map (colour map of the anomaly map, white outline of the region above the
pixel threshold).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from padim.reports import query_reports

KINDS = ("scratch", "spot", "crack")
TILE = 200


def pick_examples(store: str, product: str = "metal-plate") -> list[tuple[str, str]]:
    """``(image, heat map)`` of the highest-scoring anomalous image of each defect kind."""
    rows = query_reports(store, product=product, anomalies_only=True)
    rows = rows[rows["heatmap_uri"].notna()].sort_values("score", ascending=False)
    picked = []
    for kind in KINDS:
        match = rows[rows["image_uri"].str.rsplit("/", n=1).str[-1].str.startswith(f"{kind}_")]
        if not match.empty:
            picked.append((str(match.iloc[0]["image_uri"]), str(match.iloc[0]["heatmap_uri"])))
    return picked


def compose(pairs: list[tuple[str, str]]) -> Image.Image:
    """One row of tiles: image, heat map, image, heat map..."""
    tiles = [Image.open(path).convert("RGB").resize((TILE, TILE)) for pair in pairs for path in pair]
    strip = Image.new("RGB", (TILE * len(tiles) + 4 * (len(tiles) - 1), TILE), (255, 255, 255))
    for index, tile in enumerate(tiles):
        strip.paste(tile, (index * (TILE + 4), 0))
    return strip


def main(store: str, output: str) -> None:
    """Write the example picture."""
    pairs = pick_examples(store)
    if not pairs:
        raise SystemExit(f"no anomalous demo image with a heat map in {store}; run `padim demo` first")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    compose(pairs).quantize(colors=256, method=Image.Quantize.MAXCOVERAGE).save(output, optimize=True)
    print(f"wrote {output} ({Path(output).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
