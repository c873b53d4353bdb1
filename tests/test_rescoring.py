"""Re-scoring semantics (docs/reports.md, "What a score run skips"), through the real score flow.

An image is identified by its URI *and* the sha256 of its bytes, within one production night:

* re-running a night adds no rows (every image is read and hashed, none decoded or scored again);
* a file rewritten under the same name is scored again, and its new row is the one queries show;
* an unchanged file that appears on a later night is scored again on that night: one row per night;
* the already-scored lookup reads only the night's own report partition (a damaged file in another
  night's partition does not matter).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from padim_prefect.flows.score import score

import padim.reports.query
from padim.reports import query_reports
from tests.flow_helpers import png_bytes, texture
from tests.reliability_support import PRODUCT, TrainedStore, fast_retries, local_dir, trained_store, write_images

pytest_plugins = ["tests.prefect_harness"]

NIGHT_1, NIGHT_2 = "2026-11-25", "2026-11-26"


@pytest.fixture(scope="module")
def trained(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    return trained_store(tmp_path_factory)


def rows_of(store: str, day: str) -> dict[str, dict]:
    """The night's rows as users query them, by image URI (one row per image asserted)."""
    frame = query_reports(store, product=PRODUCT, since=day, until=day)
    assert frame["image_uri"].is_unique
    return {row["image_uri"]: row for row in frame.to_dict("records")}


def run(store: str, night: str, day: str) -> dict:
    """One score run of a folder on a night (cheap model, CPU, shards of 2)."""
    return score(product=PRODUCT, images_url=night, store=store, date=day, device="cpu", shard_size=2)


def test_a_rerun_adds_nothing_and_a_rewritten_file_is_scored_again(trained: TrainedStore, tmp_path: Path) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    images = write_images(night, 4, 1, seed=31, prefix="cam")

    first = run(store, night, NIGHT_1)
    again = run(store, night, NIGHT_1)
    before = rows_of(store, NIGHT_1)
    assert (first["n_scored"], first["n_skipped"]) == (5, 0)
    assert (again["n_scored"], again["n_skipped"]) == (0, 5) and again["report_files"] == []

    # The camera reuses a file name for a new picture the same night: it is scored again.
    rewritten = images[0]
    Path(rewritten).write_bytes(png_bytes(texture(np.random.default_rng(99))))
    third = run(store, night, NIGHT_1)
    after = rows_of(store, NIGHT_1)
    assert (third["n_scored"], third["n_skipped"]) == (1, 4)
    assert set(after) == set(images)  # still one row per image
    assert after[rewritten]["image_sha256"] != before[rewritten]["image_sha256"]
    assert after[rewritten]["score"] != before[rewritten]["score"]
    for uri in images[1:]:
        assert after[uri]["run_id"] == before[uri]["run_id"]  # untouched images keep their first row


def test_an_unchanged_file_on_a_later_night_is_scored_on_that_night_too(trained: TrainedStore, tmp_path: Path) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    images = write_images(night, 3, seed=32, prefix="again")

    run(store, night, NIGHT_1)
    later = run(store, night, NIGHT_2)

    assert (later["n_scored"], later["n_skipped"]) == (3, 0)
    one, two = rows_of(store, NIGHT_1), rows_of(store, NIGHT_2)
    assert set(one) == set(two) == set(images)
    for uri in images:  # same bytes, same model: the same score on both nights' rows
        assert one[uri]["image_sha256"] == two[uri]["image_sha256"]
        assert two[uri]["score"] == pytest.approx(one[uri]["score"], rel=1e-6)
    everything = query_reports(store, product=PRODUCT)
    assert len(everything) == 2 * len(images)


def test_the_already_scored_lookup_reads_only_the_nights_partition(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    write_images(night, 3, seed=33, prefix="lookup")
    run(store, night, NIGHT_1)
    # Another night's partition holds a damaged file: tonight's lookup never opens it.
    other = Path(store) / "reports" / f"product={PRODUCT}" / "date=2026-10-01"
    other.mkdir(parents=True)
    (other / "damaged.parquet").write_bytes(b"not parquet at all")
    listed: list[tuple[object, object]] = []
    real = padim.reports.query.list_report_files

    def recording(store_url: str, **scope: object) -> list:
        listed.append((scope.get("since"), scope.get("until")))
        return real(store_url, **scope)

    monkeypatch.setattr(padim.reports.query, "list_report_files", recording)

    rerun = run(store, night, NIGHT_1)

    assert (rerun["n_scored"], rerun["n_skipped"]) == (0, 3)
    assert listed and all(str(since) == str(until) == NIGHT_1 for since, until in listed), listed
    shutil.rmtree(other)


def test_a_failed_compaction_is_retried_by_the_next_run(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import padim_prefect.tasks.scoring

    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    images = write_images(night, 4, seed=34, prefix="compact")
    partition = Path(store) / "reports" / f"product={PRODUCT}" / f"date={NIGHT_1}"
    real = padim_prefect.tasks.scoring.compact_partition

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError("disk full while compacting")

    monkeypatch.setattr(padim_prefect.tasks.scoring, "compact_partition", failing)
    fast_retries(monkeypatch, padim_prefect.tasks.scoring.compact_partition_task)
    first = run(store, night, NIGHT_1)  # shards of 2: two report files, compaction fails (a warning)
    assert first["n_scored"] == len(images)
    assert len(list(partition.glob("*.parquet"))) == 2

    monkeypatch.setattr(padim_prefect.tasks.scoring, "compact_partition", real)
    again = run(store, night, NIGHT_1)  # nothing new to score, but the partition is compacted now
    assert (again["n_scored"], again["n_skipped"]) == (0, len(images)) and again["report_files"] == []
    assert len(list(partition.glob("*.parquet"))) == 1
    assert set(rows_of(store, NIGHT_1)) == set(images)
