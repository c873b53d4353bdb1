"""End to end on MVTec AD bottle: fit the default model on the good training images, score the test set.

Uses only the library layer (PIL decoding, the model's own preprocessing), so a failure here points
at the method, not at the pipeline around it. About 40 s on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from padim.config import PadimConfig
from padim.model import PadimFitter, build_model
from padim.preprocessing import Preprocessor

BATCH = 32
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def image_files(folder: Path) -> list[Path]:
    """Sorted image files of a folder."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)


def batches(paths: list[Path], preprocess: Preprocessor) -> Iterator[torch.Tensor]:
    """Decode and preprocess images, ``BATCH`` at a time."""
    for start in range(0, len(paths), BATCH):
        tensors = []
        for path in paths[start : start + BATCH]:
            with Image.open(path) as image:
                tensors.append(preprocess(image))
        yield torch.stack(tensors)


@pytest.mark.data
@pytest.mark.slow
def test_default_model_detects_bottle_defects(bottle_dir: Path) -> None:
    config = PadimConfig()  # EfficientNet-Lite0, ImageNet weights, whole image at 224, all d = 176 channels
    fitter = PadimFitter(config, device="cpu")
    train = image_files(bottle_dir / "train" / "good")
    assert len(train) >= 100
    for images in batches(train, fitter.preprocessor()):
        fitter.update(images)
    model = build_model(fitter)
    assert model.training.n_train == len(train)
    assert model.mean.shape == (56 * 56, 176) and model.factor.shape == (56 * 56, 176, 176)

    labels: list[int] = []
    scores: list[float] = []
    for category in sorted(p for p in (bottle_dir / "test").iterdir() if p.is_dir()):
        paths = image_files(category)
        for images in batches(paths, model.preprocessor()):
            prediction = model.predict(images)
            assert prediction.anomaly_maps.shape == (images.shape[0], 224, 224)
            assert torch.isfinite(prediction.anomaly_maps).all()
            scores.extend(prediction.scores.tolist())
        labels.extend([int(category.name != "good")] * len(paths))
    assert 0 < sum(labels) < len(labels)
    auroc = roc_auc_score(np.array(labels), np.array(scores))
    assert auroc >= 0.99, f"image AUROC {auroc:.4f} on MVTec bottle, expected >= 0.99 (reference 0.998)"
