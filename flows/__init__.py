"""Prefect flows: train, score (nightly), retrain, watch, nightly fan-out and evaluate.

Flows compose the tasks in :mod:`tasks`; the math lives in :mod:`padim`.
"""
