"""The model itself: configuration, backbones, features, exact Gaussian statistics and scoring.

The lowest layer of :mod:`padim`: it imports only :mod:`padim.settings` and :mod:`padim.errors`,
never storage, jobs, reports or evaluation (import-linter checks this, see ``pyproject.toml``).

* :mod:`~padim.core.config` - :class:`~padim.core.config.PadimConfig`, the model's options.
* :mod:`~padim.core.backbones` - truncated ImageNet networks, their weights and runtimes (torch, OpenVINO).
* :mod:`~padim.core.preprocessing` - an image to a normalised tensor ``(3, S, S)``.
* :mod:`~padim.core.features` / :mod:`~padim.core.embedding` - patch embeddings ``(B, H, W, d)``.
* :mod:`~padim.core.statistics` / :mod:`~padim.core.cell_statistics` / :mod:`~padim.core.update_buffer` -
  exact streaming Gaussians (per position, per cell of the stage maps, folded ~128 images at a time);
  :mod:`~padim.core.covariance` - OAS shrinkage and packed triangles.
* :mod:`~padim.core.mahalanobis` / :mod:`~padim.core.scoring` / :mod:`~padim.core.anomaly_map` - whitening,
  distances to the Gaussians (banded on a CPU), anomaly maps and image scores.
* :mod:`~padim.core.alignment` - registration and augmentation for parts that are not aligned.
* :mod:`~padim.core.calibration` - label-free thresholds at a target false-alarm rate.
* :mod:`~padim.core.geometry` / :mod:`~padim.core.execution` - a configuration's shapes; device, batch
  size and the one choice of the fast or plain path.
* :mod:`~padim.core.fitter` - :class:`~padim.core.fitter.PadimFitter` and ``build_model``.
* :mod:`~padim.core.model` - the fitted, re-entrant :class:`~padim.core.model.PadimModel`.
"""
