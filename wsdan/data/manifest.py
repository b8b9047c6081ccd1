"""The prepared data set's manifest (``dataset.json``): reading it and checking it.

``wsdan data prepare`` writes it (``wsdan.data.shards``); the Ray Data pipeline
(``wsdan.data.pipeline``), the jobs' pre-flight checks and the model cards read it. Every
problem is a :class:`DataSourceError` naming the URI (and for S3 the endpoint and bucket)
and the field at fault, never a credential. No Ray here: checking a data set must not
need a cluster.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import pyarrow.fs as pafs

from wsdan import storage

#: Version of the shard layout and manifest that ``wsdan data prepare`` writes.
FORMAT_VERSION = 1
MANIFEST = "dataset.json"


class DataSourceError(RuntimeError):
    """The data set cannot be read: missing, unreachable, wrong credentials or bad manifest.

    The message names the URI and, for S3, the endpoint and bucket; never a credential.
    """


# -- manifest ------------------------------------------------------------------------------


def _scrub(text: str) -> str:
    """Remove the secret key from a message, should an error ever echo it."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    return text.replace(secret, "***") if secret and len(secret) >= 8 else text


def _where(uri: str) -> str:
    if not storage.is_remote(uri):
        return uri
    bucket = uri[len("s3://"):].partition("/")[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"{uri} (S3 endpoint {endpoint or 'AWS default'}, bucket {bucket!r})"


# How S3 servers (AWS, SeaweedFS, MinIO) and the AWS SDKs under boto3 and pyarrow say that the
# request's credentials were refused (wrong keys) or that an anonymous request was.
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidSignature")


def _credentials_in_use() -> str:
    """Where the AWS SDK takes credentials from here, named, never shown."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    profile = os.environ.get("AWS_PROFILE", "default")
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser(
        "~/.aws/credentials")
    if os.path.exists(path):
        return f"profile {profile!r} of {path}"
    return "no credentials (none set: an anonymous request)"


def access_error(uri: str, err: BaseException, doing: str = "reading") -> DataSourceError:
    """The :class:`DataSourceError` for an error ``doing`` something at ``uri``: the URI, and
    for S3 the endpoint and bucket; when the server refused the credentials it says so first,
    and which credentials were used (by name, never a value). None of the message is a
    credential: a secret key an SDK echoed is masked."""
    text = str(err)
    if storage.is_remote(uri) and any(mark in text for mark in _DENIED):
        # wsdan.storage's "cannot read URI (S3 endpoint ..., bucket ...): " is said already.
        cut = text.find("): ") if "(S3 endpoint" in text else -1
        text = text[cut + 3:] if cut >= 0 else text
        return DataSourceError(_scrub(
            f"access denied {doing} {_where(uri)} with {_credentials_in_use()}: give keys "
            "this server accepts (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
            f"and AWS_SHARED_CREDENTIALS_FILE); the server said: {text}"))
    where = "" if storage.is_remote(uri) and "S3 endpoint" in text else f"{_where(uri)}: "
    return DataSourceError(_scrub(f"{doing} {where}{text}"))


def _join(root_uri: str, rel: str) -> str:
    return f"{root_uri.rstrip('/')}/{rel}"


def read_manifest(root_uri: str) -> dict[str, Any]:
    """Read and check ``<root_uri>/dataset.json``. Raises :class:`DataSourceError` naming the
    URI (and for S3 the endpoint and bucket) when it is missing, unreachable, forbidden or
    malformed. Reading it first is the pipeline's check of endpoint and credentials."""
    uri = _join(root_uri, MANIFEST)
    # wsdan.storage's messages already name the URI and, for S3, endpoint and bucket.
    hint = ("; check the bucket and prefix, AWS_ENDPOINT_URL and the AWS credentials"
            if storage.is_remote(uri) else "")
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise DataSourceError(_scrub(f"no data set manifest: {e}; write the data set with "
                                     "`wsdan data prepare` first")) from None
    except (OSError, ValueError) as e:
        if storage.is_remote(uri) and any(mark in str(e) for mark in _DENIED):
            raise access_error(uri, e) from None
        where = "" if storage.is_remote(uri) else f"{uri}: "
        raise DataSourceError(_scrub(f"{where}{e}{hint}")) from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataSourceError(f"{_where(uri)} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise DataSourceError(f"{_where(uri)}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataSourceError(f"{_where(uri)}: unsupported format_version {version!r} "
                              f"(this reader knows {FORMAT_VERSION})")
    missing = [k for k in ("classes", "num_classes", "counts", "shards") if k not in manifest]
    if missing:
        raise DataSourceError(f"{_where(uri)}: missing keys {missing}")
    problem = _manifest_problem(manifest)
    if problem:
        raise DataSourceError(f"{_where(uri)}: {problem}")
    return manifest


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_paths(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(p, str) for p in x)


def _is_row_groups(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(g, list) and all(map(_is_count, g)) for g in x)


# Per-split fields: key -> (check of one split's value, what it must be). row_groups is
# optional (without it the shards' footers are read).
_PER_SPLIT = {
    "counts": (_is_count, "an image count >= 0"),
    "shards": (_is_paths, "a list of shard paths"),
    "row_groups": (_is_row_groups, "a list of row counts per shard"),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the fields readers use (classes, num_classes, counts, shards,
    row_groups), naming the key; None when nothing is. Without this check a wrong type
    surfaces later as a TypeError deep in the launcher, the model card or the reader."""
    classes = manifest["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return f"classes must be a list of class names, got {_short(classes)}"
    if not _is_count(manifest["num_classes"]) or manifest["num_classes"] != len(classes):
        return (f"num_classes must be the number of classes ({len(classes)}), got "
                f"{_short(manifest['num_classes'])}")
    for key, (ok, what) in _PER_SPLIT.items():
        value = manifest.get(key, {})
        if not isinstance(value, dict):
            return f"{key} must map each split name to {what}, got {_short(value)}"
        for split, v in value.items():
            if not ok(v):
                return f"{key}.{split} must be {what}, got {_short(v)}"
    return None


def _shard_paths(root_uri: str, manifest: dict[str, Any],
                 split: str) -> tuple[pafs.FileSystem, list[str]]:
    shards = manifest["shards"]
    if split not in shards:
        raise DataSourceError(f"split {split!r} not in {_where(root_uri)}: it has "
                              f"{sorted(shards)}")
    fs, base = storage.filesystem_and_path(root_uri)
    return fs, [posixpath.join(base, rel) for rel in shards[split]]
