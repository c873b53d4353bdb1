"""PaDiM anomaly detection: a pure library (no orchestration imports).

Subpackages, by concern, each importing only those listed after it (see ``docs/architecture.md``;
import-linter enforces the order, see ``pyproject.toml``):

* :mod:`padim.evaluation` - metrics, the MVTec-layout evaluation, the demo's synthetic product.
* :mod:`padim.jobs` - the one fit / score / calibrate engine and the steps the flows compose.
* :mod:`padim.reports` - Parquet reports, DuckDB queries and heat-map pictures.
* :mod:`padim.io` - fsspec storage, image decoding, a model version's files and the model store.
* :mod:`padim.core` - configuration, backbones, embeddings, statistics, scoring and the model.
* :mod:`padim.settings` (every job default, defined once) and :mod:`padim.errors` (readable errors).
"""

__version__ = "0.1.0"
