"""Storage: URLs over fsspec, image listing and decoding, the model's file form and the model store.

Above :mod:`padim.core` (a model version is written from a fitted model), below the jobs.

* :mod:`~padim.io.fsio` - URL helpers and atomic writes on any fsspec filesystem.
* :mod:`~padim.io.listing` - image files under a folder or prefix: recursive, filtered, sorted.
* :mod:`~padim.io.decoding` - raw bytes -> an 8-bit PIL image, robust to every bad file.
* :mod:`~padim.io.reading` - one file's bytes with a timeout and retries (storage faults raised).
* :mod:`~padim.io.loading` - image records, :func:`~padim.io.loading.load_reference`, and batches read ahead in threads.
* :mod:`~padim.io.artifact` - a model version as safetensors + JSON, verified on load.
* :mod:`~padim.io.statistics_files` - a fit shard's partial statistics, merged by the finalising task.
* :mod:`~padim.io.store_layout` - the store's layout: root URL, product and version names, file names.
* :mod:`~padim.io.manifest` - ``manifest.json`` of a version folder: writing it, verifying a folder.
* :mod:`~padim.io.publishing` - committing a version (staging + rename, ``_COMPLETE``) and removing one.
* :mod:`~padim.io.weights_trust` - which backbone weights a stored manifest may name.
* :mod:`~padim.io.store` - :class:`~padim.io.store.ModelStore`: versions, ``LATEST``, candidates.
"""
