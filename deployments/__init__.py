"""Deployment definitions (``prefect.yaml``) and the single-host ``serve`` entry point."""
