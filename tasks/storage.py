"""Tasks that list images and manage the work area of a run."""

from __future__ import annotations

from padim_prefect.tasks.policy import TASK_OPTIONS
from prefect import get_run_logger, task

from padim.io.fsio import url_to_fs
from padim.io.listing import list_images


@task(name="list-images", **TASK_OPTIONS)
def list_images_task(url: str) -> list[str]:
    """List the images under a folder URL (recursive, sorted).

    Args:
        url: Local folder or ``s3://`` prefix.

    Returns:
        Image URIs.
    """
    uris = list_images(url)
    get_run_logger().info("found %d images under %s", len(uris), url)
    return uris


@task(name="remove-work-area", **TASK_OPTIONS)
def remove_work_area_task(url: str) -> None:
    """Delete a run's temporary folder (partial statistics), if it exists.

    Args:
        url: Folder URL.
    """
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
