"""An S3-compatible server for tests: moto's server mode on 127.0.0.1, one bucket, the environment pointing at it.

The tests that need an object store import `s3_fixture` from here and take the fixture as `s3`; its bucket is
`moxin-test-<port>`. It serves the
real S3 HTTP API (boto3, s3fs and litdata's obstore downloads all speak to it as they would to AWS), on a free
loopback port, so nothing leaves the machine. The endpoint and fake credentials go where every client looks:

    AWS_ENDPOINT_URL=http://127.0.0.1:PORT  AWS_ACCESS_KEY_ID=testing  AWS_SECRET_ACCESS_KEY=testing
    AWS_DEFAULT_REGION=us-east-1

(plus NO_PROXY for loopback, AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE naming no file, no AWS profile, and
LITDATA_CACHE_DIR), so subprocesses started by a test (the real command line) reach the same server. Everything
is restored when the fixture ends: the environment, s3fs's cached filesystems, and litdata's default chunk
cache folder, which points into the test's temporary folder meanwhile; the bucket is emptied and deleted (moto
keeps its state in module globals, shared by every server of a process: a bucket per server keeps them apart).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "moxin-test"  # + "-<port>"
ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# Settings that would send the clients elsewhere or make them read real credentials; unset while serving.
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    environment: dict[str, str]  # what was set (for subprocesses that build their own environment)

    def url(self, prefix: str) -> str:
        """`s3://BUCKET/prefix`."""
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def client(self):
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str) -> list[str]:
        """The object keys under `prefix/`, sorted, relative to it."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{prefix}/")
        return sorted(item["Key"][len(prefix) + 1 :] for page in pages for item in page.get("Contents", []))


@contextmanager
def serve_s3(cache: Path) -> Iterator[S3Server]:
    """Run moto's S3 server on a free loopback port with bucket `BUCKET-<port>`; litdata caches chunks under
    `cache`."""
    import litdata.utilities.dataset_utilities as litdata_cache
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request in the test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    endpoint = f"http://{host}:{port}"
    missing = str(cache / "no-aws-config")  # the user's ~/.aws files play no part
    environment = {**ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": missing}
    environment["AWS_SHARED_CREDENTIALS_FILE"] = missing
    environment["LITDATA_CACHE_DIR"] = str(cache)  # litdata's chunk cache, for subprocesses (read on import)
    saved = {key: os.environ.get(key) for key in [*environment, *UNSET]}
    saved_cache = litdata_cache._LITDATA_CACHE_DIR
    try:
        for key in UNSET:
            os.environ.pop(key, None)
        os.environ.update(environment)
        litdata_cache._LITDATA_CACHE_DIR = str(cache)  # read when a StreamingDataset picks its cache folder
        _forget_filesystems()
        s3 = S3Server(endpoint, f"{BUCKET}-{port}", environment)
        s3.client().create_bucket(Bucket=s3.bucket)
        try:
            yield s3
        finally:
            _delete_bucket(s3)
    finally:
        server.stop()
        _forget_filesystems()
        litdata_cache._LITDATA_CACHE_DIR = saved_cache
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _delete_bucket(s3: S3Server) -> None:
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=s3.bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=s3.bucket)


def _forget_filesystems() -> None:
    """s3fs keeps one filesystem (endpoint, listings) per set of arguments; none may outlive its server."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module", name="s3")
def s3_fixture(tmp_path_factory) -> Iterator[S3Server]:
    """`s3`: an S3 server shared by a test module (import `s3_fixture` to use it); tests keep apart by using
    prefixes of their own."""
    with serve_s3(tmp_path_factory.mktemp("litdata-cache")) as server:
        yield server
