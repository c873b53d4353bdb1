"""Benchmark the score-report queries on a realistic month of reports (about 1 M rows).

Generates ``--nights`` x ``--products`` x ``--images`` report rows into a local store, one file
per product-night exactly as the nightly score flow writes them (through
:func:`padim.reports.write_report_rows`, validation included), then times the queries quality
engineers run. Every query deduplicates rows on (product, date, image_uri, model_version), so the
timings include that step.

Output: one JSON line per measurement, ``{"bench": ..., "seconds": ..., "rows": ...}``
(``seconds`` is the median of ``--repeat`` runs), then a human-readable summary.

Usage:
    python benchmarks/report_queries.py                      # 30 nights x 10 products x 3,300 images
    python benchmarks/report_queries.py --nights 3 --images 500   # quick check
    python benchmarks/report_queries.py --store /tmp/rep --keep   # keep the store to re-query it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from padim.reports import (
    REPORT_SCHEMA,
    compact_reports,
    daily_summary,
    list_report_files,
    query_reports,
    write_report_rows,
)

FIRST_NIGHT = date(2026, 10, 1)
IMAGE_SIZE = (900, 900)
ANOMALY_SHARE = 0.02
ERROR_SHARE = 0.001
THRESHOLD = 22.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=30, help="production nights (default 30)")
    parser.add_argument("--products", type=int, default=10, help="products (default 10)")
    parser.add_argument("--images", type=int, default=3300, help="images per product and night (default 3300)")
    parser.add_argument("--store", default=None, help="store root (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the generated store")
    parser.add_argument(
        "--rerun-nights",
        type=int,
        default=2,
        help="nights re-scored by a second run (every product), leaving duplicate rows that every query "
        "must hide (default 2)",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=0,
        help="images per report file, as a score flow writing one file per shard (its default shard of "
        "500 gives 7 files per product-night); default 0: one file per product-night",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="after the queries, compact the multi-file partitions (timed) and run the queries again",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per query; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args(argv)


def product_names(count: int) -> list[str]:
    """Return ``product-00``, ``product-01``, ..."""
    return [f"product-{index:02d}" for index in range(count)]


def make_night(rng: np.random.Generator, product: str, night: date, images: int, run_id: str) -> pa.Table:
    """Build one product-night of report rows with realistic values.

    Scores of normal parts follow a gamma law below the threshold; about 2 % of the parts are
    defective with scores well above it; about 0.1 % of the images fail to decode (error rows).

    Args:
        rng: Random generator.
        product: Product name.
        night: Production date.
        images: Number of images.
        run_id: The night's run id.

    Returns:
        A table with the report schema.
    """
    width, height = IMAGE_SIZE
    names = [f"{night:%Y%m%d}_{index:05d}.png" for index in range(images)]
    uris = [f"s3://factory-images/{product}/incoming/{night}/{name}" for name in names]
    digests = rng.bytes(32 * images).hex()
    sha = [digests[64 * i : 64 * (i + 1)] for i in range(images)]
    defective = rng.random(images) < ANOMALY_SHARE
    score = rng.gamma(shape=9.0, scale=1.2, size=images)
    score[defective] = THRESHOLD + rng.gamma(shape=3.0, scale=6.0, size=int(defective.sum()))
    failed = rng.random(images) < ERROR_SHARE
    is_anomaly = score > THRESHOLD
    area = np.where(is_anomaly, rng.beta(2.0, 30.0, images), rng.beta(1.0, 2000.0, images))
    scored_at = datetime.now(timezone.utc)
    times = [scored_at + timedelta(milliseconds=25 * i) for i in range(images)]
    model_version = "v3" if product != "product-00" or night.day < 15 else "v4"
    heatmaps = [
        f"s3://padim-store/heatmaps/{product}/{night}/{name}" if flag and not bad else None
        for name, flag, bad in zip(names, is_anomaly, failed, strict=True)
    ]

    def scored(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        return pa.array(values, arrow_type, mask=failed)

    columns: dict[str, pa.Array] = {
        "product": pa.array([product] * images),
        "date": pa.array([night] * images, pa.date32()),
        "run_id": pa.array([run_id] * images),
        "scored_at": pa.array(times, pa.timestamp("us", tz="UTC")),
        "image_uri": pa.array(uris),
        "image_sha256": pa.array(sha),
        "width": scored(np.full(images, width), pa.int32()),
        "height": scored(np.full(images, height), pa.int32()),
        "model_version": pa.array([model_version] * images),
        "backbone": pa.array(["efficientnet_lite0"] * images),
        "score": scored(score, pa.float64()),
        "threshold": scored(np.full(images, THRESHOLD), pa.float64()),
        "normalized_score": scored(score / THRESHOLD, pa.float64()),
        "is_anomaly": scored(is_anomaly, pa.bool_()),
        "defect_area_fraction": scored(area, pa.float64()),
        "max_x": scored(rng.integers(0, width, images), pa.int32()),
        "max_y": scored(rng.integers(0, height, images), pa.int32()),
        "heatmap_uri": pa.array(heatmaps, pa.string()),
        "status": pa.array(np.where(failed, "error", "ok")),
        "error": pa.array(np.where(failed, "cannot decode image: truncated PNG", None).tolist(), pa.string()),
    }
    return pa.table(columns, schema=REPORT_SCHEMA)


def generate(store: str, args: argparse.Namespace) -> tuple[int, float]:
    """Write the whole dataset: one run per product-night (one file per shard), then the re-runs.

    Re-runs score the last ``--rerun-nights`` nights again (new run id, new scores), so those
    partitions hold two files and every image there has two stored rows.

    Returns:
        ``(rows written, seconds)``.
    """
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    total = 0
    reruns = [args.nights - 1 - k for k in range(min(args.rerun_nights, args.nights))]
    shard = args.shard_size or args.images
    for offset in [*range(args.nights), *reruns]:
        night = FIRST_NIGHT + timedelta(days=offset)
        for product in product_names(args.products):
            run_id = f"nightly-{night}-{uuid.uuid4().hex[:8]}"
            table = make_night(rng, product, night, args.images, run_id)
            for start in range(0, table.num_rows, shard):
                write_report_rows(store, table.slice(start, shard), run_id=run_id)
            total += table.num_rows
    return total, time.perf_counter() - started


def time_query(name: str, query: Callable[[], pd.DataFrame | int], repeat: int) -> dict[str, Any]:
    """Run a query ``repeat`` times and return its median wall time, CPU time and result size.

    ``cpu_seconds`` (process CPU time, all DuckDB threads) is reported too because wall time on a
    shared machine depends on what else runs there.
    """
    durations, cpu, rows = [], [], 0
    for _ in range(repeat):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = query()
        durations.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        rows = result if isinstance(result, int) else len(result)
    record = {"bench": name, "seconds": round(statistics.median(durations), 4), "rows": rows}
    record["min_seconds"] = round(min(durations), 4)
    record["cpu_seconds"] = round(statistics.median(cpu), 4)
    print(json.dumps(record), flush=True)
    return record


def raw_duckdb_count(store: str) -> int:
    """Count every stored row with plain DuckDB over the hive glob (no deduplication)."""
    pattern = os.path.join(store, "reports", "**", "*.parquet")
    with duckdb.connect() as con:
        return con.execute("SELECT count(*) FROM read_parquet(?, hive_partitioning = true)", [pattern]).fetchall()[0][0]


def run_benchmarks(store: str, nights: int, products: int, repeat: int, suffix: str = "") -> list[dict[str, Any]]:
    """Time the report queries against an existing store."""
    first = FIRST_NIGHT
    window = (first + timedelta(days=nights // 3), first + timedelta(days=max(nights // 3, 2 * nights // 3 - 1)))
    one = product_names(products)[min(3, products - 1)]
    cases: list[tuple[str, Callable[[], pd.DataFrame | int]]] = [
        ("top_100_scores_all", lambda: query_reports(store, top=100)),
        ("top_100_anomalies_all", lambda: query_reports(store, anomalies_only=True, top=100)),
        (
            "top_20_anomalies_one_product_date_range",
            lambda: query_reports(store, product=one, since=window[0], until=window[1], anomalies_only=True, top=20),
        ),
        (
            "anomalies_one_night_all_products",
            lambda: query_reports(store, since=first, until=first, anomalies_only=True),
        ),
        ("daily_summary_all", lambda: daily_summary(store)),
        ("daily_summary_one_product", lambda: daily_summary(store, product=one)),
        ("full_scan_dataframe", lambda: query_reports(store)),
        ("full_scan_count_raw_duckdb", lambda: raw_duckdb_count(store)),
    ]
    print(f"# one product = {one}, date range = {window[0]}..{window[1]}", file=sys.stderr)
    return [time_query(name + suffix, query, repeat) for name, query in cases]


def main(argv: list[str] | None = None) -> int:
    """Generate (unless the store already has reports) and time the queries."""
    args = parse_args(argv)
    for name in ("nights", "products", "images", "repeat"):
        if getattr(args, name) <= 0:
            print(f"--{name} must be positive", file=sys.stderr)
            return 2
    if args.rerun_nights < 0 or args.shard_size < 0:
        print("--rerun-nights and --shard-size must be >= 0", file=sys.stderr)
        return 2
    temporary = args.store is None
    store = args.store or tempfile.mkdtemp(prefix="padim-report-bench-")
    try:
        existing = list_report_files(store)
        if existing:
            print(f"# reusing {len(existing)} report files in {store}", file=sys.stderr)
        else:
            rows, gen_s = generate(store, args)
            record = {"bench": "generate_and_write", "seconds": round(gen_s, 3), "rows": rows}
            record["rows_per_second"] = round(rows / gen_s)
            print(json.dumps(record), flush=True)
        files = list_report_files(store)
        size = sum(os.path.getsize(f.url) for f in files)
        results = run_benchmarks(store, args.nights, args.products, args.repeat)
        if args.compact:
            started = time.perf_counter()
            compacted = compact_reports(store)
            record = {"bench": "compact_reports", "seconds": round(time.perf_counter() - started, 3)}
            record["partitions"] = len(compacted)
            print(json.dumps(record), flush=True)
            results += run_benchmarks(store, args.nights, args.products, args.repeat, suffix="_compacted")
        by_name = {r["bench"]: r for r in results}
        print(
            f"\nsummary: {len(files)} files as written, {size / 1e6:.1f} MB zstd Parquet, "
            f"{by_name['full_scan_count_raw_duckdb']['rows']:,} stored rows, "
            f"{by_name['full_scan_dataframe']['rows']:,} after deduplication ({args.nights} nights x "
            f"{args.products} products x {args.images} images, shards of {args.shard_size or args.images}, "
            f"{args.rerun_nights} nights re-run)"
        )
        print(f"  {'query':<48} {'wall (median)':>14} {'cpu':>8} {'rows':>10}")
        for result in results:
            print(
                f"  {result['bench']:<48} {result['seconds']:>12.3f} s {result['cpu_seconds']:>6.2f} s "
                f"{result['rows']:>10,}"
            )
        print(json.dumps({"summary": {r["bench"]: r["seconds"] for r in results}, "files": len(files), "bytes": size}))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(store, ignore_errors=True)
        elif args.keep or not temporary:
            print(f"# store kept at {store}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
