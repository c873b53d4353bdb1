"""Prefect tasks: thin wrappers over :mod:`padim` adding retries, logging and no caching.

No computation lives here; each task calls one library function. Tasks pass URIs and small
summaries between each other, never tensors (partial statistics go through storage).
"""
