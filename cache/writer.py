"""Chunked, resumable writes into a cache store.

Commit protocol (what makes kill -9 at any write safe; every Zarr key and published file is replaced
atomically, locally by Zarr's LocalStore and here by temp file + rename):
- creation: arrays first, store attributes last — a store without attributes is an interrupted
  creation and is recreated;
- embedded tokenizer arrays: arrays first, their attributes last — without attributes they are absent,
  and the build refits them (deterministically: same codebook, same identity) and writes them again;
- a batch writes its rows' arrays, appends its tokens, writes its offsets and manifest part, and only
  then advances `committed_rows` in the store attributes. On reopen everything past the last commit
  is rolled back (ragged arrays truncated to the committed offset, stray temp files removed);
- finalize: manifest.parquet, then `complete` with the manifest's sha256.
So a resumed build ends byte-identical to an uninterrupted one (tests/test_store_faults.py kills a
build at every single write).
"""
from __future__ import annotations

import hashlib
import io
import shutil
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import fsspec
import numpy as np
import pandas as pd
import zarr

from cache import schema
from cache.store import (StoreError, StoreInfo, StoreNotFound, before_write, check_identities, compressors,
                         local_path, open_group, os_errors)
from tts_core.identity import ModelIdentity

# Every chunk of a finished store exists, even an all-fill one, so a missing chunk is always damage.
_CONFIG = {"write_empty_chunks": True}


@dataclass
class ClipBatch:
    """Results for rows [start, start + n) — every row of the batch, OK or quarantined."""

    start: int
    spk_emb: np.ndarray  # [n, 256] float32, zeros for quarantined rows
    xvec: np.ndarray  # [n, 192]
    duration: np.ndarray  # [n]
    instruction_id: np.ndarray  # [n] int32
    status: np.ndarray  # [n] int8
    tokens: Sequence[np.ndarray]  # n arrays (empty for quarantined rows)
    manifest: pd.DataFrame  # n rows, schema.MANIFEST_COLUMNS
    # n arrays each, one per schema.PROMPTS entry: S3 tokens of each clip's first 6 s / 15 s
    # (tts_core.reference). None: each clip's own first max_tokens tokens — the same for clips no longer
    # than the prompt (tests' short clips).
    prompt_tokens: Sequence[np.ndarray] | None = None
    prompt15_tokens: Sequence[np.ndarray] | None = None
    # [n] int32: the row holding each row's audio (schema clips/clip_row). None: each OK row is its own clip
    clip_row: np.ndarray | None = None

    def clip_rows(self) -> np.ndarray:
        if self.clip_row is not None:
            return np.asarray(self.clip_row, np.int32)
        return np.where(self.status == schema.STATUS_OK, self.start + np.arange(self.n), -1).astype(np.int32)

    @property
    def n(self) -> int:
        return len(self.status)

    def prompts(self) -> list[Sequence[np.ndarray]]:
        """The prompt token lists in schema.PROMPTS order (defaults filled in)."""
        given = (self.prompt_tokens, self.prompt15_tokens)
        return [seqs if seqs is not None else [np.asarray(t)[: spec.max_tokens] for t in self.tokens]
                for spec, seqs in zip(schema.PROMPTS, given, strict=True)]


class CacheWriter:
    """Owns one store while a build runs. Create with `open_for_build`."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url.rstrip("/")
        self.g = group
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    # ---- creation / reopening -------------------------------------------------------------
    @classmethod
    def open_for_build(cls, url: str, *, n_rows: int, n_instructions: int, lines_digest: str,
                       prefix_digest: str | None, models: Mapping[str, ModelIdentity],
                       normalisation: schema.Normalisation, text_hidden_size: int,
                       chunk_rows: int = schema.CLIP_CHUNK, extra: Mapping | None = None) -> "CacheWriter":
        """Create the store, or reopen it to resume/append after checking it is the same build.

        `prefix_digest(n)` semantics: the caller passes the digest of the first `n_rows_recorded`
        metadata lines when the store already exists (see `recorded_rows`), so appending new lines
        to a metadata file extends the store instead of being refused.
        """
        try:
            g = open_group(url, "r+")
        except StoreNotFound:
            g = None
        if g is None or "schema_version" not in g.attrs:
            return cls._create(url, n_rows, n_instructions, lines_digest, models, normalisation,
                               text_hidden_size, chunk_rows, extra or {})
        info = StoreInfo.from_attrs(url, g.attrs.asdict())
        check_identities(url, info.models, models)
        if info.text_hidden_size != text_hidden_size:
            raise StoreError(f"{url} holds text states of width {info.text_hidden_size}, this encoder gives {text_hidden_size}")
        if info.normalisation != normalisation:
            raise StoreError(f"{url} is configured to normalise {info.normalisation.to_dict()}, this run asks for "
                             f"{normalisation.to_dict()}; use `instruct-tts set-normalisation` or a new store")
        w = cls(url, g)
        if info.lines_digest != lines_digest:
            if n_rows > info.n_rows and prefix_digest == info.lines_digest:
                w._grow(n_rows, n_instructions, lines_digest)
            else:
                raise StoreError(
                    f"{url} was built from different metadata (its {info.n_rows} lines do not match the first "
                    f"lines of this file). Appending is allowed only by adding lines at the end; use a new --store.")
        w.rollback_uncommitted()
        return w

    @staticmethod
    def recorded_rows(url: str) -> int | None:
        try:
            g = open_group(url, "r")
        except StoreNotFound:
            return None
        return int(g.attrs["n_rows"]) if "n_rows" in g.attrs else None

    @staticmethod
    def recorded_extra(url: str) -> dict | None:
        """The store's "extra" attributes (what it was built from), None before its creation finished."""
        try:
            g = open_group(url, "r")
        except StoreNotFound:
            return None
        return dict(g.attrs["extra"]) if "extra" in g.attrs else None

    @classmethod
    def _create(cls, url, n_rows, n_instructions, lines_digest, models, normalisation, text_hidden_size,
                chunk_rows, extra):
        _refuse_foreign(url)
        _clear_own(url)  # what an interrupted creation left
        g = open_group(url, "a")

        def create(path: str, shape: tuple, chunks: tuple, dtype, fill=0) -> zarr.Array:
            parent, name = path.split("/")
            return g.require_group(parent).create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                                        fill_value=fill, compressors=compressors(), config=_CONFIG)

        for spec in schema.CLIP_ARRAYS:
            create(spec.path, (n_rows, spec.width) if spec.width else (n_rows,),
                   (chunk_rows, spec.width) if spec.width else (chunk_rows,), spec.dtype, spec.fill)
        # offsets[0] = 0 is written so that their first chunk exists even if no batch ever writes it
        for offsets, flat in schema.RAGGED_TOKENS:
            create(offsets, (n_rows + 1,), (chunk_rows,), "int64")[0] = 0
            create(flat, (0,), (schema.TOKEN_CHUNK,), schema.TOKEN_DTYPE)
        create(schema.INSTRUCTION_OFFSETS, (n_instructions + 1,), (schema.STATE_CHUNK_ROWS,), "int64")[0] = 0
        create(schema.INSTRUCTION_STATES, (0, text_hidden_size), (schema.STATE_CHUNK_ROWS, text_hidden_size),
               schema.STATE_DTYPE)
        # Attributes last: a store without them is an interrupted creation and is simply recreated.
        # (Always `update_attributes`: one atomic write. `attrs.update` writes zarr.json once per key.)
        g.update_attributes({
            "schema_version": schema.SCHEMA_VERSION,
            "models": {k: v.to_dict() for k, v in models.items()},
            "normalisation": normalisation.to_dict(),
            "text_hidden_size": int(text_hidden_size),
            "chunk_rows": int(chunk_rows),
            "n_rows": int(n_rows), "n_instructions": int(n_instructions),
            "lines_digest": lines_digest,
            "committed_rows": 0, "committed_instructions": 0, "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prompt_seconds": [p.seconds for p in schema.PROMPTS],
            "prompt_max_tokens": [p.max_tokens for p in schema.PROMPTS],
            "extra": dict(extra),
        })
        return cls(url, g)

    def _grow(self, n_rows: int, n_instructions: int, lines_digest: str) -> None:
        for spec in schema.CLIP_ARRAYS:
            self._arr(spec.path).resize((n_rows, spec.width) if spec.width else (n_rows,))
        for offsets, _ in schema.RAGGED_TOKENS:
            self._arr(offsets).resize((n_rows + 1,))
        self._arr(schema.INSTRUCTION_OFFSETS).resize((n_instructions + 1,))
        self.g.update_attributes({"n_rows": n_rows, "n_instructions": n_instructions,
                                  "lines_digest": lines_digest, "complete": False})

    # ---- state -------------------------------------------------------------------------------
    @property
    def info(self) -> StoreInfo:
        return StoreInfo.from_attrs(self.url, self.g.attrs.asdict())

    def statuses(self) -> np.ndarray:
        """int8 [n_rows]: each row's status (pending past the last commit)."""
        status = np.asarray(self._arr("clips/status")[:], np.int8)
        status[self.info.committed_rows:] = schema.STATUS_PENDING
        return status

    def _arr(self, path: str) -> zarr.Array:
        return self.g[path].with_config(_CONFIG)

    def rollback_uncommitted(self) -> None:
        """Drop whatever a killed build wrote past its last commit (tokens and states are appended)."""
        info = self.info
        ragged = [(flat, offsets, info.committed_rows) for offsets, flat in schema.RAGGED_TOKENS]
        ragged.append((schema.INSTRUCTION_STATES, schema.INSTRUCTION_OFFSETS, info.committed_instructions))
        for flat, offsets, committed in ragged:
            end = int(self._arr(offsets)[committed]) if committed else 0
            arr = self._arr(flat)
            if arr.shape[0] != end:
                arr.resize((end,) + arr.shape[1:])
        self._remove_temp_files()

    def _remove_temp_files(self) -> None:
        """Half-written files of a killed build (Zarr's `*.partial`, our `*.tmp`) are never read, only removed."""
        with os_errors(self.url):
            stray = [p for p in self.fs.find(self.root) if p.endswith((".partial", ".tmp"))]
        for p in stray:
            before_write(p)
            with os_errors(p):
                self.fs.rm(p)

    # ---- instruction states ------------------------------------------------------------------
    def append_instruction_states(self, first_id: int, states: Sequence[np.ndarray]) -> None:
        info = self.info
        if first_id != info.committed_instructions:
            raise RuntimeError(f"instruction batch starts at {first_id}, store expects {info.committed_instructions}")
        arr = self._arr(schema.INSTRUCTION_STATES)
        offsets = self._arr(schema.INSTRUCTION_OFFSETS)
        start = int(offsets[first_id]) if first_id else 0
        flat = np.concatenate([np.asarray(s, dtype=np.float32) for s in states], axis=0)
        half = flat.astype(schema.STATE_DTYPE)
        if not np.isfinite(half).all():
            raise ValueError("text-encoder states overflow float16; this encoder's activations are out of range")
        arr.resize((start + flat.shape[0], info.text_hidden_size))
        arr[start:] = half
        lens = np.array([s.shape[0] for s in states], dtype=np.int64)
        offsets[first_id + 1: first_id + 1 + len(states)] = start + np.cumsum(lens)
        self.g.attrs["committed_instructions"] = first_id + len(states)

    # ---- clips ---------------------------------------------------------------------------------
    def write_clip_batch(self, b: ClipBatch) -> None:
        info = self.info
        if b.start != info.committed_rows:
            raise RuntimeError(f"batch starts at row {b.start}, store expects {info.committed_rows}")
        end = b.start + b.n
        values = {"clips/spk_emb": b.spk_emb, "clips/xvec": b.xvec,
                  "clips/spk_norm": np.linalg.norm(b.spk_emb, axis=1), "clips/xvec_norm": np.linalg.norm(b.xvec, axis=1),
                  "clips/duration": b.duration, "clips/instruction_id": b.instruction_id, "clips/status": b.status,
                  "clips/clip_row": b.clip_rows()}
        for path, v in values.items():
            self._arr(path)[b.start:end] = v
        for (offsets, flat), seqs in zip(schema.RAGGED_TOKENS, [b.tokens, *b.prompts()], strict=True):
            self._append_ragged(offsets, flat, b.start, seqs)
        self._write_manifest_part(b.start, b.manifest)
        self.g.attrs["committed_rows"] = end  # the commit

    def _put_file(self, path: str, data: bytes) -> None:
        """Publish a whole file atomically: temp file, then rename (each step a write the fault hook sees)."""
        with os_errors(path):
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            before_write(path + ".tmp")
            with self.fs.open(path + ".tmp", "wb") as f:
                f.write(data)
            before_write(path)
            self.fs.mv(path + ".tmp", path)

    def _append_ragged(self, offsets: str, flat: str, start: int, seqs: Sequence[np.ndarray]) -> None:
        """Append rows [start, start + len(seqs)) of a ragged token array (flat values + offsets)."""
        off, arr = self._arr(offsets), self._arr(flat)
        first = int(off[start]) if start else 0
        lens = np.array([len(t) for t in seqs], dtype=np.int64)
        if lens.sum():
            values = np.concatenate([np.asarray(t) for t in seqs if len(t)]).astype(schema.TOKEN_DTYPE)
            arr.resize((first + values.shape[0],))
            arr[first:] = values
        off[start + 1: start + 1 + len(seqs)] = first + np.cumsum(lens)

    def _write_manifest_part(self, start: int, df: pd.DataFrame) -> None:
        self._put_file(f"{self.root}/{schema.MANIFEST_PARTS}/{start:012d}.parquet", _parquet(df))

    def read_manifest_parts(self) -> pd.DataFrame:
        committed = self.info.committed_rows
        with os_errors(self.url):
            parts = sorted(self.fs.glob(f"{self.root}/{schema.MANIFEST_PARTS}/*.parquet"))
            frames = []
            for p in parts:
                start = int(p.rsplit("/", 1)[1].split(".")[0])
                if start < committed:
                    with self.fs.open(p, "rb") as f:
                        frames.append(pd.read_parquet(f))
        if not frames:
            return pd.DataFrame(columns=list(schema.MANIFEST_COLUMNS))
        df = pd.concat(frames, ignore_index=True).sort_values("row")
        return df[df.row < committed].reset_index(drop=True)

    def finalize(self) -> pd.DataFrame:
        """Merge manifest parts into manifest.parquet, then mark the store complete with the manifest's hash."""
        df = self.read_manifest_parts()
        data = _parquet(df)
        self._put_file(f"{self.root}/{schema.MANIFEST_FILE}", data)
        self.g.update_attributes({"complete": True, "manifest_sha256": hashlib.sha256(data).hexdigest()})
        return df

    # ---- embedded tokenizer codebook -----------------------------------------------------------
    def save_arrays(self, group_path: str, arrays: Mapping[str, np.ndarray], attrs: Mapping) -> None:
        """Arrays first, attributes last: `saved_arrays` sees the group only once both are written."""
        sub = self.g.require_group(group_path)
        for name, a in arrays.items():
            a = np.asarray(a)
            sub.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.shape or (1,), compressors=compressors(),
                             config=_CONFIG, overwrite=True)[...] = a
        sub.update_attributes(dict(attrs))


def saved_arrays(g: zarr.Group, group_path: str, names: Sequence[str]) -> tuple[dict[str, np.ndarray], dict] | None:
    """What `save_arrays` wrote, or None when absent or interrupted (its attributes come last)."""
    if group_path not in g:
        return None
    sub = g[group_path]
    attrs = sub.attrs.asdict()
    if not attrs or any(n not in sub for n in names):
        return None
    return {n: sub[n][...] for n in names}, attrs


def saved_codebook(url: str) -> "embedded.SavedTokenizer | None":
    """The embedded tokenizer of a created store (of the kind the store records; none recorded: mel-vq);
    None when there is none yet, or when its write (or the store's creation) was interrupted: the build
    then refits it, deterministically."""
    from tts_core.encoders import embedded

    try:
        g = open_group(url, "r", strict=True)
    except StoreNotFound:
        return None
    if g.attrs.get("schema_version") != schema.SCHEMA_VERSION:
        return None  # no store yet (interrupted creation), or another schema: open_for_build says which
    kind = dict(g.attrs.get("extra") or {}).get(embedded.KIND_ATTR, embedded.MEL_VQ)
    if kind not in embedded.KINDS:
        return None  # S3 tokens: nothing embedded to restore
    saved = saved_arrays(g, schema.TOKENIZER_GROUPS[kind], embedded.ARRAY_NAMES[kind])
    return None if saved is None else embedded.SavedTokenizer(kind, *saved)


def _refuse_foreign(url: str) -> None:
    """Creating a store clears its location: only ever one that holds nothing but store files (an
    interrupted creation), never a directory of other data given as --store by mistake."""
    fs, root = fsspec.core.url_to_fs(url)
    with os_errors(url):
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.isdir(root) else []
    foreign = [n for n in names if not _own_entry(n)]
    if foreign:
        raise StoreError(f"{url} exists and is not a cache store (it holds {', '.join(sorted(foreign)[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); nothing was changed: use a new --store")


def _own_entry(name: str) -> bool:
    return name in schema.STORE_ENTRIES or name.startswith("norm_report.") or name.endswith((".partial", ".tmp"))


def _clear_own(url: str) -> None:
    """Remove the store's own entries, one by one, keeping its directory. Not Zarr's `clear` (rmtree of the
    root, then mkdir): a store reached through a symlink (cache/x.zarr -> /big/x.zarr) must lose its
    contents, never the link or what the link points at, and nothing that is not the store's own."""
    path = local_path(url)
    if path is not None:
        if not path.is_dir():
            return
        for entry in sorted(path.iterdir()):
            if _own_entry(entry.name):
                before_write(f"{url.rstrip('/')}/{entry.name}")
                with os_errors(str(entry)):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        return
    fs, root = fsspec.core.url_to_fs(url)
    with os_errors(url):
        names = fs.ls(root, detail=False) if fs.isdir(root) else []
    for p in sorted(names):
        if _own_entry(p.rstrip("/").rsplit("/", 1)[-1]):
            before_write(p)
            with os_errors(p):
                fs.rm(p, recursive=True)


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()

