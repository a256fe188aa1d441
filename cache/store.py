"""Open a cache store (local path or any fsspec URL) and check what it was built with.

Both the writer and the reader go through here, so the compatibility rules live in one place, and so
does fault handling: every Zarr access goes through `CheckedStore`, which turns I/O errors (disk full,
read-only, permission denied) into one-line `StoreError`s naming the path, verifies each chunk's
CRC32C (the last codec of every array) so a corrupted chunk names itself, and — on a finished store,
where every chunk was written — refuses a missing chunk that Zarr would silently read as fill values.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, Iterable, Iterator, Mapping

import fsspec
import google_crc32c
import zarr
from zarr.abc.store import ByteRequest
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from cache import schema
from tts_core.identity import ModelIdentity


class StoreError(Exception):
    """A store that cannot be used as asked; the message says why and what to do instead."""


class StoreNotFound(StoreError):
    """No store at that location (the only open failure that lets a build create one)."""


MISSING, CORRUPTED = "missing (deleted or lost)", "corrupted (checksum mismatch)"


def damaged(store: str, path: str, what: str) -> StoreError:
    return StoreError(f"{path} is {what}: the store is damaged; delete {store} and rerun the same build-cache "
                      "command to rebuild it")


def compressors() -> tuple:
    """Blosc/zstd, then a CRC32C of the stored bytes (checked on every read)."""
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()


# ---- where a store is -------------------------------------------------------------------------------------
def local_path(url: str) -> Path | None:
    """The filesystem path of a local store (plain path, file:// or local:// URL); None for remote URLs."""
    protocol, path = fsspec.core.split_protocol(url)
    return Path(path).expanduser() if protocol in (None, "file", "local") else None


def store_location(url: str) -> str:
    """One name per store: local paths resolved (symlinks, `..`, relative), URLs normalised by fsspec."""
    path = local_path(url)
    if path is not None:
        return str(path.resolve())
    fs, root = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{re.sub('/+', '/', root).rstrip('/')}"


def lock_path(url: str) -> Path:
    """The OS lock file guarding one store: beside a local store, in the temp dir for a remote one."""
    location = store_location(url)
    if local_path(url) is not None:
        return Path(location + ".lock")
    return Path(tempfile.gettempdir()) / "instruct-tts-locks" / (hashlib.sha256(location.encode()).hexdigest()[:24] + ".lock")


# ---- expected I/O faults -------------------------------------------------------------------------------------
def io_error(path: str, exc: OSError) -> StoreError:
    """The one-line message for an I/O fault at ``path``: what happened and what to do."""
    path = str(exc.filename or path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left on the device holding {path}: free space, then rerun the same command "
                          "(a build resumes where it stopped)")
    if exc.errno == errno.EROFS:
        return StoreError(f"{path} is on a read-only file system: make it writable or use another location, "
                          "then rerun the same command")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoreError(f"permission denied: {path}: fix its permissions or use another location, "
                          "then rerun the same command")
    return StoreError(f"I/O error on {path}: {exc.strerror or exc}; fix it, then rerun the same command "
                      "(a build resumes where it stopped)")


EXPECTED_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


@contextmanager
def os_errors(path: str, only: frozenset[int] | None = None) -> Iterator[None]:
    """Turn an OSError raised inside into `io_error` (all of them, or those with an errno in ``only``)."""
    try:
        yield
    except OSError as exc:
        if only is not None and exc.errno not in only:
            raise
        raise io_error(path, exc) from None


# ---- fault injection (tests) ------------------------------------------------------------------------------
_write_hook: Callable[[str], None] | None = None


@contextmanager
def write_hook(fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn(path)`` before every write or delete the cache makes (Zarr keys and published files).
    Tests raise from it to kill a build at exactly that write, or to fake a full or read-only disk."""
    global _write_hook
    prev, _write_hook = _write_hook, fn
    try:
        yield
    finally:
        _write_hook = prev


def before_write(path: str) -> None:
    if _write_hook is not None:
        _write_hook(path)


# ---- the Zarr store every open goes through -----------------------------------------------------------------
def _is_chunk(key: str) -> bool:
    return not key.endswith("zarr.json")


class CheckedStore(WrapperStore):
    """A Zarr store wrapper: fault hook before writes, I/O errors as `StoreError`, chunk CRC32C checked,
    and (``strict``, a finished store) a missing chunk refused instead of read back as fill values."""

    def __init__(self, store, url: str = "", strict: bool = False) -> None:
        super().__init__(store)
        self.url, self.strict = url, strict

    def _with_store(self, store):
        return type(self)(store, self.url, self.strict)

    def _path(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        with os_errors(self._path(key)):
            buf = await self._store.get(key, prototype, byte_range)
        if _is_chunk(key):
            if buf is None:
                if self.strict:
                    raise damaged(self.url, self._path(key), MISSING)
            elif byte_range is None:
                data = buf.as_numpy_array()  # the crc32c codec's layout: payload, then its CRC32C (uint32 LE)
                if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(bytes(data[-4:]), "little"):
                    raise damaged(self.url, self._path(key), CORRUPTED)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        return await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges))

    async def _get_many(self, requests) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def set(self, key: str, value: Buffer) -> None:
        before_write(self._path(key))
        with os_errors(self._path(key)):
            await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        before_write(self._path(key))
        with os_errors(self._path(key)):
            await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key: str) -> None:
        before_write(self._path(key))
        with os_errors(self._path(key)):
            await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        before_write(self._path(prefix))
        with os_errors(self._path(prefix)):
            await self._store.delete_dir(prefix)

    async def clear(self) -> None:
        before_write(self.url)
        with os_errors(self.url):
            await self._store.clear()


def open_group(url: str, mode: str = "r", strict: bool = False) -> zarr.Group:
    """The store's root group through `CheckedStore`. ``strict``: a missing chunk is damage (finished stores)."""
    path = local_path(url)
    read_only = mode == "r"
    inner = LocalStore(path, read_only=read_only) if path is not None else \
        FsspecStore.from_url(url, read_only=read_only)
    try:
        return zarr.open_group(store=CheckedStore(inner, url.rstrip("/"), strict), mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise StoreNotFound(f"no cache store at {url}; build one with `instruct-tts build-cache`") from None
    except (ValueError, KeyError, TypeError) as exc:  # unparsable zarr.json
        raise damaged(url, f"{url}/zarr.json", f"unreadable ({type(exc).__name__})") from None


def store_exists(url: str) -> bool:
    try:
        open_group(url, "r")
        return True
    except StoreNotFound:
        return False


@dataclass(frozen=True)
class StoreInfo:
    """The store-level attributes, typed."""

    schema_version: int
    models: dict[str, ModelIdentity]
    normalisation: schema.Normalisation
    text_hidden_size: int
    chunk_rows: int
    n_rows: int
    n_instructions: int
    lines_digest: str
    committed_rows: int
    committed_instructions: int
    complete: bool
    manifest_sha256: str | None  # of manifest.parquet, recorded when the store is finalised
    extra: Mapping[str, Any]

    @classmethod
    def from_attrs(cls, url: str, attrs: Mapping[str, Any]) -> "StoreInfo":
        version = attrs.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise StoreError(f"{url} has cache schema {version}; this code reads schema {schema.SCHEMA_VERSION} "
                             f"({schema.SCHEMA_VERSION}: {schema.SCHEMA_CHANGE}, docs/cache.md). Rebuild the store "
                             "with this version: run the same build-cache command with a new --store (or delete "
                             "this one first).")
        return cls(
            schema_version=version,
            models={k: ModelIdentity.from_dict(v) for k, v in attrs["models"].items()},
            normalisation=schema.Normalisation.from_dict(attrs["normalisation"]),
            text_hidden_size=int(attrs["text_hidden_size"]),
            chunk_rows=int(attrs["chunk_rows"]),
            n_rows=int(attrs["n_rows"]),
            n_instructions=int(attrs["n_instructions"]),
            lines_digest=attrs["lines_digest"],
            committed_rows=int(attrs["committed_rows"]),
            committed_instructions=int(attrs["committed_instructions"]),
            complete=bool(attrs["complete"]),
            manifest_sha256=attrs.get("manifest_sha256"),
            extra=dict(attrs.get("extra", {})),
        )


def check_identities(url: str, recorded: Mapping[str, ModelIdentity], loaded: Mapping[str, ModelIdentity]) -> None:
    """Refuse to mix outputs of different weights in one store."""
    problems = []
    for role in schema.MODEL_ROLES:
        a, b = recorded.get(role), loaded.get(role)
        if a is None or b is None or not a.same_model(b):
            problems.append(
                f"  {role}: store has {a.name if a else None} (sha256 {a.sha256[:12] if a else '-'}), "
                f"this run loads {b.name if b else None} (sha256 {b.sha256[:12] if b else '-'})")
    if problems:
        raise StoreError(
            f"{url} was built with other frozen-model weights:\n" + "\n".join(problems)
            + "\nUse a new --store, or point the model options at the weights the store was built with.")


def check_complete(url: str, g: zarr.Group, info: StoreInfo) -> None:
    """What Zarr cannot check for us on a finished store: every array is there and spans the recorded
    rows, and each ragged array ends where its offsets say (a truncated token or state table would
    otherwise read short silently)."""
    def array(path: str) -> zarr.Array:
        try:
            return g[path]
        except KeyError:
            raise damaged(url, f"{url}/{path}", MISSING) from None

    want = {spec.path: info.n_rows for spec in schema.CLIP_ARRAYS}
    want |= {offsets: info.n_rows + 1 for offsets, _ in schema.RAGGED_TOKENS}
    want[schema.INSTRUCTION_OFFSETS] = info.n_instructions + 1
    for ragged, offsets in [(flat, offsets) for offsets, flat in schema.RAGGED_TOKENS] + [
            (schema.INSTRUCTION_STATES, schema.INSTRUCTION_OFFSETS)]:
        want[ragged] = int(array(offsets)[-1])
    for path, n in want.items():
        if array(path).shape[0] != n:
            raise damaged(url, f"{url}/{path}", f"{array(path).shape[0]} rows long where the store records {n}")
