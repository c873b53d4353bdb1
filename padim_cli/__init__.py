"""The ``padim`` command line: train, score, evaluate, query reports, list models, run the demo.

Entry point: :func:`padim_cli.main.main` (the ``padim`` console script). Heavy modules (torch,
Prefect) are imported only by the command that needs them, so ``padim --help`` stays fast.
"""
