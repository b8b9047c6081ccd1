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

__all__ = ["StorageFullError", "exists", "filesystem_and_path", "is_remote", "read_bytes",
           "write_bytes"]

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


# The AWS C++ SDK under pyarrow gives up after 1 s to connect and 3 s for a request: a
# busy S3 server (or a loaded node) exceeds that and a job fails on a checkpoint upload.
# These travel with the file system when Ray ships it to workers (its retry strategy does
# not: workers keep the SDK's standard retries, 3 attempts with backoff).
_S3_TIMEOUTS = {"connect_timeout": 10.0, "request_timeout": 120.0}
_S3_RETRIES = 5  # attempts with the SDK's exponential backoff: a dead endpoint fails in ~10 s


def _s3_options() -> dict:
    return {**_S3_TIMEOUTS,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_RETRIES)}


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = _s3_endpoint()
    if endpoint is None:
        # Real AWS: from_uri resolves the bucket's region (one request); bucket names are
        # plain DNS labels, so URI parsing is safe for this part.
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
        return pafs.S3FileSystem(region=fs.region, **_s3_options())
    parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"cannot parse S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
    if parsed.path not in ("", "/"):
        raise ValueError(f"S3 endpoint {endpoint!r} has a path; only http(s)://host[:port] works")
    # Path-style addressing is pyarrow's default (force_virtual_addressing=False), which is
    # what S3-compatible servers on an IP address need.
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme,
                             **_s3_options())


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
