"""The OpenVINO backbone runtime against torch: same taps, same scores, re-entrant, converted once.

The CPU default (``runtime="auto"``) runs the backbone with OpenVINO in float32; torch stays for the
GPU and as a fallback. What must hold: every backbone's taps equal torch's to 1e-5 relative (on real
images where ``../shared/datasets`` is present, on generated textures everywhere), a whole model's
image scores to 1e-4, several threads can call one network at once, and a network is converted
once per machine (the cache survives the process; a new input shape is a new conversion).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import padim.core.backbones.runtime as runtime_module
from padim.core.backbones import get_backbone, load_backbone, resolve_runtime
from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter, build_model
from padim.core.preprocessing import Preprocessor
from padim.errors import ConfigError
from tests.flow_helpers import texture

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("openvino")

TAP_RTOL = 1e-5
SCORE_RTOL = 1e-4


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Converted networks of this module go to a folder of its own (shared by its tests)."""
    root = tmp_path_factory.getbasetemp() / "openvino-cache"
    monkeypatch.setenv("PADIM_CACHE", str(root))
    return root / "openvino"


def real_or_generated(shared_dir: Path, count: int = 6) -> list[Image.Image]:
    """Images of both shared data sets when present, generated textures otherwise."""
    images: list[Image.Image] = []
    for name in ("mvtec_bottle", "magnetic_tile"):
        folder = shared_dir / "datasets" / name / "test"
        if folder.is_dir():
            paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg"})[: count // 2]
            images += [Image.open(p).convert("RGB") for p in paths]
    rng = np.random.default_rng(3)
    while len(images) < count:
        images.append(Image.fromarray(texture(rng, 160)))
    return images


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


BACKBONES = [("efficientnet_lite0", None, 224), ("resnet18", "random", 96), ("wide_resnet50_2", "random", 64)]
"""Every backbone (ResNets with seeded random weights: no ImageNet ResNet weights offline)."""


@pytest.mark.parametrize(("name", "weights", "side"), BACKBONES)
def test_openvino_taps_equal_torchs(name: str, weights: str | None, side: int, shared_dir: Path) -> None:
    torch_backbone = load_backbone(name, weights, runtime="torch")
    openvino_backbone = load_backbone(name, weights, runtime="openvino")
    assert openvino_backbone.runtime == "openvino" and torch_backbone.runtime == "torch"
    config = PadimConfig(backbone=name, weights=weights, image_size=side)
    preprocess = Preprocessor(config, torch_backbone.spec.mean, torch_backbone.spec.std)
    images = torch.stack([preprocess(image) for image in real_or_generated(shared_dir)])
    batch = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for start in range(0, len(batch), openvino_backbone.micro_batch):
            chunk = batch[start : start + openvino_backbone.micro_batch]  # the last one is padded
            expected, got = torch_backbone.tap(chunk), openvino_backbone.tap(chunk)
            for stage, (a, b) in enumerate(zip(got, expected, strict=True)):
                assert a.shape == b.shape and a.dtype == torch.float32
                assert a.is_contiguous(memory_format=torch.channels_last)
                assert relative(a, b) <= TAP_RTOL, f"{name} tap {stage}: {relative(a, b):.2e}"


def test_a_whole_models_scores_equal_on_both_runtimes() -> None:
    rng = np.random.default_rng(4)
    train = torch.from_numpy(np.stack([texture(rng, 224) for _ in range(12)])).permute(0, 3, 1, 2).contiguous()
    probe = torch.from_numpy(np.stack([texture(rng, 224) for _ in range(5)])).permute(0, 3, 1, 2).contiguous()
    probe[2, :, 80:110, 80:110] = 255  # a defect
    config = PadimConfig()
    scores = {}
    for runtime in ("torch", "openvino"):
        fitter = PadimFitter(config, "cpu", runtime=runtime)
        assert fitter.backbone.runtime == runtime
        fitter.update(train)
        model = build_model(fitter, runtime=runtime)
        scores[runtime] = model.predict(probe).scores
    error = float(((scores["openvino"] - scores["torch"]).abs() / scores["torch"]).max())
    assert error <= SCORE_RTOL, f"image scores differ by {error:.2e}"
    assert int(scores["openvino"].argmax()) == 2


def test_one_network_serves_several_threads_at_once() -> None:
    backbone = load_backbone("resnet18", "random", runtime="openvino")
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, 64, 64, generator=generator) for _ in range(12)]
    expected = [backbone.tap(b) for b in batches]
    barrier = threading.Barrier(4)

    def run(index: int) -> list[torch.Tensor]:
        if index < 4:
            barrier.wait()  # the first four start together
        return backbone.tap(batches[index])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(len(batches))))
    for want, got in zip(expected, results, strict=True):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_a_network_is_converted_once_per_shape_and_kept_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PADIM_CACHE", str(tmp_path))
    own_cache = tmp_path / "openvino"
    conversions: list[tuple[int, int]] = []
    real = runtime_module.convert_network

    def counted(network: torch.nn.Module, batch: int, side: int, target: Path) -> None:
        conversions.append((batch, side))
        real(network, batch, side, target)

    monkeypatch.setattr(runtime_module, "convert_network", counted)
    images = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    first = load_backbone("resnet18", "random", runtime="openvino").tap(images)
    again = load_backbone("resnet18", "random", runtime="openvino").tap(images)  # a new process would do this
    other = load_backbone("resnet18", "random", runtime="openvino").tap(images[:, :, :32, :32])
    assert conversions == [(8, 48), (8, 32)], conversions
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert other[0].shape[-1] == 8
    kept = sorted(p.name for p in own_cache.iterdir())
    assert len(kept) == 4 and all(not name.startswith(".") for name in kept), kept  # .xml + .bin each, no temp
    assert not any("models" in str(p) for p in own_cache.rglob("*"))


def test_runtime_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu) == "openvino"
    assert resolve_runtime("torch", cpu) == "torch"
    assert resolve_runtime("auto", cuda) == "torch"  # the GPU runs torch
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_runtime("openvino", cuda)
    with pytest.raises(ConfigError, match="runtime must be"):
        resolve_runtime("tensorrt", cpu)
    assert get_backbone("resnet18", "random", "cpu").runtime == "openvino"


def test_without_openvino_auto_falls_back_to_torch_and_openvino_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "openvino_available", lambda: False)
    assert resolve_runtime("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="pip install openvino"):
        resolve_runtime("openvino", torch.device("cpu"))


def test_bf16_runs_in_bf16_or_is_refused_where_the_cpu_lacks_it() -> None:
    import openvino

    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:  # OpenVINO itself would quietly run float32 and call it bf16
        with pytest.raises(ConfigError, match=r"precision='bf16'.*--precision f32"):
            load_backbone("resnet18", "random", runtime="openvino", precision="bf16")
        return
    exact = load_backbone("resnet18", "random", runtime="openvino").tap(images)
    reduced = load_backbone("resnet18", "random", runtime="openvino", precision="bf16").tap(images)
    for a, b in zip(reduced, exact, strict=True):
        assert 0 < relative(a, b) <= 0.1  # really bfloat16 (not equal), and close


PROBE_TELEMETRY = """
import multiprocessing, os, sys
started = []
multiprocessing.Process.start = lambda self: started.append(repr(self))
os.fork = lambda: started.append("fork") or 0
from padim.core.backbones import load_backbone
from padim.core.backbones import runtime
assert runtime.openvino_available()
import openvino  # a plain import after padim's sends nothing either
network = load_backbone("resnet18", "random", runtime="torch").network
runtime.convert_network(network, 2, 32, runtime.Path(sys.argv[1]))
print("started:", started, "telemetry:", sys.modules.get("openvino_telemetry"))
"""


def test_importing_and_converting_with_openvino_starts_no_process_and_sends_no_telemetry(tmp_path: Path) -> None:
    """``import openvino`` itself sends a usage event from a forked process; padim's imports must not.

    Run in a fresh interpreter: in this one OpenVINO may have been imported already.
    """
    env = {**os.environ, "PADIM_CACHE": str(tmp_path), "HOME": str(tmp_path / "home")}  # no consent file
    target = tmp_path / "converted.xml"
    done = subprocess.run(
        [sys.executable, "-c", PROBE_TELEMETRY, str(target)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "started: [] telemetry: None" in done.stdout, done.stdout
    assert target.is_file() and target.with_suffix(".bin").is_file()
