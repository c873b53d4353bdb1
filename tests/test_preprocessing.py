"""Preprocessing: resize and centre crop, colour modes, normalisation, maps back to the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from padim.core.backbones import get_spec, load_backbone
from padim.core.config import PadimConfig
from padim.core.features import FeatureExtractor
from padim.core.geometry import new_projector
from padim.core.preprocessing import Preprocessor, compute_geometry, input_to_original_xy, map_to_original

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessor(config: PadimConfig) -> Preprocessor:
    """The transform of a configuration's backbone."""
    spec = get_spec(config.backbone)
    return Preprocessor(config, spec.mean, spec.std)


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")


PAPER = {"image_size": 256, "crop_size": 224}


def test_default_is_the_whole_image_at_224() -> None:
    # The accuracy benchmark's winner (BENCHMARKS.md): no centre crop, so the border is inspected.
    config = PadimConfig()
    assert (config.image_size, config.crop_size) == (224, None)
    out = preprocessor(config)(random_rgb(300, 200))
    assert out.shape == (3, 224, 224)
    geometry = compute_geometry(300, 200, config)
    assert geometry.resized == (224, 224) and geometry.crop_box == (0, 0, 224, 224)


def test_paper_protocol_is_resize_256_then_centre_crop_224() -> None:
    config = PadimConfig(**PAPER)
    out = preprocessor(config)(random_rgb(300, 200))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    geometry = compute_geometry(300, 200, config)
    assert geometry.resized == (256, 256) and geometry.crop_box == (16, 16, 240, 240)


def test_without_crop_the_whole_resized_image_is_kept() -> None:
    out = preprocessor(PadimConfig(image_size=256, crop_size=None))(random_rgb(300, 200))
    assert out.shape == (3, 256, 256)


def test_crop_is_centred() -> None:
    # A 256 x 256 image is not resized, so the crop can be checked pixel for pixel.
    array = np.zeros((256, 256, 3), dtype=np.uint8)
    array[16, 16] = (255, 0, 0)  # first pixel inside the crop
    array[239, 239] = (0, 0, 255)  # last pixel inside the crop
    array[15, 15] = (0, 255, 0)  # just outside
    out = preprocessor(PadimConfig(**PAPER))(Image.fromarray(array))
    # EfficientNet normalisation: 0 -> -1, 255 -> 1.
    assert out[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert out[:, 223, 223].tolist() == [-1.0, -1.0, 1.0]
    assert float(out[1].max()) == -1.0  # the green pixel was cut away


def test_shorter_side_mode_keeps_the_aspect_ratio() -> None:
    config = PadimConfig(resize_mode="shorter_side", **PAPER)
    geometry = compute_geometry(600, 300, config)
    assert geometry.resized == (512, 256)
    assert geometry.crop_box == (144, 16, 368, 240)
    assert preprocessor(config)(random_rgb(600, 300)).shape == (3, 224, 224)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_other_colour_modes_become_rgb(mode: str) -> None:
    source = random_rgb(64, 48, seed=1)
    image = source.convert(mode)
    config = PadimConfig(image_size=64, crop_size=48)
    out = preprocessor(config)(image)
    assert out.shape == (3, 48, 48)
    expected = preprocessor(config)(image.convert("RGB"))
    assert torch.equal(out, expected)
    if mode in ("L", "LA"):
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize(
    ("backbone", "mean", "std"),
    [("efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ("resnet18", IMAGENET_MEAN, IMAGENET_STD)],
)
def test_uniform_gray_maps_to_the_normalised_constant(
    backbone: str, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    gray = Image.new("RGB", (100, 80), (128, 128, 128))
    out = preprocessor(PadimConfig(backbone=backbone, weights="random"))(gray)
    for channel in range(3):
        expected = (128 / 255 - mean[channel]) / std[channel]
        np.testing.assert_allclose(out[channel].numpy(), expected, rtol=1e-6, atol=1e-6)


def _peak(full: torch.Tensor) -> tuple[int, int]:
    """``(x, y)`` of the maximum."""
    y, x = divmod(int(full.argmax()), full.shape[1])
    return x, y


def test_map_to_original_has_the_original_shape_and_places_the_peak() -> None:
    config = PadimConfig(**PAPER)
    width, height = 512, 384
    anomaly = torch.zeros(224, 224)
    anomaly[98:103, 48:53] = 1.0  # blob centred on input pixel (x=50, y=100)
    anomaly[100, 50] = 2.0
    full = map_to_original(anomaly, width, height, config)
    assert full.shape == (height, width)
    # Input pixel (50, 100) sits at (66, 116) in the 256 x 256 resize; scaled by (2, 1.5) with
    # half-pixel centres: x = 66.5 * 2 - 0.5 = 132.5, y = 116.5 * 1.5 - 0.5 = 174.25.
    x, y = _peak(full)
    assert abs(x - 132.5) <= 1.0 and abs(y - 174.25) <= 1.0
    assert input_to_original_xy(50, 100, width, height, config) in {(132, 174), (133, 174)}
    # The border cut away by the centre crop gets the map's minimum.
    assert float(full[:, :30].max()) == 0.0 and float(full[:20, :].max()) == 0.0
    assert float(full[:, -30:].max()) == 0.0 and float(full[-20:, :].max()) == 0.0


def test_map_to_original_without_crop_covers_the_image() -> None:
    config = PadimConfig(image_size=256, crop_size=None)
    anomaly = torch.zeros(256, 256)
    anomaly[250:, 250:] = 1.0  # bottom-right corner
    full = map_to_original(anomaly, 128, 96, config)
    assert full.shape == (96, 128)
    x, y = _peak(full)
    assert x >= 124 and y >= 92
    assert float(full[0, 0]) == 0.0


def test_uint8_pixels_normalised_on_the_device_equal_the_float_path() -> None:
    config = PadimConfig(backbone="resnet18", weights="random", image_size=40, crop_size=32, channels=30)
    spec = get_spec(config.backbone)
    image = random_rgb(50, 45, seed=2)
    floats = Preprocessor(config, spec.mean, spec.std)(image)
    pixels = Preprocessor(config, spec.mean, spec.std, normalize=False)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    resized = np.asarray(image.resize((40, 40), Image.Resampling.BILINEAR, reducing_gap=None))[4:36, 4:36]
    assert torch.equal(pixels, torch.from_numpy(resized.transpose(2, 0, 1).copy()))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(floats, (pixels.float() / 255 - mean) / std, rtol=1e-6, atol=1e-6)
    extractor = FeatureExtractor(load_backbone("resnet18", weights="random"), new_projector(config))
    from_pixels = extractor(pixels.unsqueeze(0))
    from_floats = extractor(floats.unsqueeze(0))
    assert from_pixels.shape == (1, 30, 8, 8)
    torch.testing.assert_close(from_pixels, from_floats, rtol=1e-4, atol=1e-4)
