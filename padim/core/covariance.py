"""Covariance matrices: Oracle Approximating Shrinkage and the packed lower triangles they are stored as.

Symmetric ``(P, d, d)`` matrices are stored as their lower triangles packed row by row,
``(P, d (d + 1) / 2)``, which halves the statistics files.
"""

from __future__ import annotations

import torch

from padim.errors import PadimError


def oas_shrink(covariance: torch.Tensor, n: int) -> torch.Tensor:
    """Oracle Approximating Shrinkage of sample covariances (Chen, Wiesel, Eldar, Hero 2010).

    Shrinks each maximum-likelihood covariance ``S_ml = S (n - 1) / n`` towards ``mu I`` with
    ``mu = tr(S_ml) / d``, with the intensity of ``sklearn.covariance.oas`` (which depends only on
    ``S`` and ``n``, so it stays exact under streaming), and returns the result rescaled by
    ``n / (n - 1)`` to the unbiased scale of the input: the output equals
    ``sklearn.covariance.OAS().fit(X).covariance_ * n / (n - 1)`` for the ``n`` vectors ``X``.

    Args:
        covariance: Unbiased sample covariances (``ddof = 1``), shape ``(P, d, d)``.
        n: Number of samples (at least 2).

    Returns:
        Shrunk covariances, shape ``(P, d, d)``, in the unbiased scale of the input.
    """
    d = covariance.shape[-1]
    emp = covariance * ((n - 1) / n)  # maximum-likelihood estimate, as sklearn's OAS uses
    mu = emp.diagonal(dim1=1, dim2=2).sum(-1) / d
    alpha = emp.square().mean(dim=(1, 2))
    num = alpha + mu.square()
    den = (n + 1.0) * (alpha - mu.square() / d)
    shrink = torch.where(den == 0, torch.ones_like(den), torch.clamp(num / den, max=1.0))
    shrunk = emp * (1.0 - shrink).view(-1, 1, 1)
    shrunk.diagonal(dim1=1, dim2=2).add_((shrink * mu).unsqueeze(1))
    return shrunk * (n / (n - 1))


def pack_lower(matrices: torch.Tensor) -> torch.Tensor:
    """The lower triangles (diagonal included) of a batch of square matrices, row by row.

    Args:
        matrices: Shape ``(P, d, d)``.

    Returns:
        Shape ``(P, d (d + 1) / 2)``, contiguous.
    """
    d = matrices.shape[-1]
    rows, cols = torch.tril_indices(d, d, device=matrices.device)
    return matrices[:, rows, cols].contiguous()


def unpack_lower(packed: torch.Tensor, d: int, symmetric: bool = False) -> torch.Tensor:
    """Rebuild square matrices from :func:`pack_lower` output.

    Args:
        packed: Shape ``(P, d (d + 1) / 2)``.
        d: Matrix side.
        symmetric: Mirror the lower triangle into the upper one (covariances); otherwise the
            upper triangle is zero (Cholesky factors and their inverses).

    Returns:
        Shape ``(P, d, d)``.

    Raises:
        PadimError: If the packed length does not match ``d``.
    """
    if packed.ndim != 2 or packed.shape[1] != d * (d + 1) // 2:
        raise PadimError(f"packed triangle of shape {tuple(packed.shape)} does not fit d = {d}")
    rows, cols = torch.tril_indices(d, d, device=packed.device)
    out = torch.zeros(packed.shape[0], d, d, dtype=packed.dtype, device=packed.device)
    out[:, rows, cols] = packed
    if symmetric:
        out[:, cols, rows] = packed
    return out
