"""The jobs every flow, the CLI, ``padim evaluate`` and the benchmarks run.

* :mod:`~padim.jobs.engine` - **the one engine**: ``fit_images``, ``score_images``, ``calibrate``.
* :mod:`~padim.jobs.training` - plan shards and hold-out, fit shards, merge, publish.
* :mod:`~padim.jobs.calibrating` - calibrate a merged fit on held-out images, fold them in; refuse bad thresholds.
* :mod:`~padim.jobs.refit` - the version a retrain continues, and the checks that it can.
* :mod:`~padim.jobs.inspection` - resolve the model, score a shard into report rows and heat maps, drift.
* :mod:`~padim.jobs.promotion` - the promotion gate of retrained versions.
* :mod:`~padim.jobs.calibration_pool` - the product's calibration pool, scored out of sample for the gate.
* :mod:`~padim.jobs.landing` / :mod:`~padim.jobs.products` - landing batches, per-product settings.
* :mod:`~padim.jobs.progress` - progress bars.
"""
