"""Invariance: the same images give the same scores, maps and statistics however the work is split.

A fitted model is shared by every task thread of a process (``padim.jobs.inspection.cached_model``), so
these tests run what ships - the default configuration (EfficientNet-Lite0 with its packaged
ImageNet weights, 224 px, every channel), the engine's own functions and the real score flow - on a
night of more images than one shard, and compare against one reference pass:

* scores and anomaly maps (relative 1e-5) for 1, 4 and 8 threads sharing one model, shard sizes 1,
  7, 50 and 500, and batch sizes 1, 5 and 32;
* the fast path (statistics and distances from the stage maps) against the plain one (the whole
  embedding);
* the score flow on 4 and 8 task threads with several shards, and a night scored in two runs;
* fit statistics against ``numpy.cov`` (1e-9) for every shard and batch split.

Before the engine was made re-entrant, the CPU scoring kept its stage maps in buffers that the next
call overwrote: with 4 threads most scores of a night were wrong (up to 2x), which the thread
cases here catch.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from padim_prefect.flows.runners import with_task_runner
from padim_prefect.flows.score import score
from padim_prefect.flows.train import train

from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter
from padim.core.model import PadimModel
from padim.core.statistics import GaussianAccumulator
from padim.io.artifact import load_model
from padim.io.loading import iter_batches
from padim.jobs.engine import fit_images, score_images
from padim.jobs.inspection import cached_model
from padim.jobs.training import fit_shard, merge_partials
from padim.reports import query_reports
from padim.settings import ScoreSettings, TrainSettings
from tests.flow_helpers import local_dir, write_images

pytest_plugins = ["tests.prefect_harness"]

PRODUCT = "part"
N_TRAIN = 24
N_NORMAL, N_DEFECT = 48, 12
SIDE = 96
RTOL = 1e-5


@dataclass
class Reference:
    """A trained store and one reference pass over the night.

    Attributes:
        root: Working folder.
        store: Store root.
        normal: Folder of the training images.
        night: Folder of the night's images.
        uris: The night's image URIs, sorted.
        model_url: The trained version's folder.
        scores: Reference image score per file name.
        maps: Reference anomaly map per file name, ``(S, S)``.
    """

    root: Path
    store: str
    normal: str
    night: str
    uris: list[str]
    model_url: str
    scores: dict[str, float]
    maps: dict[str, np.ndarray]


def name_of(uri: str) -> str:
    """File name of a URI (the key that survives copying a night elsewhere)."""
    return uri.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def reference(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("invariance")
    normal = local_dir(root / "normal")
    night = local_dir(root / "night")
    write_images(normal, N_TRAIN, seed=71, size=SIDE)
    uris = write_images(night, N_NORMAL, N_DEFECT, seed=72, size=SIDE)
    store = str(root / "store")
    trained = train(product=PRODUCT, normal_url=normal, store=store, device="cpu")  # every default
    model = load_model(trained["url"])  # its own copy: the cached one is what the cases share
    scores, maps = {}, {}
    for result in score_images(model, uris, batch_size=32, keep_maps="all"):
        assert result.ok and result.anomaly_map is not None and result.score is not None
        scores[name_of(result.record.uri)] = result.score
        maps[name_of(result.record.uri)] = result.anomaly_map
    return Reference(root, store, normal, night, uris, trained["url"], scores, maps)


def assert_matches(reference: Reference, scores: dict[str, float], maps: dict[str, np.ndarray] | None, case: str):
    """Every image's score (and map) equals the reference to relative :data:`RTOL`."""
    assert sorted(scores) == sorted(reference.scores), f"{case}: not every image was scored once"
    worst = max(abs(scores[n] - reference.scores[n]) / reference.scores[n] for n in scores)
    assert worst <= RTOL, f"{case}: a score differs from the reference by {worst:.2e} (relative)"
    if maps is not None:
        for name, got in maps.items():
            expected = reference.maps[name]
            error = float(np.abs(got - expected).max()) / float(np.abs(expected).max())
            assert error <= RTOL, f"{case}: the anomaly map of {name} differs by {error:.2e} (relative)"


def score_in_threads(
    model: PadimModel, uris: Sequence[str], threads: int, shard_size: int, batch_size: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Score shards of ``uris`` on ``threads`` threads that all share ``model``."""
    shards = [list(uris[i : i + shard_size]) for i in range(0, len(uris), shard_size)]

    def run(shard: list[str]) -> list[tuple[str, float, np.ndarray]]:
        results = score_images(model, shard, batch_size=batch_size, keep_maps="all", num_workers=1)
        return [(name_of(r.record.uri), float(r.score or 0.0), r.anomaly_map) for r in results]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = [row for part in pool.map(run, shards) for row in part]
    return {n: s for n, s, _ in rows}, {n: m for n, _, m in rows}


CASES = [
    # (threads, shard size, batch size)
    (1, 7, 5),
    (4, 7, 5),
    (8, 7, 5),
    (4, 1, 32),
    (4, 50, 32),
    (4, 500, 32),
    (1, 500, 1),
    (1, 500, 5),
]


@pytest.mark.slow
@pytest.mark.parametrize(("threads", "shard_size", "batch_size"), CASES)
def test_shared_model_scores_do_not_depend_on_threads_shards_or_batches(
    reference: Reference, threads: int, shard_size: int, batch_size: int
) -> None:
    # The one model a process's task threads share.
    model = cached_model(reference.model_url, ScoreSettings(device="cpu"))
    scores, maps = score_in_threads(model, reference.uris, threads, shard_size, batch_size)
    assert_matches(reference, scores, maps, f"{threads} threads, shards of {shard_size}, batches of {batch_size}")


@pytest.mark.slow
def test_fast_and_plain_paths_score_alike(reference: Reference) -> None:
    fast = load_model(reference.model_url)
    plain = load_model(reference.model_url)
    plain.path = "plain"
    for model, case in ((fast, "fast path"), (plain, "plain path")):
        results = list(score_images(model, reference.uris, batch_size=32, keep_maps="all"))
        scores = {name_of(r.record.uri): float(r.score or 0.0) for r in results}
        maps = {name_of(r.record.uri): r.anomaly_map for r in results if r.anomaly_map is not None}
        assert_matches(reference, scores, maps, case)


# ---- fit statistics -------------------------------------------------------------------------------------------


def numpy_reference(
    uris: Sequence[str], config: PadimConfig, positions: Sequence[int], batch_size: int, shard_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ``numpy.cov`` of the embeddings at some positions, from the whole-embedding path.

    The embeddings are computed in the batches the fit under test sees (``shard_size`` images per
    shard, ``batch_size`` per batch): the network's own float32 rounding can depend on the batch
    composition (oneDNN picks kernels by shape), and what is compared here is the statistics.

    Returns:
        ``(means (k, d), covariances (k, d, d))``, float64.
    """
    fitter = PadimFitter(config, "cpu")
    shard_size = shard_size or len(uris)
    rows = []
    for start in range(0, len(uris), shard_size):
        shard = list(uris[start : start + shard_size])
        for batch in iter_batches(shard, fitter.preprocessor(normalize=False), batch_size):
            assert batch.images is not None and not batch.failed
            embedding = fitter.extractor.extract(batch.images).embedding()  # (B, d, H, W)
            rows.append(embedding.flatten(2)[:, :, list(positions)].double())  # (B, d, k)
    data = torch.cat(rows).permute(2, 0, 1).numpy()  # (k, N, d)
    return data.mean(axis=1), np.stack([np.cov(x, rowvar=False, ddof=1) for x in data])


def assert_statistics(
    accumulator: GaussianAccumulator, expected: tuple[np.ndarray, np.ndarray], positions: Sequence[int], case: str
) -> None:
    """The accumulator's mean and covariance equal ``numpy`` at the sampled positions to 1e-9."""
    means, covariances = expected
    mean = accumulator.mean[list(positions)].cpu().numpy()
    covariance = np.stack([accumulator.covariance_block(p, p + 1, 0.0)[0].cpu().numpy() for p in positions])
    mean_error = np.abs(mean - means).max() / np.abs(means).max()
    cov_error = np.abs(covariance - covariances).max() / np.abs(covariances).max()
    assert mean_error <= 1e-9 and cov_error <= 1e-9, f"{case}: mean {mean_error:.1e}, covariance {cov_error:.1e}"


@pytest.mark.slow
def test_fit_statistics_equal_numpy_for_every_batch_size_and_path(reference: Reference) -> None:
    from padim.io.listing import list_images

    uris = list_images(reference.normal)
    config = PadimConfig()  # what ships
    positions = (0, 57, 1000, 1567, 3135)  # corners, interior and centre of the 56 x 56 grid
    for batch_size, path in ((32, "auto"), (1, "auto"), (5, "auto"), (32, "plain")):
        expected = numpy_reference(uris, config, positions, batch_size)
        fitted = fit_images(uris, config, batch_size=batch_size, device="cpu", path=path)
        assert fitted.accumulator.n == N_TRAIN
        assert_statistics(fitted.accumulator, expected, positions, f"batches of {batch_size}, {path} path")


@pytest.mark.slow
def test_fit_statistics_merged_from_shards_equal_numpy_for_every_shard_size(reference: Reference) -> None:
    from padim.io.listing import list_images

    uris = list_images(reference.normal)
    # Partial statistics of the default model are ~0.4 GB each; a 64 px input with 40 of the
    # channels keeps the same code path (per-stage selection, cell statistics) at 1/200 of it.
    config = PadimConfig(image_size=64, channels=40)
    positions = (0, 17, 100, 255)
    work = reference.root / "partials"
    for shard_size in (1, 7, 50):
        expected = numpy_reference(uris, config, positions, 5, shard_size)
        settings = TrainSettings(device="cpu", shard_size=shard_size, batch_size=5)
        shards = [uris[i : i + shard_size] for i in range(0, len(uris), shard_size)]
        outcomes = [
            fit_shard(shard, config, str(work / f"s{shard_size}-{i}.safetensors"), settings)
            for i, shard in enumerate(shards)
        ]
        merged = merge_partials([o.partial_url for o in outcomes if o.partial_url], None)
        assert merged.n == N_TRAIN
        assert_statistics(merged, expected, positions, f"shards of {shard_size} merged")


# ---- the score flow ---------------------------------------------------------------------------------------------


def report_scores(store: str, day: str) -> dict[str, float]:
    """Score per file name of one night's report (one row per image is asserted)."""
    rows = query_reports(store, product=PRODUCT, since=day, until=day)
    assert rows["image_uri"].is_unique, f"{day}: an image has more than one row"
    assert set(rows["status"]) == {"ok"}, rows[rows["status"] != "ok"][["image_uri", "error"]]
    return {name_of(u): float(s) for u, s in zip(rows["image_uri"], rows["score"], strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("threads", [4, 8])
def test_the_score_flow_on_several_threads_and_shards_matches_the_reference(reference: Reference, threads: int) -> None:
    day = f"2026-12-0{threads // 4}"  # a night of its own: nothing is skipped as already scored
    flow = with_task_runner(score, "threads", workers=threads)
    result = flow(product=PRODUCT, images_url=reference.night, store=reference.store, date=day, device="cpu",
                  shard_size=7, heatmaps=False)  # fmt: skip
    assert result["n_scored"] == len(reference.uris) > 7 and result["n_skipped"] == 0
    assert_matches(reference, report_scores(reference.store, day), None, f"score flow on {threads} threads")


@pytest.mark.slow
def test_a_night_scored_in_two_runs_equals_one_run(reference: Reference) -> None:
    night = Path(local_dir(reference.root / "split-night"))
    sources = sorted(Path(reference.night).iterdir())
    first, second = sources[::2], sources[1::2]  # the camera delivered half the night before the first run
    for path in first:
        shutil.copy(path, night / path.name)
    day = "2026-12-10"
    one = score(product=PRODUCT, images_url=str(night), store=reference.store, date=day, device="cpu", shard_size=7)
    for path in second:
        shutil.copy(path, night / path.name)
    two = score(product=PRODUCT, images_url=str(night), store=reference.store, date=day, device="cpu", shard_size=7)
    assert (one["n_scored"], one["n_skipped"]) == (len(first), 0)
    assert (two["n_scored"], two["n_skipped"]) == (len(second), len(first))
    assert_matches(reference, report_scores(reference.store, day), None, "a night in two runs")
