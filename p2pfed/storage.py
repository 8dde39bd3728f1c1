"""Shared storage: a tiny create-only interface over a local/NFS folder or any fsspec URL.

get / put_new / exists / list_prefix. Nothing in the protocol overwrites or deletes.
Every read is bounded: `get` fetches at most the cap of the key's kind plus one byte
(`layout.max_size`), so an oversized object is refused before it is downloaded.
Backends declare whether create-only is atomic; `init` refuses storage where it is not
(`probe`). Transient errors are retried with backoff; a write retried after an error
that may have landed is settled by reading the object back."""
from __future__ import annotations

import errno
import os
import random
import secrets
import time
from pathlib import Path
from typing import Callable, TypeVar

from . import layout
from .errors import IntegrityError, StorageError, UsageError

T = TypeVar("T")
RETRIES = int(os.environ.get("P2PFED_STORAGE_RETRIES", "6"))
BACKOFF_S = float(os.environ.get("P2PFED_STORAGE_BACKOFF", "0.5"))
TIMEOUT_S = float(os.environ.get("P2PFED_STORAGE_TIMEOUT", "120"))  # per S3 request; a hung one is retried
_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                    "OperationAborted", "ConditionalRequestConflict", "409"}


class Storage:
    """Base: subclasses implement the _raw_* operations; retries live here once."""

    url: str
    endpoint: str | None = None  # where the requests go, when that is not the URL itself
    atomic_create: bool = False

    def at(self) -> str:
        """' at ENDPOINT' for messages, or '' for a folder."""
        return f" at {self.endpoint}" if self.endpoint else ""

    # -- interface -----------------------------------------------------------------------
    def get(self, key: str, max_size: int | None = None) -> bytes:
        """Bytes of `key`; FileNotFoundError if absent; IntegrityError if it holds more
        than `max_size` bytes (default: the cap of its kind, `layout.max_size`). At most
        max_size + 1 bytes are ever read: one ranged request on S3, as many as a plain one."""
        cap = layout.max_size(key) if max_size is None else max_size
        data = self._retry(lambda: self._raw_get(key, cap), key)
        if len(data) > cap:
            size = self._retry(lambda: self._raw_size(key), key)  # only on this error path
            raise IntegrityError(f"{key}: {size} bytes, more than the {cap} bytes "
                                 f"a{'n' if layout.kind_name(key)[0] in 'aeiou' else ''} {layout.kind_name(key)} "
                                 "object may hold; not downloaded",
                                 "someone wrote an oversized object; run `p2pfed verify` and alert the members")
        return data

    def exists(self, key: str) -> bool:
        return self._retry(lambda: self._raw_exists(key), key)

    def list_prefix(self, prefix: str) -> list[str]:
        """Sorted keys under `prefix` (a folder-like path, no trailing slash needed)."""
        return sorted(self._retry(lambda: self._raw_list(prefix.strip("/")), prefix))

    def put_new(self, key: str, data: bytes) -> None:
        """Create `key` with `data`; FileExistsError if it exists with other bytes.

        Re-putting identical bytes is a no-op success: after a lost response the first
        attempt may have landed, and content-addressed objects are re-put on resume."""
        try:
            self._retry(lambda: self._raw_put_new(key, data), key)
        except FileExistsError:
            # read back at most one byte more than ours: a larger object differs anyway
            if self._retry(lambda: self._raw_get(key, len(data)), key) != data:
                raise
            return

    # -- retries ---------------------------------------------------------------------------
    def _retry(self, op: Callable[[], T], key: str) -> T:
        for attempt in range(RETRIES + 1):
            try:
                return op()
            except FileNotFoundError as exc:
                if "NoSuchBucket" in _codes(exc):  # s3fs says "not found" for the bucket too
                    raise _explain(exc, self, key) from None
                raise
            except FileExistsError:
                raise
            except Exception as exc:  # classify: transient is retried, the rest explained
                if not _from_backend(exc):
                    raise  # a bug in our code (TypeError, KeyError...) must not read as an outage
                if not _is_transient(exc) or attempt == RETRIES:
                    raise _explain(exc, self, key) from None
                time.sleep(BACKOFF_S * (2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _raw_get(self, key: str, max_size: int) -> bytes:
        """At most max_size + 1 bytes of `key` (the whole object if it is not larger)."""
        raise NotImplementedError

    def _raw_size(self, key: str) -> int: raise NotImplementedError
    def _raw_exists(self, key: str) -> bool: raise NotImplementedError
    def _raw_list(self, prefix: str) -> list[str]: raise NotImplementedError
    def _raw_put_new(self, key: str, data: bytes) -> None: raise NotImplementedError


# Exceptions of these packages come from the backend or the network, never from our code
# (asyncio, http: IncompleteReadError and IncompleteRead are not OSErrors).
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "yarl",
                    "asyncio", "http")


def _chain(exc: BaseException):
    """exc, then its causes and contexts (s3fs wraps botocore's error in an OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _from_backend(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _BACKEND_MODULES


def _codes(exc: BaseException) -> set[str]:
    """S3 error codes and HTTP statuses found on the exception chain (botocore's `response`)."""
    found = set()
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            found.add(str(resp.get("Error", {}).get("Code") or ""))
            found.add(str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or ""))
    return found - {""}


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if _codes(exc) & _TRANSIENT_CODES:
        return True
    name = type(exc).__name__
    if any(s in name for s in ("Timeout", "Connection", "ServerDisconnected", "ClientPayload",
                               "ResponseStreamingError", "IncompleteRead", "ReadError")):
        return True
    text = str(exc)
    return any(s in text for s in ("503", "500 ", "SlowDown", "Throttl", "timed out",
                                   "Connection reset", "ConditionalRequestConflict"))


def _explain(exc: BaseException, storage: "Storage", key: str) -> Exception:
    """Turn a backend exception into a one-line StorageError with a hint."""
    url = storage.url
    name, text = type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else ""
    if "NoCredentials" in name or "credentials" in text.lower():
        return StorageError(f"no credentials for {url}",
                            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, PermissionError) or _codes(exc) & {"AccessDenied", "403", "InvalidAccessKeyId",
                                                          "SignatureDoesNotMatch"}:
        return StorageError(f"access denied to {url} ({key})",
                            "check the credentials and the bucket policy")
    if "NoSuchBucket" in _codes(exc) or "NoSuchBucket" in text:
        bucket = url.partition("://")[2].split("/")[0]
        return StorageError(f"bucket {bucket!r} of {url} does not exist{storage.at()}",
                            "create the bucket first, or check the bucket name and --endpoint")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on the storage {url} while writing {key}",
                            "free space on the shared folder; nothing was half-written")
    if _is_transient(exc):
        tries = f"{RETRIES} {'retry' if RETRIES == 1 else 'retries'}"
        # neutral hint: this may be `init` at a terminal, not a tick under cron
        return StorageError(f"storage {url} unreachable{storage.at()} after {tries} ({name})",
                            "check the network and the endpoint URL; a tick run by cron retries by itself")
    return StorageError(f"storage error on {url} at {key}: {name}: {text}",
                        "check the storage URL and endpoint")


class LocalStorage(Storage):
    """A local or NFS folder. Create-only via link(2): atomic, and exclusive on NFS too."""

    atomic_create = True

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad storage key {key!r}")
        # A symbolic link inside the shared folder would send reads and writes outside it
        # (the root itself may be a link: that is the user's own mount choice).
        path = self.root
        for part in filter(None, key.split("/")):
            path = path / part
            if path.is_symlink():
                raise IntegrityError(f"{key}: {path.relative_to(self.root)} is a symbolic link in the shared folder",
                                     "someone changed the shared folder; remove the link, restore the object "
                                     "and run `p2pfed verify`")
        return self.root / key

    def _raw_get(self, key: str, max_size: int) -> bytes:
        with open(self._path(key), "rb") as fh:
            return fh.read(max_size + 1)

    def _raw_size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def _raw_exists(self, key: str) -> bool:
        return self._path(key).exists()

    def _raw_list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return [p.relative_to(self.root).as_posix() for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")]

    def _raw_put_new(self, key: str, data: bytes) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(6)}"
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, final)  # FileExistsError if another writer won
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            tmp.unlink(missing_ok=True)


class FsspecStorage(Storage):
    """Any fsspec URL. Only S3 (s3fs, If-None-Match) has an atomic create-only write."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        import fsspec  # imported here: the local default never pays for it

        self.url = url.rstrip("/")
        protocol, _, path = self.url.partition("://")
        options: dict = {"skip_instance_cache": True}
        if protocol in ("s3", "s3a"):
            endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            # Listings must never come from a cache: membership is read from them.
            options.update(use_listings_cache=False,
                           # our own retry loop (with read-back) is the one that counts
                           config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"},
                                          "connect_timeout": min(10.0, TIMEOUT_S),
                                          "read_timeout": TIMEOUT_S})
            if endpoint:
                options["endpoint_url"] = endpoint
            self.endpoint = endpoint or "AWS's default S3 endpoint"
            self.atomic_create = True
        try:
            self.fs = fsspec.filesystem(protocol, **options)
        except (ImportError, ValueError) as exc:  # a typo on the command line, not an outage
            raise UsageError(f"unsupported storage URL {url!r}: {exc}",
                             "use a folder path or s3://bucket/prefix") from None
        self.root = path.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _raw_get(self, key: str, max_size: int) -> bytes:
        # A ranged GET (Range: bytes=0-max_size): one request, like the plain GET it replaces.
        try:
            return self.fs.cat_file(self._path(key), start=0, end=max_size + 1)
        except OSError as exc:
            # 416 for a range starting at 0 means the object is empty (AWS answers so)
            if _codes(exc) & {"InvalidRange", "416"}:
                return b""
            raise

    def _raw_size(self, key: str) -> int:
        return int(self.fs.info(self._path(key))["size"])

    def _raw_exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def _raw_list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        strip = len(self.root) + 1
        return [p[strip:] for p in found if p.startswith(self.root + "/")]

    def _raw_put_new(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")
        except OSError as exc:
            # If-None-Match: * is the write's only precondition, so a 412 means the key
            # exists. s3fs says FileExistsError only when the reply names the condition
            # (AWS does); SeaweedFS does not, and s3fs raises a plain OSError(EINVAL).
            if _codes(exc) & {"PreconditionFailed", "412"}:
                raise FileExistsError(errno.EEXIST, f"{key} exists (412 PreconditionFailed)") from exc
            raise


def open_storage(url: str, endpoint_url: str | None = None) -> Storage:
    """A plain path or file:// URL is the embedded default; anything else goes to fsspec."""
    if "://" not in url:
        return LocalStorage(url)
    if url.startswith("file://"):
        return LocalStorage(url[len("file://"):])
    return FsspecStorage(url, endpoint_url)


def probe(storage: Storage) -> None:
    """Prove create-only writes hold here before a federation relies on them."""
    if not storage.atomic_create:
        raise StorageError(f"storage {storage.url} cannot do atomic create-only writes",
                           "use a local/NFS folder or S3 (AWS, MinIO) that supports If-None-Match")
    key = f"probe/{secrets.token_hex(8)}"
    storage.put_new(key, b"first")
    try:
        storage._retry(lambda: storage._raw_put_new(key, b"second"), key)
    except FileExistsError:
        pass
    else:
        raise StorageError(f"storage {storage.url} silently overwrote an existing object",
                           "use a store that honours If-None-Match (AWS S3 since 2024, MinIO)")
    if storage.get(key, max_size=16) != b"first":
        raise StorageError(f"storage {storage.url} lost a create-only write", "use another store")
