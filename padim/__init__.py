"""PaDiM anomaly detection: a pure library (no orchestration imports).

Modules, one per concept (see ``docs/architecture.md``):

* :mod:`padim.config` - the model's configuration; :mod:`padim.settings` - every job default.
* :mod:`padim.engine` - the one fit / score / calibrate path every job runs.
* :mod:`padim.backbones` - truncated ImageNet feature extractors and their weights.
* :mod:`padim.preprocessing` - image to normalised tensor.
* :mod:`padim.embedding` - multi-scale patch embeddings and channel selection.
* :mod:`padim.statistics` - exact streaming per-position Gaussian statistics.
* :mod:`padim.mahalanobis` - batched Mahalanobis distances against a cached whitening factor.
* :mod:`padim.anomaly_map` - distance maps to smoothed anomaly maps and image scores.
* :mod:`padim.model` - the fitter and the fitted (re-entrant) model; :mod:`padim.artifact` - its
  safe on-disk form.
"""

__version__ = "0.1.0"
