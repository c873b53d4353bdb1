"""Foreign and corrupt files among the Parquet reports: skipped, refused in one line, or quarantined.

Real reports are written the normal way (``write_report_rows``); then files that are not ours are
dropped next to them: a file whose ``score`` is text, random bytes named ``*.parquet``, a real
report cut in half, a file of unrelated columns, and a real report whose data pages are damaged
behind an intact footer. Expected answers come from the hand-built rows. Behaviours that touch
the filesystem run on local disk and on the moto S3 endpoint (fixtures of ``tests/test_reports``).
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import pickle
import random
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from padim.errors import StoreError
from padim.reports import (
    CorruptReportError,
    ReportFile,
    ReportQueryError,
    compact_partition,
    daily_summary,
    list_report_files,
    quarantine_corrupt_reports,
    query_reports,
    scored_contents,
    write_report_rows,
)
from padim.reports.screening import QUARANTINE_SUFFIX, REASON_SUFFIX, quarantine_url
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_reports import NIGHTS, T0, err, filesystem, ok, put_bytes

OLD, MIDDLE, NEW = NIGHTS
GOOD_SCORES = {"a.png": 2.5, "b.png": 9.0, "c.png": 10.5, "d.png": 100.0, "e.png": 30.25}
"""Night ``OLD``: sorted as text these would come 9.0, 30.25, 2.5, 100.0, 10.5."""
MIDDLE_SCORES = {"f.png": 55.5}
NEW_SCORES = {"g.png": 7.75, "h.png": 1.25}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store, on local disk or in a fresh bucket of the moto S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "padim-store")
    return request.getfixturevalue("s3_bucket") + "/padim-store"


@pytest.fixture
def local_store(tmp_path: Path) -> str:
    """An empty local store."""
    return str(tmp_path / "padim-store")


# ----------------------------------------------------------------------------- builders


def partition(day: date, name: str) -> str:
    """Store-relative path of a file in bottle's partition of ``day``."""
    return f"reports/product=bottle/date={day.isoformat()}/{name}"


def good_rows(scores: dict[str, float], day: date, run: str) -> list[dict[str, Any]]:
    """Ok rows of bottle on ``day`` with the given scores."""
    return [ok(uri, score, day=day, run=run) for uri, score in scores.items()]


def write_good_reports(store_url: str) -> None:
    """Our reports: 5 ok + 1 error row on OLD, 1 ok row on MIDDLE, 2 ok rows on NEW."""
    write_report_rows(store_url, [*good_rows(GOOD_SCORES, OLD, "n1"), err("broken.png", run="n1")], run_id="n1")
    write_report_rows(store_url, good_rows(MIDDLE_SCORES, MIDDLE, "n2"), run_id="n2")
    write_report_rows(store_url, good_rows(NEW_SCORES, NEW, "n3"), run_id="n3")


def report_bytes(tmp_path: Path, rows: list[dict[str, Any]]) -> bytes:
    """The bytes of a real report file holding ``rows`` (written to a scratch store)."""
    scratch = str(tmp_path / f"scratch-{random.random()}")
    (url,) = write_report_rows(scratch, rows, run_id=rows[0]["run_id"])
    return Path(url).read_bytes()


def parquet_bytes(table: pa.Table) -> bytes:
    """Encode a table as Parquet."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def text_score_file(tmp_path: Path) -> bytes:
    """A report-like file whose ``score`` is stored as text ("99" tops a text sort)."""
    rows = [ok("text-1.png", 99.0, day=MIDDLE, run="x"), ok("text-2.png", 9.5, day=MIDDLE, run="x")]
    table = pq.read_table(io.BytesIO(report_bytes(tmp_path, rows)))
    index = table.schema.get_field_index("score")
    return parquet_bytes(table.set_column(index, "score", pa.array(["99", "9.5"], pa.string())))


def unrelated_file() -> bytes:
    """A Parquet file that has nothing to do with reports (it used to add a phantom image)."""
    return parquet_bytes(pa.table({"sensor": ["s1", "s2"], "reading": [0.5, 0.7]}))


def random_file() -> bytes:
    """Random bytes (a fixed seed) named like a report."""
    return random.Random(14).randbytes(4096)


def truncated_file(tmp_path: Path) -> bytes:
    """The first half of a real report file."""
    data = report_bytes(tmp_path, good_rows({"t.png": 77.0}, NEW, "cut"))
    return data[: len(data) // 2]


def damaged_pages_file(tmp_path: Path) -> bytes:
    """A real report whose data pages are overwritten while its footer stays intact."""
    rows = good_rows({f"p{i:03d}.png": 1.0 + i for i in range(300)}, OLD, "dmg")
    data = bytearray(report_bytes(tmp_path, rows))
    footer = int.from_bytes(data[-8:-4], "little")
    body_end = len(data) - 8 - footer
    data[8:body_end] = random.Random(7).randbytes(body_end - 8)
    return bytes(data)


def listed_names(store_url: str) -> set[str]:
    """Names of the report files the readers list."""
    return {f.url.rsplit("/", 1)[-1] for f in list_report_files(store_url)}


def quarantined(store_url: str, day: date, name: str) -> tuple[str, str]:
    """``(data URL, reason URL)`` of a file quarantined from bottle's partition of ``day``."""
    target = quarantine_url(store_url, ReportFile(url=f"x/{name}", product="bottle", date=day))
    return target, target.removesuffix(QUARANTINE_SUFFIX) + REASON_SUFFIX


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return bool(fs.exists(path))


def read_text(url: str) -> str:
    fs, path = filesystem(url)
    return fs.cat_file(path).decode("utf-8")


def assert_one_short_line(message: str) -> None:
    assert "\n" not in message and len(message) < 700, message


# ----------------------------------------------------------------------------- foreign schemas


def test_foreign_files_are_skipped_with_a_warning(store: str, tmp_path: Path, caplog: Any) -> None:
    write_good_reports(store)
    put_bytes(store, partition(MIDDLE, "text-score.parquet"), text_score_file(tmp_path))
    put_bytes(store, partition(OLD, "unrelated.parquet"), unrelated_file())
    caplog.set_level(logging.WARNING, logger="padim.reports")

    top = query_reports(store, top=4)
    assert top["score"].tolist() == [100.0, 55.5, 30.25, 10.5]
    assert top["image_uri"].tolist() == ["d.png", "f.png", "e.png", "c.png"]

    everything = query_reports(store)
    assert set(everything["image_uri"]) == {*GOOD_SCORES, "broken.png", *MIDDLE_SCORES, *NEW_SCORES}

    summary = daily_summary(store).set_index("date")
    assert summary["images"].to_dict() == {OLD: 6, MIDDLE: 1, NEW: 2}
    assert summary["scored"].to_dict() == {OLD: 5, MIDDLE: 1, NEW: 2}
    assert summary.loc[OLD, "score_max"] == 100.0 and summary.loc[MIDDLE, "score_max"] == 55.5

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("text-score.parquet" in w and "column 'score' is string, expected double" in w for w in warnings)
    assert any("unrelated.parquet" in w and "lacks the required columns" in w for w in warnings)
    assert {"text-score.parquet", "unrelated.parquet"} <= listed_names(store)  # skipped, never moved


def test_older_and_newer_compatible_files_are_read(local_store: str) -> None:
    write_good_reports(local_store)
    older = pa.table(  # an older writer: only the required columns
        {
            "run_id": ["old"],
            "scored_at": pa.array([T0], pa.timestamp("ms", tz="UTC")),
            "image_uri": ["older.png"],
            "model_version": ["v1"],
            "status": ["error"],
        }
    )
    put_bytes(local_store, partition(OLD, "older.parquet"), parquet_bytes(older))
    newer = pq.read_table(io.BytesIO(report_bytes(Path(local_store).parent, good_rows({"n.png": 3.0}, OLD, "nw"))))
    newer = newer.append_column("line_speed", pa.array([1.5]))
    put_bytes(local_store, partition(OLD, "newer.parquet"), parquet_bytes(newer))

    uris = set(query_reports(local_store, since=OLD, until=OLD)["image_uri"])
    assert {"older.png", "n.png"} <= uris


# ----------------------------------------------------------------------------- corrupt files


def test_queries_refuse_corrupt_files_in_one_line(store: str, tmp_path: Path) -> None:
    write_good_reports(store)
    put_bytes(store, partition(OLD, "random.parquet"), random_file())
    put_bytes(store, partition(NEW, "truncated.parquet"), truncated_file(tmp_path))

    for query in (lambda: query_reports(store, top=3), lambda: daily_summary(store)):
        with pytest.raises(CorruptReportError) as caught:
            query()
        message = str(caught.value)
        assert_one_short_line(message)
        assert "random.parquet" in message and "truncated.parquet" in message
        assert "no Parquet magic bytes" in message
    assert {"random.parquet", "truncated.parquet"} <= listed_names(store)  # a query never moves files
    assert not exists(quarantined(store, OLD, "random.parquet")[0])


def test_corrupt_files_never_block_a_new_night(store: str, tmp_path: Path) -> None:
    write_good_reports(store)
    put_bytes(store, partition(OLD, "random.parquet"), random_file())  # an old night
    put_bytes(store, partition(NEW, "truncated.parquet"), truncated_file(tmp_path))  # the night being scored
    put_bytes(store, partition(NEW, "text-score.parquet"), text_score_file(tmp_path))

    contents = scored_contents(store, "bottle", "v1", NEW)
    assert contents == {uri: ok(uri, score)["image_sha256"] for uri, score in NEW_SCORES.items()}

    data, reason = quarantined(store, NEW, "truncated.parquet")
    assert exists(data) and exists(reason)
    note = read_text(reason)
    assert "truncated.parquet" in note and "no Parquet magic bytes" in note and "restore:" in note
    assert "truncated.parquet" not in listed_names(store)
    assert "text-score.parquet" in listed_names(store)  # foreign, not corrupt: left in place
    assert "random.parquet" in listed_names(store)  # the new night's read never opened the old night

    assert scored_contents(store, "bottle", "v1", NEW) == contents  # a re-run reads the same

    moved = quarantine_corrupt_reports(store, product="bottle")
    assert moved == [quarantined(store, OLD, "random.parquet")[0]]
    top = query_reports(store, top=3)
    assert top["score"].tolist() == [100.0, 55.5, 30.25]


def test_compaction_quarantines_corrupt_files_and_keeps_foreign_ones(local_store: str) -> None:
    write_report_rows(local_store, good_rows(GOOD_SCORES, OLD, "r1"), run_id="r1")
    write_report_rows(local_store, good_rows({"a.png": 3.5}, OLD, "r2"), run_id="r2")  # a re-run
    put_bytes(local_store, partition(OLD, "random.parquet"), random_file())
    put_bytes(local_store, partition(OLD, "unrelated.parquet"), unrelated_file())

    compacted = compact_partition(local_store, "bottle", OLD)

    assert compacted is not None
    assert listed_names(local_store) == {compacted.rsplit("/", 1)[-1], "unrelated.parquet"}
    assert exists(quarantined(local_store, OLD, "random.parquet")[0])
    scores = query_reports(local_store).set_index("image_uri")["score"].to_dict()
    assert scores == {**GOOD_SCORES, "a.png": 3.5}


def test_damaged_data_behind_an_intact_footer(local_store: str, tmp_path: Path) -> None:
    write_report_rows(local_store, good_rows(GOOD_SCORES, OLD, "r1"), run_id="r1")
    put_bytes(local_store, partition(OLD, "damaged.parquet"), damaged_pages_file(tmp_path))

    with pytest.raises(ReportQueryError) as caught:
        query_reports(local_store, top=3)
    assert_one_short_line(str(caught.value))
    assert "cannot read the report files in" in str(caught.value)

    contents = scored_contents(local_store, "bottle", "v1", OLD)
    assert set(contents) == set(GOOD_SCORES)
    data, reason = quarantined(local_store, OLD, "damaged.parquet")
    assert exists(data) and "damaged Parquet data" in read_text(reason)


# ----------------------------------------------------------------------------- storage faults


@pytest.mark.parametrize(
    "fault",
    [ConnectionError("connection reset by peer"), OSError(errno.EIO, "Input/output error")],
    ids=["connection", "eio"],
)
def test_storage_faults_are_raised_not_quarantined(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: OSError
) -> None:
    write_good_reports(store)
    put_bytes(store, partition(NEW, "truncated.parquet"), truncated_file(tmp_path))
    fs, _ = filesystem(store)
    real_open = type(fs)._open

    def faulty_open(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith(".parquet"):
            raise fault
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "_open", faulty_open)
    for read in (
        lambda: scored_contents(store, "bottle", "v1", NEW),
        lambda: quarantine_corrupt_reports(store),
        lambda: query_reports(store),
    ):
        with pytest.raises(StoreError) as caught:
            read()
        assert not isinstance(caught.value, CorruptReportError)
        assert isinstance(caught.value.__cause__, type(fault))
    monkeypatch.undo()

    assert "truncated.parquet" in listed_names(store)
    assert not exists(quarantined(store, NEW, "truncated.parquet")[0])


def test_corrupt_report_error_survives_pickling() -> None:
    error = CorruptReportError("s3://b/x.parquet", "no Parquet magic bytes", "cannot read: x")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.url, copy.reason, str(copy)) == (CorruptReportError, error.url, error.reason, str(error))


# ----------------------------------------------------------------------------- command line


def padim_report(store_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``padim report --store STORE ARGS`` in a subprocess, as a user would."""
    env = dict(os.environ, PADIM_PROGRESS="0", PREFECT_HOME=str(tmp_path / "prefect"), PYTHONWARNINGS="ignore")
    for name in ("PADIM_STORE", "PADIM_DEBUG", "PADIM_VERBOSE", "PREFECT_API_URL"):
        env.pop(name, None)
    command = [sys.executable, "-m", "padim_cli.main", "report", "--store", store_url, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_cli_report_sorts_numerically_and_errors_in_one_line(local_store: str, tmp_path: Path) -> None:
    write_good_reports(local_store)
    put_bytes(local_store, partition(MIDDLE, "text-score.parquet"), text_score_file(tmp_path))

    top = padim_report(local_store, tmp_path, "--top", "4", "--format", "csv")
    assert top.returncode == 0, top.stderr
    scores = [float(row["score"]) for row in csv.DictReader(io.StringIO(top.stdout))]
    assert scores == [100.0, 55.5, 30.25, 10.5]
    assert "text-score.parquet" in top.stderr and "Traceback" not in top.stderr

    put_bytes(local_store, partition(OLD, "random.parquet"), random_file())
    summary = padim_report(local_store, tmp_path, "--summary")
    assert summary.returncode == 1
    lines = [line for line in summary.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "random.parquet" in lines[0], summary.stderr
    assert_one_short_line(lines[0])
