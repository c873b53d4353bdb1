"""Remedies for parts that are not aligned that act on the images: registration and augmentation.

Both work on a batch of preprocessed images ``(B, 3, S, S)``, either ``uint8`` pixels (what the
engine feeds) or floats normalised with the backbone's mean and standard deviation (what
:meth:`padim.core.model.PadimModel.predict` takes), and return a batch of the same dtype.

* :func:`register_images` translates each image onto a reference of the product: the integer
  shift comes from phase correlation (the peak of the inverse FFT of the normalised cross-power
  spectrum, computed with ``torch.fft``), the uncovered border is filled by reflection.
* :func:`augment_images` draws random shifted / rotated / flipped copies of normal images
  (``affine_grid`` + bilinear ``grid_sample`` with reflection padding), deterministic from a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image

from padim.core.config import PadimConfig
from padim.core.preprocessing import Preprocessor


def pixel_gray(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Gray levels (0-255) of a batch of preprocessed images.

    Args:
        images: ``uint8`` pixels or normalised floats, shape ``(B, 3, S, S)``.
        mean: The backbone's normalisation mean (per channel, 0-1 scale).
        std: The backbone's normalisation standard deviation.

    Returns:
        Float32 gray levels, shape ``(B, S, S)``.
    """
    pixels = to_pixels(images, mean, std)
    return pixels.mean(dim=1)


def to_pixels(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Float32 pixel values (0-255) of ``uint8`` pixels or normalised floats ``(B, 3, S, S)``."""
    if images.dtype == torch.uint8:
        return images.float()
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m) * 255.0


def from_pixels(
    pixels: torch.Tensor, like: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Pixel values back into the dtype and scale of ``like`` (the inverse of :func:`to_pixels`)."""
    if like.dtype == torch.uint8:
        return pixels.round().clamp(0, 255).to(torch.uint8)
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return ((pixels / 255.0 - m) / s).to(like.dtype)


def phase_shifts(gray: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Integer translation of each image that best aligns it onto the reference (phase correlation).

    Translating image ``b`` by ``shifts[b] = (dy, dx)`` (content moves down by ``dy`` and right by
    ``dx``) makes it match the reference: the peak of ``ifft2(R conj(I) / |R conj(I)|)``.

    Args:
        gray: Gray images, shape ``(B, S, S)``.
        reference: The reference gray image, shape ``(S, S)``.

    Returns:
        ``int64`` shifts ``(B, 2)``, each in ``[-S/2, S/2)``.

    Raises:
        ValueError: If the shapes differ.
    """
    if gray.ndim != 3 or tuple(gray.shape[1:]) != tuple(reference.shape):
        raise ValueError(f"images {tuple(gray.shape)} do not match the reference {tuple(reference.shape)}")
    height, width = reference.shape
    image_spectrum = torch.fft.rfft2(gray - gray.mean(dim=(1, 2), keepdim=True))
    reference_spectrum = torch.fft.rfft2(reference - reference.mean()).to(image_spectrum.device)
    cross = reference_spectrum.unsqueeze(0) * image_spectrum.conj()
    cross = cross / cross.abs().clamp_min(1e-12)
    correlation = torch.fft.irfft2(cross, s=(height, width))  # (B, S, S)
    peak = correlation.flatten(1).argmax(dim=1)
    dy, dx = peak // width, peak % width
    dy = torch.where(dy >= (height + 1) // 2, dy - height, dy)
    dx = torch.where(dx >= (width + 1) // 2, dx - width, dx)
    return torch.stack([dy, dx], dim=1)


def translate(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image by an integer shift, filling the uncovered border by reflection.

    Args:
        images: Float images, shape ``(B, C, H, W)``.
        shifts: ``(B, 2)`` integer ``(dy, dx)``: ``out[y, x] = image[y - dy, x - dx]``; each
            ``|dy| < H`` and ``|dx| < W``.

    Returns:
        Shape ``(B, C, H, W)``.
    """
    height, width = images.shape[-2:]
    out = torch.empty_like(images)
    for index, (dy, dx) in enumerate(shifts.tolist()):  # one slice per image, not per pixel
        dy, dx = max(-height + 1, min(height - 1, dy)), max(-width + 1, min(width - 1, dx))
        pad_y, pad_x = abs(dy), abs(dx)
        padded = F.pad(images[index : index + 1], (pad_x, pad_x, pad_y, pad_y), mode="reflect")
        out[index] = padded[0, :, pad_y - dy : pad_y - dy + height, pad_x - dx : pad_x - dx + width]
    return out


def register_images(
    images: torch.Tensor, reference: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Translate each image onto the reference (phase correlation, reflected border).

    Args:
        images: ``uint8`` pixels or normalised floats, shape ``(B, 3, S, S)``.
        reference: Gray reference (0-255), shape ``(S, S)`` (:func:`pixel_gray` of one image).
        mean: The backbone's normalisation mean.
        std: The backbone's normalisation standard deviation.

    Returns:
        The registered images, same shape and dtype.
    """
    if images.shape[0] == 0:
        return images
    pixels = to_pixels(images, mean, std)
    shifts = phase_shifts(pixels.mean(dim=1), reference.to(pixels.device, torch.float32))
    if not bool(shifts.any()):
        return images
    return from_pixels(translate(pixels, shifts), images, mean, std)


def augmentation_matrices(count: int, config: PadimConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine transforms of the copies (``affine_grid``'s normalised coordinates).

    Args:
        count: Number of copies.
        config: Ranges (``augment_shift``, ``augment_rotation``, ``augment_flip``).
        generator: The random stream (CPU).

    Returns:
        Shape ``(count, 2, 3)``, float32.
    """
    draws = torch.rand(count, 5, generator=generator, dtype=torch.float64)  # one row per copy: split-invariant
    uniform = draws[:, :3] * 2.0 - 1.0  # [-1, 1)
    angle = uniform[:, 0] * math.radians(config.augment_rotation)
    shift = uniform[:, 1:] * (2.0 * config.augment_shift)  # a fraction of the side; the side spans 2
    flips = torch.ones(count, 2, dtype=torch.float64)
    if config.augment_flip:
        flips = torch.where(draws[:, 3:] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(count, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flips[:, 0], -sin * flips[:, 1]
    theta[:, 1, 0], theta[:, 1, 1] = sin * flips[:, 0], cos * flips[:, 1]
    theta[:, :, 2] = shift
    return theta.float()


def augment_images(
    images: torch.Tensor,
    config: PadimConfig,
    generator: torch.Generator,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """``config.augment_copies`` random shifted / rotated (/ flipped) copies of each image.

    The transforms are drawn from ``generator`` image by image, so a stream of images gets the
    same copies whatever its batch split.

    Args:
        images: ``uint8`` pixels or normalised floats, shape ``(B, 3, S, S)``.
        config: Number of copies and the transform ranges.
        generator: Random stream of the fitter.
        mean: The backbone's normalisation mean.
        std: The backbone's normalisation standard deviation.

    Returns:
        The copies, image by image (``B * copies`` images: the copies of image 0 first), same
        dtype as ``images``.
    """
    copies = config.augment_copies
    batch = images.shape[0]
    if copies == 0 or batch == 0:
        return images[:0]
    theta = augmentation_matrices(batch * copies, config, generator).to(images.device)
    pixels = to_pixels(images, mean, std).repeat_interleave(copies, dim=0)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return from_pixels(warped, images, mean, std)


def reference_from_image(
    image: Image.Image, config: PadimConfig, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """The gray registration reference of a product, from its (decoded) reference image.

    Reading ``config.reference`` is storage's job (:func:`padim.io.loading.load_reference`); this
    turns the image into what registration compares against.

    Args:
        image: The reference image, RGB, at its original size.
        config: Model options (its resize and crop are applied).
        mean: The backbone's normalisation mean.
        std: The backbone's normalisation standard deviation.

    Returns:
        Gray levels (0-255) of the preprocessed reference image, shape ``(S, S)``, float32.
    """
    pixels = Preprocessor(config, mean, std, normalize=False)(image)
    return pixel_gray(pixels.unsqueeze(0), mean, std)[0]


def with_reference(config: PadimConfig, first_image: str | None) -> PadimConfig:
    """The configuration with its registration reference set to ``first_image`` when it needs one.

    Every shard of a fit then registers onto the same image, and the manifest records which.

    Args:
        config: Model options.
        first_image: URI of the first training image (``None``: leave the configuration as is).

    Returns:
        ``config`` itself unless registration is on and no reference is set.
    """
    if config.registration == "none" or config.reference is not None or first_image is None:
        return config
    return config.model_copy(update={"reference": first_image})
