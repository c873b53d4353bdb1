"""Shared S3 test fixtures: a moto server on loopback, as s3fs's own test suite uses.

Import them into a test module with::

    from tests.s3_server import s3_endpoint, s3_bucket  # noqa: F401

``s3_endpoint`` (session scope) starts one ``ThreadedMotoServer`` on 127.0.0.1 on a free port and
points every AWS client at it through the standard environment variables (``AWS_ENDPOINT_URL``,
dummy credentials, region), restoring the previous environment afterwards. ``s3_bucket``
(function scope) creates a fresh bucket and returns ``"s3://<bucket>"``; s3fs's instance cache is
cleared before and after each test so no filesystem object outlives its settings.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def _clear_s3fs_cache() -> None:
    """Drop cached s3fs filesystem instances (they capture endpoint and credentials)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Run a moto S3 server on 127.0.0.1 for the test session.

    Yields:
        The endpoint URL, e.g. ``"http://127.0.0.1:40123"`` (also in ``AWS_ENDPOINT_URL``).
    """
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in (*_ENV, *_UNSET, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    for name in _UNSET:
        os.environ.pop(name, None)
    _clear_s3fs_cache()
    try:
        yield endpoint
    finally:
        _clear_s3fs_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """Create a fresh, empty bucket on the moto server.

    Yields:
        ``"s3://<bucket>"``.
    """
    import s3fs

    _clear_s3fs_cache()
    name = f"test-{uuid.uuid4().hex[:16]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    fs.invalidate_cache()
    try:
        yield f"s3://{name}"
    finally:
        _clear_s3fs_cache()
