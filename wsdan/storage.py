"""Read and write bytes at a local path or an ``s3://bucket/key`` URI.

S3 here means any S3-compatible server (SeaweedFS, MinIO, AWS). The endpoint comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (as boto3 reads them); credentials come from
the standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance
metadata), never from code or from the URI, and are never logged or put in an error message.

Why the S3 file system is built by hand rather than with ``FileSystem.from_uri(uri)``:
``pyarrow.fs.S3FileSystem()`` ignores ``AWS_ENDPOINT_URL``, and ``from_uri`` parses the key as
a URI, so a key with a space fails and a key with ``#`` is silently truncated at the ``#``.
We split ``s3://bucket/key`` ourselves (the key is taken literally, as the AWS CLI does) and
pass the endpoint's host and scheme explicitly (``endpoint_override="host:port"``,
``scheme="http"``), which also works for plain-http endpoints such as a local SeaweedFS.
Building the file system makes no network request when an endpoint is set.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import urllib.parse
import urllib.request

import pyarrow.fs as pafs

__all__ = ["S3_RETRIES", "RetryingS3FileSystem", "StorageFullError", "exists",
           "filesystem_and_path", "is_remote", "read_bytes", "s3_retries", "write_bytes"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# mkstemp creates files 0600; give written files the usual umask-based mode instead.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _scheme(uri: str) -> str:
    """Lower-case URI scheme, or "" for a plain local path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, False for local paths and ``file://`` URIs."""
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        return False
    if scheme == "s3":
        return True
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path or s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b"). The key is taken literally (no %-decoding)."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        # s3://KEY:SECRET@bucket/... is accepted by pyarrow; we refuse it and do not echo it.
        raise ValueError(
            "credentials inside an s3:// URI are not supported (and not shown here): "
            "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS config files"
        )
    if not bucket:
        raise ValueError(f"no bucket in S3 URI {uri!r}")
    return bucket, key.rstrip("/")


def _s3_endpoint() -> str | None:
    """The configured endpoint URL (service-specific variable first, as boto3 does)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_where(uri: str) -> str:
    """Context for error messages: URI, endpoint and bucket (never credentials)."""
    bucket, _ = _split_s3(uri)
    return f"{uri} (S3 endpoint {_s3_endpoint() or 'AWS default'}, bucket {bucket!r})"


# -- the one retry policy of every S3 access ----------------------------------------------
#
# Every S3 request of the project goes through the AWS SDKs' own retries, configured here
# once: pyarrow's S3 file systems below (shard reads, checkpoints: Ray Train persists them
# through the file system that wsdan.launcher gives it, manifests, job records) and boto3
# clients (wsdan.services.s3_access, the MLflow server's artifact proxy). The SDK decides
# what is worth retrying from the error itself: no connection (the server is down or
# restarting), a dropped connection, a time-out, HTTP 5xx, throttling; never a 4xx (wrong
# keys, no such bucket or key), which fails at once. No error text is matched anywhere.
#
# pyarrow: AwsDefaultS3RetryStrategy retries a failed request N times (pyarrow calls N
# ``max_attempts``; a request is made N + 1 times in all), waiting 25 ms * 2^k before retry
# k = 0 .. N-1: 25 ms * (2^N - 1) in all, 25.6 s at the default N = S3_RETRIES = 10
# (measured against a closed port: 12.8 s at 9, 25.6 s at 10, 51.2 s at 11; and against
# an HTTP server answering 503 or 500: N + 1 requests; 403 or 400: one). An S3 server
# restarted under a job (~10 s down, a few seconds to start) is ridden out with room to
# spare, and an endpoint where nothing answers is still reported within ~30 s.
# WSDAN_S3_RETRIES sets N (each one more doubles the time ridden out); it is read where
# the file system is built and travels with it. AwsStandardS3RetryStrategy (pyarrow's
# default) waits a random 0-1 s * 2^k (capped at 20 s) and draws on a retry quota shared by
# all the requests of one file system (500 tokens, 5-10 per retry), so how long it rides
# out depends on chance and on how many requests fail at once (measured: 1.8 s at 3, 18 s
# at 6, 59 s at 9).
#
# Workers: pyarrow pickles an S3FileSystem's endpoint, timeouts and credentials source but
# not its retry strategy (S3FileSystem.__reduce__), so a file system shipped to a Ray
# worker would fall back to the SDK's 3 attempts. RetryingS3FileSystem re-creates itself
# with the policy wherever it is unpickled: Ray Data read tasks, Ray Train workers that
# upload checkpoints, Ray Train's controller.
S3_RETRIES = 10
RETRIES_ENV = "WSDAN_S3_RETRIES"
# The AWS C++ SDK under pyarrow gives up after 1 s to connect and 3 s for a request: a
# busy S3 server (or a loaded node) exceeds that and a job fails on a checkpoint upload.
_S3_TIMEOUTS = {"connect_timeout": 10.0, "request_timeout": 120.0}


def s3_retries() -> int:
    """Retries of a failed S3 request: ``WSDAN_S3_RETRIES`` if set, else `S3_RETRIES`."""
    raw = os.environ.get(RETRIES_ENV, "").strip()
    if not raw:
        return S3_RETRIES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 20:
        raise ValueError(f"{RETRIES_ENV}={raw!r}: expected a whole number of retries from 0 "
                         "to 20")
    return value


def _rebuild_s3(options: dict, retries: int) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(retries=retries, **options)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` with this module's retry policy (:func:`s3_retries`
    retries with the SDK's exponential backoff), kept when it is pickled to a Ray worker.
    Credentials are never pickled unless they were given explicitly (the project never
    does: each process takes them from its own AWS chain)."""

    def __init__(self, *, retries: int | None = None, **options) -> None:
        if retries is None:
            retries = s3_retries()
        options.setdefault("connect_timeout", _S3_TIMEOUTS["connect_timeout"])
        options.setdefault("request_timeout", _S3_TIMEOUTS["request_timeout"])
        # pyarrow's max_attempts is the AWS SDK's maxRetries (DefaultRetryStrategy).
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=retries),
                         **options)
        self.retries = int(retries)

    def __reduce__(self):
        _, (options,) = super().__reduce__()
        return _rebuild_s3, (options, self.retries)


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = _s3_endpoint()
    if endpoint is None:
        # Real AWS: from_uri resolves the bucket's region (one request); bucket names are
        # plain DNS labels, so URI parsing is safe for this part.
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
        return RetryingS3FileSystem(region=fs.region)
    parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"cannot parse S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
    if parsed.path not in ("", "/"):
        raise ValueError(f"S3 endpoint {endpoint!r} has a path; only http(s)://host[:port] works")
    # Path-style addressing is pyarrow's default (force_virtual_addressing=False), which is
    # what S3-compatible servers on an IP address need.
    return RetryingS3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme)


def _local_path(uri: str) -> str:
    if _scheme(uri) == "file":
        parsed = urllib.parse.urlsplit(uri)
        uri = urllib.request.url2pathname(parsed.path)
    return os.path.abspath(os.path.expanduser(uri))


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """File system and the path inside it: ``(S3FileSystem, "bucket/key")`` for ``s3://``,
    ``(LocalFileSystem, "/abs/path")`` for a local path or ``file://`` URI."""
    if is_remote(uri):
        bucket, key = _split_s3(uri)
        return _s3_filesystem(bucket), f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), _local_path(uri)


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object. Missing -> FileNotFoundError naming the URI."""
    if not is_remote(uri):
        path = _local_path(uri)
        with open(path, "rb") as f:  # FileNotFoundError names the path
            return f.read()
    fs, path = filesystem_and_path(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such object: {_s3_where(uri)}") from e
    except OSError as e:
        raise OSError(f"cannot read {_s3_where(uri)}: {e}") from e


class StorageFullError(OSError):
    """The device (or the user's quota) filled up while a file was being written.

    Its message names the path and the size of what was being written; ``filename`` is the
    path and ``errno`` is ``ENOSPC`` (or ``EDQUOT``). Raised by :func:`write_bytes` after it
    removed its temporary file: the file that was at the path before, if any, is unchanged.
    A user-facing error (``wsdan.cli.user_errors``): one line, exit code 2.
    """

    def __str__(self) -> str:
        return str(self.strerror)


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _full_error(path: str, nbytes: int, cause: OSError) -> StorageFullError:
    return StorageFullError(
        cause.errno, f"{_FULL[cause.errno]} writing {path} ({_size(nbytes)}): nothing was "
        "written there and the file there before, if any, is unchanged; free space on that "
        "device or write somewhere else", path)


def _write_local(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full device fails the write, the flush or the fsync (delayed allocation): the
        # temporary file goes, the target was never touched.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to a file or object, replacing it.

    Local: parent directories are created and the write is atomic (a temporary file in the
    same directory, fsync, then ``os.replace``), so readers never see a partial file. A full
    device raises :class:`StorageFullError` naming the path; the file there before, if
    any, is unchanged and no temporary file is left.
    S3: an object only becomes visible once its upload completes, so it is atomic too.
    """
    if not is_remote(uri):
        path = _local_path(uri)
        try:
            _write_local(path, data)
        except OSError as e:
            if e.errno in _FULL and not isinstance(e, StorageFullError):
                raise _full_error(path, len(data), e) from e
            raise
        return
    fs, path = filesystem_and_path(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise OSError(f"cannot write {_s3_where(uri)}: {e}") from e


def exists(uri: str) -> bool:
    """True if a file, directory or (for S3) object or key prefix exists at ``uri``."""
    if not is_remote(uri):
        return os.path.exists(_local_path(uri))
    fs, path = filesystem_and_path(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise OSError(f"cannot check {_s3_where(uri)}: {e}") from e
    return info.type != pafs.FileType.NotFound
