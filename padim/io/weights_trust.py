"""Which backbone weights a model manifest may name: the store, ``$PADIM_WEIGHTS_ALLOW``, or none.

A manifest is data, not an instruction: whoever can write the store could also rewrite a manifest
and re-seal its marker. So a model loaded for scoring (or as the base of a refit) may name as its
backbone weights only the default ones, ``"random"``, or a file inside the store or inside a
location the operator listed in ``$PADIM_WEIGHTS_ALLOW`` (:func:`check_manifest_weights`); the
file must then also have the sha256 the model recorded (checked before it is parsed).
"""

from __future__ import annotations

import os

from padim.errors import WeightsNotAllowedError
from padim.io.fsio import is_local, join_url, protocol_of, url_to_fs
from padim.io.store_layout import MANIFEST_NAME, store_root_of

__all__ = ["WEIGHTS_ALLOW_ENV_VAR", "allowed_weights_roots", "check_manifest_weights"]

WEIGHTS_ALLOW_ENV_VAR = "PADIM_WEIGHTS_ALLOW"
_RANDOM_WEIGHTS = "random"  # padim.core.backbones.RANDOM_WEIGHTS (not imported here: that loads torch)


def allowed_weights_roots(store_root: str | None = None) -> list[str]:
    """Locations a model manifest may name as its backbone weights file.

    Args:
        store_root: The store (or model folder) the manifest belongs to; ``None`` for none.

    Returns:
        ``store_root`` (when given), then each comma-separated entry of ``$PADIM_WEIGHTS_ALLOW``:
        local folders or files (``/models/weights``) and URL prefixes (``s3://models/weights``).
    """
    configured = [entry.strip() for entry in os.environ.get(WEIGHTS_ALLOW_ENV_VAR, "").split(",")]
    return [*([store_root] if store_root else []), *(entry for entry in configured if entry)]


def check_manifest_weights(weights: str | None, version_url: str) -> None:
    """Refuse backbone weights a model manifest may not name, before anything is opened.

    The rule: a model loaded from a manifest (scoring, the base of a refit) may use

    * ``None``: the built-in default weights (the packaged EfficientNet-Lite0 file, torchvision's
      cache for ResNets), checked against the registry's sha256;
    * ``"random"``: seeded random weights (tests);
    * a local path or URL inside the store the version belongs to, or inside an entry of
      ``$PADIM_WEIGHTS_ALLOW`` (comma-separated folders and URL prefixes). Local paths are
      compared after resolving ``..`` and symbolic links; URLs must share the protocol and the
      prefix up to a ``/`` and may not contain ``..`` segments or ``::`` chains.

    Anything else (``/etc/hostname``, ``s3://other-bucket/x.pth``) is refused here. Weights given
    to training explicitly (``padim train --weights``) are the operator's choice and are not
    checked; the model's ``weights_sha256`` is checked when the file is loaded
    (:func:`padim.core.backbones.get_backbone`).

    Args:
        weights: ``weights`` of the manifest's configuration.
        version_url: The model version folder the manifest was read from.

    Raises:
        WeightsNotAllowedError: The manifest names weights outside the allowed locations.
    """
    if weights is None or weights == _RANDOM_WEIGHTS:
        return
    store_root = store_root_of(version_url)
    if any(_is_within(weights, root) for root in allowed_weights_roots(store_root)):
        return
    configured = os.environ.get(WEIGHTS_ALLOW_ENV_VAR, "").strip() or "unset"
    raise WeightsNotAllowedError(
        f"model manifest {join_url(version_url, MANIFEST_NAME)} names backbone weights {weights!r} outside "
        f"the store {store_root} and {WEIGHTS_ALLOW_ENV_VAR} ({configured}); refused without opening it "
        f"(add the file's folder or URL prefix to {WEIGHTS_ALLOW_ENV_VAR} if you trust it)"
    )


def _weights_location(url: str) -> tuple[str, str] | None:
    """``(protocol, comparable location)`` of a weights URL, or None for one that is never allowed.

    Local paths are made absolute with ``..`` and symbolic links resolved (no file is opened);
    remote URLs are kept as written, without the protocol.
    """
    if "\x00" in url:
        return None
    if is_local(url):
        _, path = url_to_fs(url)
        return "file", os.path.realpath(path)
    rest = url.partition("://")[2]
    if not rest or "::" in url or any(part in (".", "..") for part in rest.split("/")):
        return None
    return protocol_of(url), rest


def _is_within(candidate: str, root: str) -> bool:
    """True when ``candidate`` is ``root`` itself or lies below it (same protocol)."""
    found, base = _weights_location(candidate), _weights_location(root)
    if found is None or base is None or found[0] != base[0]:
        return False
    separator = os.sep if found[0] == "file" else "/"
    return found[1] == base[1] or found[1].startswith(base[1].rstrip(separator) + separator)
