"""Store trust: a model manifest cannot make scoring open arbitrary files as backbone weights.

A tiny model (random-initialised ResNet18 at 32 px, d = 20) is published the normal way; each test
copies the store and then forges the version's manifest as someone with write access to the store
could: rewrite ``manifest.json`` and re-seal ``_COMPLETE`` with the new manifest's sha256 (the store's
own checks then pass). Loading or scoring such a version must fail with a one-line error, before the
weights are opened, and no message may suggest ``weights_only=False``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import save_file

import padim.core.backbones
from padim.core.backbones import RANDOM_WEIGHTS, load_backbone
from padim.core.backbones import weights as weights_module
from padim.core.backbones.resnet import build_resnet
from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter, build_model
from padim.core.model import PadimModel, Thresholds, TrainingInfo
from padim.errors import WeightsMismatchError, WeightsNotAllowedError, WeightsUnavailableError
from padim.io.artifact import load_model, save_model
from padim.io.store import ModelStore
from padim.io.store_layout import COMPLETE_MARKER, MANIFEST_NAME, store_root_of
from padim.io.weights_trust import _RANDOM_WEIGHTS, WEIGHTS_ALLOW_ENV_VAR, check_manifest_weights
from padim.jobs.inspection import resolve_model
from padim.settings import ScoreSettings

PRODUCT = "widget"
SIDE = 32
CONFIG = PadimConfig(backbone="resnet18", weights="random", image_size=SIDE, crop_size=SIDE, channels=20)


# ---- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """A store holding one version of :data:`PRODUCT`, and what that model scores on a probe."""

    root: Path
    version: str
    probe: torch.Tensor
    scores: torch.Tensor


def images(n: int, seed: int) -> torch.Tensor:
    """Random "normalised images" ``(n, 3, SIDE, SIDE)``."""
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def write_weights(path: Path, seed: int) -> str:
    """Write a ResNet18 state dict as safetensors (no pickle) and return its sha256."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {k: v.contiguous() for k, v in build_resnet("resnet18").state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit(config: PadimConfig) -> PadimModel:
    """Fit a model of ``config`` on a few random images, with thresholds (scoring needs them)."""
    fitter = PadimFitter(config, runtime="torch")
    fitter.update(images(6, seed=1))
    training = TrainingInfo(n_train=6, training_set_sha256="ab" * 32)
    thresholds = Thresholds(image=10.0, pixel=8.0, image_fpr=0.01, pixel_fpr=0.001, n_images=4)
    return build_model(fitter, training=training, thresholds=thresholds)


def publish(root: Path, model: PadimModel) -> str:
    """Publish a model into the store at ``root`` the normal way."""
    return ModelStore(str(root)).publish(PRODUCT, lambda url: save_model(model, url))


def version_dir(root: Path, version: str) -> Path:
    """Folder of a version in a local store."""
    return root / PRODUCT / "models" / version


def forge(root: Path, version: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a version's manifest and re-seal its ``_COMPLETE`` marker the way the store writes it."""
    folder = version_dir(root, version)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    change(manifest)
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (folder / MANIFEST_NAME).write_bytes(raw)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    marker["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
    (folder / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    ModelStore(str(root)).verify(PRODUCT, version)  # the forgery passes the store's own checks


def point_weights_at(weights: str, sha256: str | None = None) -> Callable[[dict[str, Any]], None]:
    """A manifest change naming other backbone weights (and optionally their digest)."""

    def change(manifest: dict[str, Any]) -> None:
        manifest["config"]["weights"] = weights
        manifest["weights_source"] = weights
        if sha256 is not None:
            manifest["weights_sha256"] = sha256

    return change


def load_and_score(root: Path, version: str) -> torch.Tensor:
    """Load a version from the store and score a probe (the backbone is loaded here)."""
    model = load_model(ModelStore(str(root)).version_url(PRODUCT, version))
    model.runtime = "torch"
    return model.predict(images(2, seed=3)).scores


def assert_one_line_refusal(error: BaseException, *parts: str) -> None:
    """The message is one line, names every part, and never suggests loading unsafely."""
    message = str(error)
    assert "\n" not in message, message
    assert "weights_only" not in message, message
    for part in parts:
        assert part in message, (part, message)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One published random-weights model and its scores on a probe."""
    root = tmp_path_factory.mktemp("trust") / "store"
    model = fit(CONFIG)
    version = publish(root, model)
    probe = images(2, seed=3)
    return Published(root=root, version=version, probe=probe, scores=model.predict(probe).scores)


@pytest.fixture
def store_copy(published: Published, tmp_path: Path) -> Path:
    """A private copy of the published store (forged per test)."""
    return Path(shutil.copytree(published.root, tmp_path / "store"))


@pytest.fixture
def no_weights_access(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if any weights file is located, hashed, opened or parsed."""
    touched: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            touched.append(name)
            raise AssertionError(f"{name} was called for refused weights: {args}")

        return call

    monkeypatch.setattr(weights_module, "fetch_to_local", refuse("fetch_to_local"))
    monkeypatch.setattr(weights_module, "sha256_file", refuse("sha256_file"))
    monkeypatch.setattr(weights_module.torch, "load", refuse("torch.load"))
    monkeypatch.setattr(fsspec, "open", refuse("fsspec.open"))
    return touched


@pytest.fixture
def fresh_backbones(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty backbone cache, so that scoring loads the weights file again."""
    monkeypatch.setattr(padim.core.backbones, "_CACHE", {})


@pytest.fixture(autouse=True)
def no_allow_list(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start every test without ``$PADIM_WEIGHTS_ALLOW``."""
    monkeypatch.delenv(WEIGHTS_ALLOW_ENV_VAR, raising=False)
    yield


# ---- refused before any weights file is opened -------------------------------------------------


def test_a_manifest_naming_etc_hostname_is_refused_before_opening_it(
    published: Published, store_copy: Path, no_weights_access: list[str]
) -> None:
    forge(store_copy, published.version, point_weights_at("/etc/hostname", "0" * 64))
    manifest = version_dir(store_copy, published.version) / MANIFEST_NAME

    with pytest.raises(WeightsNotAllowedError) as refused:
        load_and_score(store_copy, published.version)

    assert_one_line_refusal(refused.value, str(manifest), "'/etc/hostname'", WEIGHTS_ALLOW_ENV_VAR)
    assert no_weights_access == []


def test_scoring_refuses_the_forged_version_before_any_image(
    published: Published, store_copy: Path, no_weights_access: list[str]
) -> None:
    """The score flow's first step (resolve_model, which loads the model) stops on the forgery."""
    forge(store_copy, published.version, point_weights_at("/etc/hostname"))

    with pytest.raises(WeightsUnavailableError) as refused:
        resolve_model(ModelStore(str(store_copy)), PRODUCT, settings=ScoreSettings(device="cpu", runtime="torch"))

    assert isinstance(refused.value, WeightsNotAllowedError)
    assert_one_line_refusal(refused.value, MANIFEST_NAME, WEIGHTS_ALLOW_ENV_VAR)
    assert no_weights_access == []


def test_a_valid_weights_file_outside_the_store_is_refused(
    published: Published, store_copy: Path, tmp_path: Path, no_weights_access: list[str]
) -> None:
    """Even a genuine weights file with the right digest: the manifest may not choose where it lies."""
    outside = tmp_path / "elsewhere" / "resnet18.safetensors"
    digest = write_weights(outside, seed=11)
    forge(store_copy, published.version, point_weights_at(str(outside), digest))

    with pytest.raises(WeightsNotAllowedError) as refused:
        load_and_score(store_copy, published.version)

    assert_one_line_refusal(refused.value, str(outside), WEIGHTS_ALLOW_ENV_VAR)
    assert no_weights_access == []


@pytest.mark.parametrize(
    "escape",
    [
        "{store}/../elsewhere/resnet18.safetensors",  # climbs out of the store
        "{store}-other/resnet18.safetensors",  # shares the store's name as a prefix only
        "file://{outside}",  # the same outside file as a URL
        "{store}/{product}/link.safetensors",  # a symbolic link inside the store to a file outside
    ],
)
def test_paths_that_only_look_inside_the_store_are_refused(
    published: Published, store_copy: Path, tmp_path: Path, no_weights_access: list[str], escape: str
) -> None:
    outside = tmp_path / "elsewhere" / "resnet18.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"not used")
    (store_copy / PRODUCT / "link.safetensors").symlink_to(outside)
    weights = escape.format(store=store_copy, product=PRODUCT, outside=outside)
    forge(store_copy, published.version, point_weights_at(weights))

    with pytest.raises(WeightsNotAllowedError) as refused:
        load_and_score(store_copy, published.version)

    assert_one_line_refusal(refused.value, WEIGHTS_ALLOW_ENV_VAR)
    assert no_weights_access == []


def test_a_manifest_naming_another_bucket_is_refused_without_network(
    published: Published, store_copy: Path, no_weights_access: list[str]
) -> None:
    forge(store_copy, published.version, point_weights_at("s3://other-bucket/x.pth", "1" * 64))

    with pytest.raises(WeightsNotAllowedError) as refused:
        load_and_score(store_copy, published.version)

    assert_one_line_refusal(refused.value, "s3://other-bucket/x.pth", WEIGHTS_ALLOW_ENV_VAR)
    assert no_weights_access == []


def test_allow_list_entries_match_whole_prefixes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """URL prefixes end at a '/', '..' segments and '::' chains are refused; the store is always allowed."""
    version_url = str(tmp_path / "store" / PRODUCT / "models" / "v1")
    monkeypatch.setenv(WEIGHTS_ALLOW_ENV_VAR, f" s3://models/weights , {tmp_path / 'opt'} ")
    allowed = [
        None,
        RANDOM_WEIGHTS,
        "s3://models/weights/resnet18.pth",
        "s3://models/weights/sub/resnet18.pth",
        str(tmp_path / "opt" / "resnet18.pth"),
        str(tmp_path / "store" / "weights" / "resnet18.pth"),
    ]
    for weights in allowed:
        check_manifest_weights(weights, version_url)
    refused = [
        "s3://models/weightsX/resnet18.pth",
        "s3://models/weights/../../other-bucket/x.pth",
        "simplecache::s3://models/weights/x.pth",
        "gs://models/weights/x.pth",
        str(tmp_path / "optional" / "x.pth"),
        "/etc/hostname",
        "resnet18.pth",  # relative: resolved against the working directory, not the store
    ]
    for weights in refused:
        with pytest.raises(WeightsNotAllowedError):
            check_manifest_weights(weights, version_url)
    assert _RANDOM_WEIGHTS == RANDOM_WEIGHTS
    assert store_root_of("s3://bucket/padim/widget/models/v1") == "s3://bucket/padim"
    assert store_root_of(str(tmp_path / "model")) == str(tmp_path / "model")  # outside a store: itself


# ---- loaded only when the digest matches; never PyTorch's unsafe-load advice ----------------------


def test_a_weights_file_whose_sha256_differs_is_not_parsed(
    store_copy: Path, fresh_backbones: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model fitted with weights in the store; the file is then replaced: scoring refuses it unparsed."""
    weights = store_copy / "weights" / "resnet18.safetensors"
    fitted_digest = write_weights(weights, seed=11)
    version = publish(store_copy, fit(CONFIG.model_copy(update={"weights": str(weights)})))
    swapped_digest = write_weights(weights, seed=12)
    parsed: list[Path] = []
    monkeypatch.setattr(weights_module, "_parse_weights", lambda url, local: parsed.append(local))
    monkeypatch.setattr(padim.core.backbones, "_CACHE", {})

    with pytest.raises(WeightsMismatchError) as refused:
        load_and_score(store_copy, version)

    assert_one_line_refusal(refused.value, str(weights), fitted_digest, swapped_digest)
    assert parsed == []


def test_a_forged_digest_for_an_allowed_file_is_refused(
    published: Published, store_copy: Path, fresh_backbones: None
) -> None:
    weights = store_copy / "weights" / "resnet18.safetensors"
    actual = write_weights(weights, seed=11)
    forge(store_copy, published.version, point_weights_at(str(weights), "2" * 64))

    with pytest.raises(WeightsMismatchError) as refused:
        load_and_score(store_copy, published.version)

    assert_one_line_refusal(refused.value, str(weights), "2" * 64, actual)


def test_the_default_weights_must_be_the_ones_the_model_recorded(
    published: Published, store_copy: Path, fresh_backbones: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """weights=None uses the registry's file only if the model recorded the registry's digest.

    For ResNet18 that is known from torchvision's file name, so this is decided before the file
    is looked for or downloaded (nothing is fetched here).
    """
    forge(store_copy, published.version, point_weights_at(None, "3" * 64))  # type: ignore[arg-type]
    monkeypatch.setattr(padim.core.backbones, "download_to_torch_cache", lambda url: pytest.fail(f"download of {url}"))

    with pytest.raises(WeightsMismatchError) as refused:
        load_and_score(store_copy, published.version)

    assert_one_line_refusal(refused.value, "resnet18-f37072fd.pth", "f37072fd", "3" * 64)


def test_a_non_checkpoint_file_is_not_a_weights_file(
    published: Published, store_copy: Path, tmp_path: Path, fresh_backbones: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allowed, digest-matching file that is no checkpoint (like /etc/hostname): our own error."""
    allowed = tmp_path / "allowed"
    hostname = allowed / "hostname"
    allowed.mkdir()
    hostname.write_text("build-host-7\n")
    monkeypatch.setenv(WEIGHTS_ALLOW_ENV_VAR, str(allowed))
    digest = hashlib.sha256(hostname.read_bytes()).hexdigest()
    forge(store_copy, published.version, point_weights_at(str(hostname), digest))

    with pytest.raises(WeightsUnavailableError) as refused:
        load_and_score(store_copy, published.version)

    assert_one_line_refusal(refused.value, f"not a weights file: {hostname} (not a PyTorch checkpoint)")
    assert refused.value.__cause__ is None and refused.value.__context__ is None  # no PyTorch text in logs


def test_a_checkpoint_holding_python_objects_is_refused_in_our_words(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "hook": print}, path)  # needs builtins.print to load

    with pytest.raises(WeightsUnavailableError) as refused:
        load_backbone("resnet18", weights=str(path))

    assert_one_line_refusal(refused.value, f"not a weights file: {path}", "Python objects", "print")
    assert refused.value.__cause__ is None and refused.value.__context__ is None


# ---- what stays allowed ------------------------------------------------------------------------


def test_a_model_with_random_weights_loads_and_scores_as_published(published: Published) -> None:
    scores = load_and_score(published.root, published.version)
    assert torch.allclose(scores, published.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("place", ["store", "allow-list"])
def test_a_model_with_allowed_weights_loads_and_scores(
    tmp_path: Path, fresh_backbones: None, monkeypatch: pytest.MonkeyPatch, place: str
) -> None:
    """Weights in the store, or in a folder of $PADIM_WEIGHTS_ALLOW, with the recorded digest."""
    root = tmp_path / "store"
    folder = root / "weights" if place == "store" else tmp_path / "opt-weights"
    if place == "allow-list":
        monkeypatch.setenv(WEIGHTS_ALLOW_ENV_VAR, f"s3://unused/prefix,{folder}")
    weights = folder / "resnet18.safetensors"
    digest = write_weights(weights, seed=11)
    model = fit(CONFIG.model_copy(update={"weights": str(weights)}))  # the operator's --weights
    version = publish(root, model)
    assert model.weights_sha256 == digest
    monkeypatch.setattr(padim.core.backbones, "_CACHE", {})

    scores = load_and_score(root, version)

    assert torch.allclose(scores, model.predict(images(2, seed=3)).scores, rtol=1e-5, atol=1e-5)


def test_training_with_an_explicit_weights_file_anywhere_stays_allowed(tmp_path: Path) -> None:
    """The operator's --weights is not restricted by the allow-list (only manifests are)."""
    weights = tmp_path / "anywhere" / "resnet18.safetensors"
    digest = write_weights(weights, seed=13)
    assert load_backbone("resnet18", weights=str(weights)).weights_sha256 == digest
