"""The flows with everything on object storage: images, model store, reports and heat maps on S3 (moto)."""

from __future__ import annotations

import fsspec
import httpx
import pytest
from padim_prefect.flows.score import score
from padim_prefect.flows.train import train
from padim_prefect.flows.watch import watch
from padim_prefect.tasks.events import NORMAL_IMAGES_ADDED

from padim.io.artifact import read_training_images
from padim.io.fsio import exists
from padim.io.store import ModelStore
from padim.jobs.landing import list_batches, marker_url
from padim.jobs.products import update_product_settings
from padim.reports import query_reports, scored_images
from padim.settings import HEATMAP_ARTIFACTS
from tests.flow_helpers import (
    CHEAP_MODEL,
    events_named,
    record_events,
    write_images,
)
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401
from tests.test_flows import artifact_markdown

pytest_plugins = ["tests.prefect_harness"]  # one harness per session, however many modules use it

PRODUCT = "bottle"
DAY = "2026-11-25"


@pytest.mark.slow
def heatmap_image_artifacts(key: str) -> list[str]:
    """The URLs of the newest run's heat-map image artifacts (keys ``<key>-heatmap-N``), in rank order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["image"])), sort=ArtifactSort.CREATED_DESC
        )
    latest = {}
    for artifact in artifacts:  # newest first: keep each key's newest
        if artifact.key and artifact.key.startswith(f"{key}-heatmap-"):
            latest.setdefault(artifact.key, str(artifact.data))
    return [latest[k] for k in sorted(latest, key=lambda k: int(k.rsplit("-", 1)[1]))]


def test_train_then_score_on_s3(prefect_harness: None, s3_bucket: str) -> None:  # noqa: F811
    normal = f"{s3_bucket}/images/normal"
    night = f"{s3_bucket}/images/night/{DAY}"
    store = f"{s3_bucket}/padim-store"
    write_images(normal, 12, seed=1)
    uris = write_images(night, 4, 2, seed=2)

    trained = train(product=PRODUCT, normal_url=normal, store=store, shard_size=4, **CHEAP_MODEL)

    model_store = ModelStore(store)
    assert trained["url"].startswith(f"{store}/{PRODUCT}/models/")
    assert [v.version for v in model_store.versions(PRODUCT)] == [trained["version"]]
    assert model_store.latest(PRODUCT) == trained["version"]
    images = read_training_images(trained["url"])
    assert len(images["fit"]) == trained["n_train"] and all(u.startswith(normal) for u, _ in images["fit"])
    fs, work = fsspec.core.url_to_fs(f"{store}/{PRODUCT}/work")
    fs.invalidate_cache()
    assert not fs.find(work)  # partial statistics removed

    first = score(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu", shard_size=4)

    rows = query_reports(store, product=PRODUCT, since=DAY, until=DAY)
    assert sorted(rows["image_uri"]) == uris
    assert set(rows["status"]) == {"ok"} and set(rows["model_version"]) == {trained["version"]}
    assert all(f.startswith(f"{store}/reports/product={PRODUCT}/date={DAY}/") for f in first["report_files"])
    defects = [u for u in uris if "defect" in u]
    anomalous = rows[rows["is_anomaly"].astype(bool)]
    assert set(defects) <= set(anomalous["image_uri"])
    assert first["n_anomalies"] == len(anomalous) and first["n_scored"] == len(uris) == first["n_images"]
    for heatmap in anomalous["heatmap_uri"]:
        assert heatmap.startswith(f"{store}/{PRODUCT}/heatmaps/{DAY}/") and exists(heatmap)
    images = heatmap_image_artifacts(f"inspection-{PRODUCT}")
    assert 1 <= len(images) <= min(len(anomalous), HEATMAP_ARTIFACTS)
    for url in images:  # presigned: a browser opens them with no credentials
        response = httpx.get(url, timeout=30)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG"), url
    assert f"[heat map]({images[0]})" in artifact_markdown(f"inspection-{PRODUCT}")[0]

    second = score(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu", shard_size=4)

    assert second["n_skipped"] == len(uris) and second["n_scored"] == 0 and second["report_files"] == []
    assert len(query_reports(store, product=PRODUCT, since=DAY, until=DAY)) == len(uris)
    assert scored_images(store, PRODUCT, trained["version"]) == set(uris)


def test_watch_on_an_s3_landing_prefix(
    prefect_harness: None,
    s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = record_events(monkeypatch)
    landing = f"{s3_bucket}/landing/{PRODUCT}"
    store = ModelStore(f"{s3_bucket}/padim-store")
    write_images(f"{landing}/batch-1", 2, seed=3)
    write_images(f"{landing}/batch-2", 1, seed=4)
    update_product_settings(store, PRODUCT, landing_url=landing)

    first = watch(store=store.root, product=PRODUCT, settle_seconds=0)
    second = watch(store=store.root, product=PRODUCT, settle_seconds=0)

    assert [(a["batch"], a["batch_url"], a["n_images"]) for a in first] == [
        ("batch-1", f"{landing}/batch-1", 2),
        ("batch-2", f"{landing}/batch-2", 1),
    ]
    assert second == []
    assert [e["payload"]["batch"] for e in events_named(events, NORMAL_IMAGES_ADDED)] == ["batch-1", "batch-2"]
    assert all(exists(marker_url(store, PRODUCT, batch)) for batch in list_batches(landing))
