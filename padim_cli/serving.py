"""``padim serve``: serve the deployments of ``deployments/prefect.yaml`` from one process."""

from __future__ import annotations

__all__ = ["check_server", "serve_deployments"]

SERVER_HINT = (
    "padim serve needs a running Prefect server: start one with `prefect server start`, then "
    "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` (or export PREFECT_API_URL)"
)


def check_server() -> str:
    """The configured Prefect API URL.

    Schedules and event triggers only fire on a real server; the temporary server Prefect starts
    when no URL is configured has neither, so serving against it would silently do nothing.

    Returns:
        The URL.

    Raises:
        PadimError: When no Prefect API URL is configured.
    """
    from prefect.settings import get_current_settings

    from padim.errors import PadimError

    url = get_current_settings().api.url
    if not url:
        raise PadimError(SERVER_HINT)
    return str(url)


def serve_deployments(limit: int | None = None) -> None:
    """Serve every deployment until interrupted.

    Args:
        limit: Most flow runs at once.
    """
    from padim_prefect.deployments.serve import serve_all

    print("Serving the padim deployments (nightly, retrain, watch, train, score); Ctrl+C stops.")
    serve_all(limit=limit)
