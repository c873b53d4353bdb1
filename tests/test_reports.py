"""Tests of the Parquet score reports: writing, idempotency, schema evolution and every query.

Each behaviour runs on local disk and on a moto S3 endpoint (``ThreadedMotoServer`` on loopback,
reached through ``AWS_ENDPOINT_URL`` like any user's S3). Expected answers are computed from the
hand-built rows in plain Python, never with the code under test.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from padim.errors import InvalidProductNameError, StoreError
from padim.reports import (
    REPORT_COLUMNS,
    REPORT_SCHEMA,
    SUMMARY_SCHEMA,
    check_additive_evolution,
    compact_partition,
    compact_reports,
    daily_summary,
    export,
    list_report_files,
    make_error_row,
    make_ok_row,
    query_reports,
    scored_images,
    write_report_rows,
)
from padim.reports import schema as report_schema
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401  (pytest fixtures)

UTC = timezone.utc
T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
THRESHOLD = 10.0
NIGHTS = [date(2026, 11, 23), date(2026, 11, 24), date(2026, 11, 25)]
PRODUCTS = ["bottle", "tile"]

V1_SCHEMA = pa.schema(
    [
        ("product", pa.string()),
        ("date", pa.date32()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model_version", pa.string()),
        ("backbone", pa.string()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("normalized_score", pa.float64()),
        ("is_anomaly", pa.bool_()),
        ("defect_area_fraction", pa.float64()),
        ("max_x", pa.int32()),
        ("max_y", pa.int32()),
        ("heatmap_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
"""The released version 1 of the report schema, frozen here: later versions may only append."""


# ----------------------------------------------------------------------------- fixtures


def _new_s3_store() -> str:
    """Create a bucket on the moto endpoint and return a store URL inside it."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"reports-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}/padim-store"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """An empty store, on local disk or in a fresh bucket of the moto S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "padim-store")
    return request.getfixturevalue("s3_bucket") + "/padim-store"


@pytest.fixture
def local_store(tmp_path: Any) -> str:
    """An empty local store, for behaviour that does not depend on the filesystem."""
    return str(tmp_path / "padim-store")


# ----------------------------------------------------------------------------- row builders


def ok(
    uri: str,
    score: float,
    *,
    product: str = "bottle",
    day: date = NIGHTS[0],
    model: str = "v1",
    run: str = "r1",
    at: datetime = T0,
    heatmap: str | None = None,
) -> dict[str, Any]:
    """An ok row with a known score (threshold 10, so anomalous iff score > 10)."""
    return make_ok_row(
        product=product,
        date=day,
        run_id=run,
        image_uri=uri,
        image_sha256=f"{abs(hash(uri)):064x}"[-64:],
        width=900,
        height=600,
        model_version=model,
        backbone="efficientnet_lite0",
        score=score,
        threshold=THRESHOLD,
        defect_area_fraction=min(score / 100.0, 1.0),
        max_x=int(score * 10) % 900,
        max_y=int(score * 7) % 600,
        heatmap_uri=heatmap,
        scored_at=at,
    )


def err(
    uri: str,
    *,
    product: str = "bottle",
    day: date = NIGHTS[0],
    run: str = "r1",
    at: datetime = T0,
    model: str = "v1",
) -> dict[str, Any]:
    """An error row."""
    return make_error_row(
        product=product,
        date=day,
        run_id=run,
        image_uri=uri,
        model_version=model,
        error="cannot decode image: truncated file",
        scored_at=at,
    )


def dataset_rows() -> list[dict[str, Any]]:
    """Hand-built rows: 2 products x 3 nights x 7 ok images + 1 error per night, one v2 row."""
    rows = []
    for p_index, product in enumerate(PRODUCTS):
        for d_index, day in enumerate(NIGHTS):
            for i in range(7):
                score = round(((i * 37 + d_index * 11 + p_index * 5) % 23) + 0.125 * i + 0.01 * d_index, 3)
                uri = f"s3://line/{product}/{day}/img_{i:02d}.png"
                rows.append(ok(uri, score, product=product, day=day, run=f"night-{day}"))
            rows.append(err(f"s3://line/{product}/{day}/broken.png", product=product, day=day, run=f"night-{day}"))
    rows.append(
        ok("s3://line/tile/v2/img.png", 17.5, product="tile", day=NIGHTS[1], model="v2", run=f"night-{NIGHTS[1]}")
    )
    return rows


def write_dataset(store_url: str, rows: list[dict[str, Any]]) -> None:
    """Write rows grouped by run, as the nightly flow would."""
    for run in sorted({r["run_id"] for r in rows}):
        write_report_rows(store_url, [r for r in rows if r["run_id"] == run], run_id=run)


def keyed(df: pd.DataFrame) -> list[tuple[Any, ...]]:
    """(date, product, image_uri, score) of each result row, NaN scores as None."""
    return [(r.date, r.product, r.image_uri, None if pd.isna(r.score) else r.score) for r in df.itertuples(index=False)]


def expect(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The same tuples for expected rows, in the documented order (date, product, image_uri)."""
    ordered = sorted(rows, key=lambda r: (r["date"], r["product"], r["image_uri"], r["model_version"]))
    return [(r["date"], r["product"], r["image_uri"], r["score"]) for r in ordered]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), written out by hand."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def filesystem(store_url: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(store_url)


def put_bytes(store_url: str, relative: str, data: bytes) -> None:
    fs, root = filesystem(store_url)
    path = f"{root}/{relative}"
    if store_url.startswith("s3://"):
        fs.pipe_file(path, data)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)


# ----------------------------------------------------------------------------- writing and layout


def test_write_a_night_then_append_another(store: str) -> None:
    night1 = [ok(f"img/{i}.png", 1.0 + i) for i in range(5)] + [err("img/bad.png")]
    written = write_report_rows(store, night1, run_id="r1")

    assert len(written) == 1
    assert "/reports/product=bottle/date=2026-11-23/r1-" in written[0]
    assert written[0].endswith(".parquet")
    assert written[0].startswith("s3://") == store.startswith("s3://")
    fs, _ = filesystem(written[0])
    with fs.open(fsspec.core.url_to_fs(written[0])[1], "rb") as handle:
        parquet = pq.ParquetFile(handle)
        assert parquet.metadata.num_rows == 6
        assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        assert "product" not in parquet.schema_arrow.names and "date" not in parquet.schema_arrow.names
    assert keyed(query_reports(store)) == expect(night1)

    night2 = [ok(f"img/{i}.png", 20.0 + i, day=NIGHTS[1], run="r2") for i in range(3)]
    write_report_rows(store, night2, run_id="r2")

    result = query_reports(store)
    assert keyed(result) == expect(night1 + night2)
    assert [f.date for f in list_report_files(store)] == [NIGHTS[0], NIGHTS[1]]
    assert list(result.columns) == list(REPORT_COLUMNS)
    assert all(type(d) is date for d in result["date"])
    assert result["scored_at"].dt.tz is not None and str(result["scored_at"].dt.tz) == "UTC"
    error_row = result[result["status"] == "error"].iloc[0]
    assert error_row["error"] == "cannot decode image: truncated file"
    assert pd.isna(error_row["score"]) and pd.isna(error_row["is_anomaly"]) and pd.isna(error_row["max_x"])


def test_rows_of_several_partitions_go_to_one_file_each(local_store: str) -> None:
    rows = [ok("a.png", 1.0), ok("b.png", 2.0, day=NIGHTS[2]), ok("c.png", 3.0, product="tile")]
    rows = [{**r, "run_id": "multi"} for r in rows]
    written = write_report_rows(local_store, rows, run_id="multi")
    assert sorted(w.split("/reports/")[1].rsplit("/", 1)[0] for w in written) == [
        "product=bottle/date=2026-11-23",
        "product=bottle/date=2026-11-25",
        "product=tile/date=2026-11-23",
    ]
    assert write_report_rows(local_store, [], run_id="empty") == []


def test_rerun_of_a_night_shows_no_duplicates(store: str) -> None:
    first = [ok(f"img/{i}.png", 1.0 + i, run="first") for i in range(4)]
    write_report_rows(store, first, run_id="first")
    later = T0 + timedelta(hours=1)
    again = [ok(f"img/{i}.png", 5.0 + i, run="again", at=later) for i in range(4)]
    write_report_rows(store, again, run_id="again")

    assert len(list_report_files(store)) == 2
    result = query_reports(store)
    assert keyed(result) == expect(again)
    assert set(result["run_id"]) == {"again"}
    assert scored_images(store, "bottle", "v1") == {f"img/{i}.png" for i in range(4)}
    assert scored_images(store, "bottle", "v1", date=NIGHTS[0]) == {f"img/{i}.png" for i in range(4)}
    assert scored_images(store, "bottle", "v1", date=NIGHTS[1]) == set()
    assert scored_images(store, "bottle", "v2") == set()
    assert scored_images(store, "tile", "v1") == set()
    summary = daily_summary(store)
    assert summary["images"].tolist() == [4]

    write_report_rows(store, [ok("other.png", 1.0, day=NIGHTS[1], run="n2")], run_id="n2")
    (compacted,) = compact_reports(store)
    assert "/date=2026-11-23/compacted-" in compacted
    assert [f.url for f in list_report_files(store, until=NIGHTS[0])] == [compacted]
    assert len(list_report_files(store, since=NIGHTS[1])) == 1
    assert keyed(query_reports(store, until=NIGHTS[0])) == expect(again)
    assert compact_partition(store, "bottle", NIGHTS[0]) == compacted
    assert compact_partition(store, "bottle", NIGHTS[2]) is None


def test_two_concurrent_runs_of_the_same_images_show_one_row_each(store: str) -> None:
    images = [f"img/{i:03d}.png" for i in range(30)]

    def run(name: str, offset_s: int) -> list[str]:
        rows = [ok(uri, 2.0 + i % 13, run=name, at=T0 + timedelta(seconds=offset_s)) for i, uri in enumerate(images)]
        return write_report_rows(store, rows, run_id=name)

    with ThreadPoolExecutor(max_workers=2) as pool:
        written = list(pool.map(run, ["run-a", "run-b"], [0, 5]))

    assert len({w for ws in written for w in ws}) == 2
    result = query_reports(store)
    assert sorted(result["image_uri"]) == images
    assert set(result["run_id"]) == {"run-b"}
    assert daily_summary(store)["images"].tolist() == [30]


def test_an_image_that_failed_then_succeeded_counts_once_as_ok(local_store: str) -> None:
    write_report_rows(local_store, [ok("x.png", 3.0, run="good", at=T0)], run_id="good")
    write_report_rows(local_store, [err("x.png", run="bad", at=T0 + timedelta(minutes=5))], run_id="bad")
    write_report_rows(local_store, [err("y.png", run="bad", at=T0)], run_id="bad")

    result = query_reports(local_store)
    assert keyed(result) == [(NIGHTS[0], "bottle", "x.png", 3.0), (NIGHTS[0], "bottle", "y.png", None)]
    summary = daily_summary(local_store).iloc[0]
    assert (summary["images"], summary["scored"], summary["errors"]) == (2, 1, 1)


def test_a_batch_repeating_an_image_is_written_once(local_store: str) -> None:
    rows = [
        err("x.png", at=T0 + timedelta(minutes=9)),
        ok("x.png", 3.0, at=T0),
        ok("x.png", 4.0, at=T0 + timedelta(minutes=1)),
        ok("y.png", 5.0),
    ]
    (written,) = write_report_rows(local_store, rows, run_id="r1")
    assert pq.read_metadata(written).num_rows == 2
    result = keyed(query_reports(local_store))
    assert result == [(NIGHTS[0], "bottle", "x.png", 4.0), (NIGHTS[0], "bottle", "y.png", 5.0)]


def test_same_image_under_two_model_versions_keeps_both_rows(local_store: str) -> None:
    write_report_rows(local_store, [ok("x.png", 3.0, model="v1"), ok("x.png", 4.0, model="v2")], run_id="r1")
    result = query_reports(local_store)
    assert sorted(zip(result["model_version"], result["score"], strict=True)) == [("v1", 3.0), ("v2", 4.0)]
    assert query_reports(local_store, model_version="v2")["score"].tolist() == [4.0]


def test_readers_ignore_temporary_and_foreign_files(store: str) -> None:
    write_report_rows(store, [ok("x.png", 3.0)], run_id="r1")
    garbage = b"not a parquet file"
    put_bytes(store, "reports/product=bottle/date=2026-11-23/.tmp-r2-abc.parquet.part", garbage)
    put_bytes(store, "reports/product=bottle/date=2026-11-23/.hidden.parquet", garbage)
    put_bytes(store, "reports/product=bottle/date=2026-11-23/_SUCCESS", garbage)
    put_bytes(store, "reports/product=bottle/notes.parquet", garbage)
    put_bytes(store, "reports/product=bottle/date=not-a-date/x.parquet", garbage)

    assert keyed(query_reports(store)) == [(NIGHTS[0], "bottle", "x.png", 3.0)]
    assert len(daily_summary(store)) == 1


def test_date_and_product_filters_prune_files(store: str) -> None:
    write_dataset(store, dataset_rows())
    # A corrupt file in a partition the query must not open: reading it would fail.
    put_bytes(store, "reports/product=bottle/date=2026-11-20/corrupt.parquet", b"PAR1 broken")
    put_bytes(store, "reports/product=zeta/date=2026-11-24/corrupt.parquet", b"PAR1 broken")

    pruned = list_report_files(store, product="bottle", since=NIGHTS[1], until=NIGHTS[2])
    assert [(f.product, f.date) for f in pruned] == [("bottle", NIGHTS[1]), ("bottle", NIGHTS[2])]

    assert set(query_reports(store, product="bottle", since="2026-11-21")["date"]) == set(NIGHTS)
    assert len(daily_summary(store, product="tile")) == 3
    assert len(daily_summary(store, since=NIGHTS[0], until=NIGHTS[0])) == 2
    with pytest.raises(StoreError, match=r"cannot read the report files.*date=2026-11-20"):
        query_reports(store, product="bottle")


def test_empty_or_missing_store_gives_empty_frames(store: str) -> None:
    rows = query_reports(store)
    assert rows.empty and list(rows.columns) == list(REPORT_COLUMNS)
    summary = daily_summary(store, product="bottle")
    assert summary.empty and list(summary.columns) == SUMMARY_SCHEMA.names
    assert scored_images(store, "bottle", "v1") == set()
    assert export(rows, "json") == "[]\n"
    assert compact_partition(store, "bottle", "2026-11-23") is None


# ----------------------------------------------------------------------------- schema evolution


def test_current_schema_only_appends_to_version_1() -> None:
    check_additive_evolution(V1_SCHEMA, REPORT_SCHEMA)
    assert tuple(REPORT_SCHEMA.names) == REPORT_COLUMNS
    with pytest.raises(ValueError, match="only appending"):
        check_additive_evolution(V1_SCHEMA, V1_SCHEMA.set(10, pa.field("score", pa.float32())))
    with pytest.raises(ValueError, match="must be nullable"):
        check_additive_evolution(V1_SCHEMA, V1_SCHEMA.append(pa.field("new", pa.int32(), nullable=False)))
    with pytest.raises(ValueError, match="lost columns"):
        check_additive_evolution(V1_SCHEMA, V1_SCHEMA.remove(19))


def test_added_column_reads_as_null_in_old_files(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    write_report_rows(store, [ok("old.png", 4.0, heatmap="heat/old.png", run="old")], run_id="old")
    # A file from an even older writer that lacked the last two columns.
    old_table = pa.table({"run_id": ["older"], "scored_at": pa.array([T0], pa.timestamp("us", tz="UTC"))})
    old_table = pa.table(
        {
            **{name: old_table.column(name) for name in old_table.column_names},
            "image_uri": ["older.png"],
            "model_version": ["v1"],
            "status": ["error"],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(old_table, buffer)
    put_bytes(store, "reports/product=bottle/date=2026-11-23/older-1.parquet", buffer.getvalue())

    newer = REPORT_SCHEMA.append(pa.field("line_speed", pa.float64()))
    check_additive_evolution(REPORT_SCHEMA, newer)
    monkeypatch.setattr(report_schema, "REPORT_SCHEMA", newer)

    only_old = query_reports(store)
    assert list(only_old.columns) == [*REPORT_COLUMNS, "line_speed"]
    assert only_old["line_speed"].isna().all() and only_old["line_speed"].dtype == "float64"
    heatmaps = only_old.set_index("image_uri")["heatmap_uri"]
    assert heatmaps["old.png"] == "heat/old.png" and pd.isna(heatmaps["older.png"])

    new_row = {**ok("new.png", 6.0, run="new"), "line_speed": 1.5}
    write_report_rows(store, [new_row], run_id="new")
    mixed = query_reports(store).set_index("image_uri")
    assert mixed.loc["new.png", "line_speed"] == 1.5
    assert pd.isna(mixed.loc["old.png", "line_speed"]) and pd.isna(mixed.loc["older.png", "line_speed"])
    assert mixed.loc["old.png", "score"] == 4.0


def test_compaction_refuses_files_from_a_newer_schema(local_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(report_schema, "REPORT_SCHEMA", REPORT_SCHEMA.append(pa.field("line_speed", pa.float64())))
        write_report_rows(local_store, [{**ok("a.png", 1.0), "line_speed": 2.0}], run_id="r1")
    write_report_rows(local_store, [ok("a.png", 1.5, run="r2")], run_id="r2")
    with pytest.raises(ValueError, match="line_speed"):
        compact_partition(local_store, "bottle", NIGHTS[0])
    assert len(list_report_files(local_store)) == 2


# ----------------------------------------------------------------------------- queries


@pytest.fixture(scope="module", params=["local", "s3"])
def filled_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store holding :func:`dataset_rows`, local and on S3, for the read-only query tests."""
    return _fill_store(request, tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def filled_local(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same store on local disk only: query semantics do not depend on the filesystem."""
    return _fill_store(request, tmp_path_factory, "local")


def _fill_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kind: str) -> str:
    if kind == "local":
        store_url = str(tmp_path_factory.mktemp("reports") / "padim-store")
    else:
        request.getfixturevalue("s3_endpoint")
        store_url = _new_s3_store()
    write_dataset(store_url, dataset_rows())
    return store_url


ROWS = dataset_rows()
SCORED = [r for r in ROWS if r["status"] == "ok"]


def test_query_all_rows_sorted_by_date_product_uri(filled_store: str) -> None:
    result = query_reports(filled_store)
    assert keyed(result) == expect(ROWS)
    assert result["product"].map(type).eq(str).all()


def test_query_by_product_and_date_range(filled_store: str) -> None:
    result = query_reports(filled_store, product="tile", since="2026-11-24", until=NIGHTS[2])
    wanted = [r for r in ROWS if r["product"] == "tile" and NIGHTS[1] <= r["date"] <= NIGHTS[2]]
    assert keyed(result) == expect(wanted)
    assert keyed(query_reports(filled_store, until=NIGHTS[0])) == expect([r for r in ROWS if r["date"] == NIGHTS[0]])


def test_query_min_score_is_inclusive_on_the_raw_score(filled_store: str) -> None:
    cut = sorted(r["score"] for r in SCORED)[-12]
    result = query_reports(filled_store, min_score=cut)
    assert keyed(result) == expect([r for r in SCORED if r["score"] >= cut])
    assert cut in set(result["score"])


def test_query_anomalies_only(filled_store: str) -> None:
    result = query_reports(filled_store, anomalies_only=True)
    assert keyed(result) == expect([r for r in SCORED if r["score"] > THRESHOLD])
    assert result["is_anomaly"].all()
    assert (result["normalized_score"] > 1.0).all()


def test_query_by_model_version(filled_store: str) -> None:
    assert keyed(query_reports(filled_store, model_version="v2")) == expect(
        [r for r in ROWS if r["model_version"] == "v2"]
    )
    assert query_reports(filled_store, model_version="v9").empty


def test_top_n_scores(filled_store: str) -> None:
    result = query_reports(filled_store, top=5)
    best = sorted(SCORED, key=lambda r: (-r["score"], r["date"], r["product"], r["image_uri"]))[:5]
    assert result["score"].tolist() == [r["score"] for r in best]
    assert result["image_uri"].tolist() == [r["image_uri"] for r in best]


def test_top_n_anomalies_for_one_product_over_a_date_range(filled_store: str) -> None:
    result = query_reports(filled_store, product="bottle", since=NIGHTS[1], until=NIGHTS[2], anomalies_only=True, top=3)
    pool = [r for r in SCORED if r["product"] == "bottle" and r["date"] >= NIGHTS[1] and r["score"] > THRESHOLD]
    best = sorted(pool, key=lambda r: -r["score"])[:3]
    assert [(r.image_uri, r.score) for r in result.itertuples()] == [(r["image_uri"], r["score"]) for r in best]
    assert len(query_reports(filled_store, top=1000)) == len(SCORED)


def test_daily_summary_per_product_and_date(filled_store: str) -> None:
    summary = daily_summary(filled_store)
    assert list(summary.columns) == SUMMARY_SCHEMA.names
    expected = []
    for day in NIGHTS:
        for product in PRODUCTS:
            group = [r for r in ROWS if r["product"] == product and r["date"] == day]
            scores = [r["score"] for r in group if r["status"] == "ok"]
            anomalies = sum(s > THRESHOLD for s in scores)
            expected.append(
                {
                    "product": product,
                    "date": day,
                    "images": len(group),
                    "scored": len(scores),
                    "errors": len(group) - len(scores),
                    "anomalies": anomalies,
                    "anomaly_rate": anomalies / len(scores),
                    "score_p50": percentile(scores, 0.5),
                    "score_p90": percentile(scores, 0.9),
                    "score_p99": percentile(scores, 0.99),
                    "score_max": max(scores),
                }
            )
    actual = summary.to_dict("records")
    assert [(a["product"], a["date"]) for a in actual] == [(e["product"], e["date"]) for e in expected]
    for got, want in zip(actual, expected, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (got["product"], got["date"], key)

    one = daily_summary(filled_store, product="bottle", since=NIGHTS[2])
    assert [(r.product, r.date) for r in one.itertuples()] == [("bottle", NIGHTS[2])]
    assert daily_summary(filled_store, model_version="v2")["images"].tolist() == [1]


def test_invalid_query_arguments_are_value_errors(filled_local: str) -> None:
    with pytest.raises(ValueError, match="after until"):
        query_reports(filled_local, since=NIGHTS[2], until=NIGHTS[0])
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        query_reports(filled_local, since="yesterday")
    with pytest.raises(ValueError, match="positive integer"):
        query_reports(filled_local, top=0)
    with pytest.raises(ValueError, match="finite"):
        query_reports(filled_local, min_score=float("nan"))
    with pytest.raises(InvalidProductNameError):
        query_reports(filled_local, product="../evil")


# ----------------------------------------------------------------------------- export


def test_json_export_keys_are_the_schema_columns(filled_store: str) -> None:
    result = query_reports(filled_store, product="bottle", until=NIGHTS[0])
    records = json.loads(export(result, "json") or "")
    assert isinstance(records, list) and len(records) == len(result) == 8
    assert all(list(r) == list(REPORT_COLUMNS) for r in records)
    first = records[0]
    assert first["date"] == "2026-11-23"
    assert datetime.fromisoformat(first["scored_at"]) == T0
    assert first["heatmap_uri"] is None
    broken = next(r for r in records if r["status"] == "error")
    assert broken["score"] is None and broken["is_anomaly"] is None and broken["max_x"] is None
    assert all(isinstance(r["is_anomaly"], bool) for r in records if r["status"] == "ok")
    assert all(isinstance(r["width"], int) for r in records if r["status"] == "ok")

    summary = json.loads(export(daily_summary(filled_store), "json") or "")
    assert len(summary) == 6 and list(summary[0]) == SUMMARY_SCHEMA.names
    assert summary[0]["date"] == "2026-11-23"


def test_csv_table_and_parquet_exports(filled_local: str, tmp_path: Any) -> None:
    result = query_reports(filled_local, top=3)
    csv_text = export(result, "csv") or ""
    parsed = pd.read_csv(io.StringIO(csv_text))
    assert list(parsed.columns) == list(REPORT_COLUMNS)
    assert parsed["score"].tolist() == result["score"].tolist()

    table = export(result, "table") or ""
    assert "image_uri" in table and result["image_uri"].iloc[0] in table and "(3 rows)" in table
    assert f"{result['score'].iloc[0]:.4f}" in table
    assert export(result.iloc[0:0], "table") == "(no rows)\n"

    with pytest.raises(ValueError, match="output path"):
        export(result, "parquet", None)
    with pytest.raises(ValueError, match="unknown export format"):
        export(result, "xlsx", None)  # type: ignore[arg-type]
    target = tmp_path / "top.parquet"
    assert export(result, "parquet", str(target)) is None
    back = pq.read_table(target)
    assert back.schema.equals(REPORT_SCHEMA, check_metadata=False)
    assert back.column("score").to_pylist() == result["score"].tolist()
    assert export(result, "json", str(tmp_path / "top.json")) is None
    assert len(json.loads((tmp_path / "top.json").read_text())) == 3


# ----------------------------------------------------------------------------- validation


def test_nan_and_infinite_scores_are_rejected(local_store: str) -> None:
    bad = ok("x.png", 3.0)
    arguments = {k: v for k, v in bad.items() if k not in ("normalized_score", "status", "error")}
    with pytest.raises(ValueError, match="score must be a finite number"):
        make_ok_row(**{**arguments, "score": float("nan")})
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            write_report_rows(local_store, [{**bad, "score": value, "normalized_score": 0.3}], run_id="r1")
    frame = pd.DataFrame([bad])
    frame.loc[0, "defect_area_fraction"] = float("-inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_report_rows(local_store, frame, run_id="r1")
    frame.loc[0, "defect_area_fraction"] = float("nan")  # NaN in pandas means missing: still refused
    with pytest.raises(ValueError, match="defect_area_fraction"):
        write_report_rows(local_store, frame, run_id="r1")
    assert list_report_files(local_store) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"score": "high"}, "mixed or unsupported|must be double"),
        ({"width": 1.5}, "cannot be converted"),
        ({"is_anomaly": 1}, "must be bool"),
        ({"scored_at": datetime(2026, 11, 25, 2, 0)}, "timezone-aware"),
        ({"scroe": 3.0}, "unknown report columns"),
        ({"status": "maybe"}, "status must be"),
        ({"image_uri": None}, "'image_uri' is required"),
        ({"normalized_score": 0.9}, "score / threshold"),
        ({"run_id": "other"}, "written by run"),
        ({"product": "../evil"}, "invalid product name"),
        ({"max_x": 900}, "max_x must be within"),
        ({"defect_area_fraction": 1.5}, r"within \[0, 1\]"),
        ({"threshold": None}, "no 'threshold'"),
    ],
)
def test_invalid_rows_are_value_errors(tmp_path: Any, change: dict[str, Any], message: str) -> None:
    store_url = str(tmp_path / "store")
    with pytest.raises(ValueError, match=message):
        write_report_rows(store_url, [{**ok("x.png", 3.0), **change}], run_id="r1")
    assert list_report_files(store_url) == []


def test_error_rows_must_not_carry_scores_and_need_a_reason(tmp_path: Any) -> None:
    store_url = str(tmp_path / "store")
    with pytest.raises(ValueError, match="score columns must be null"):
        write_report_rows(store_url, [{**err("x.png"), "score": 1.0}], run_id="r1")
    with pytest.raises(ValueError, match="no error message"):
        write_report_rows(store_url, [{**err("x.png"), "error": " "}], run_id="r1")
    with pytest.raises(ValueError, match="non-empty error"):
        make_error_row(product="bottle", date=NIGHTS[0], run_id="r1", image_uri="x", model_version="v1", error="")
    with pytest.raises(ValueError, match="run_id"):
        write_report_rows(store_url, [err("x.png")], run_id="")


def test_rows_as_dataframe_or_arrow_table_with_defaults(tmp_path: Any) -> None:
    store_url = str(tmp_path / "store")
    rows = [ok("a.png", 12.0), err("b.png")]
    frame = pd.DataFrame(rows).drop(columns=["run_id", "heatmap_uri"])
    write_report_rows(store_url, frame, run_id="r1")
    table = pa.Table.from_pylist([ok("c.png", 2.0, run="r2")])
    write_report_rows(store_url, table, run_id="r2")

    result = query_reports(store_url).set_index("image_uri")
    assert result.loc["a.png", "run_id"] == "r1" and bool(result.loc["a.png", "is_anomaly"])
    assert result.loc["a.png", "normalized_score"] == pytest.approx(1.2)
    assert result.loc["b.png", "status"] == "error" and pd.isna(result.loc["b.png", "width"])
    assert not bool(result.loc["c.png", "is_anomaly"])
