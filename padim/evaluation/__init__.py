"""Measuring detection quality: metrics, the MVTec-layout evaluation and the demo's synthetic product.

The top layer of :mod:`padim`: it runs the same engine the jobs run (:mod:`padim.jobs.engine`).

* :mod:`~padim.evaluation.metrics` - image AUROC, F1-max, ROC points, rates at a threshold.
* :mod:`~padim.evaluation.pixel_metrics` - exact pixel AUROC, pixel F1-max and AUPRO from one sort.
* :mod:`~padim.evaluation.mvtec` - the MVTec folder layout: train/test images, defect kinds, masks.
* :mod:`~padim.evaluation.run` - fit, calibrate and score such a folder through the train/score path.
* :mod:`~padim.evaluation.results` - the metrics of a run and their flat JSON.
* :mod:`~padim.evaluation.figures` - per-image heat-map panels and ROC curves.
* :mod:`~padim.evaluation.evaluate` - ``padim evaluate``: run, summarise, draw.
* :mod:`~padim.evaluation.synthetic` - the demo's synthetic product with known defects.
* :mod:`~padim.evaluation.proposal` - ``padim propose``: a product's setting for parts that may not be
  aligned, from its normal images alone.
"""
