"""Chunked, resumable writes into a cache store.

Commit protocol (what makes kill -9 safe): a batch writes its rows' arrays, appends its tokens,
writes its offsets and manifest part, and only then advances `committed_rows` in the store
attributes (an atomic file replace on local disks). On reopen everything past the last commit is
rolled back (token array truncated to the committed offset), so a resumed build ends with exactly
the rows an uninterrupted one writes.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import fsspec
import numpy as np
import pandas as pd
import zarr

from cache import schema
from cache.store import StoreError, StoreInfo, check_identities, compressor, open_group
from tts_core.identity import ModelIdentity


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
    # n arrays: S3 tokens of each clip's first PROMPT_SECONDS (tts_core.reference). None: each clip's own
    # first PROMPT_MAX_TOKENS tokens — the same for clips up to PROMPT_SECONDS long (tests' short clips).
    prompt_tokens: Sequence[np.ndarray] | None = None

    @property
    def n(self) -> int:
        return len(self.status)


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
        except StoreError:
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
        except StoreError:
            return None
        return int(g.attrs["n_rows"]) if "n_rows" in g.attrs else None

    @classmethod
    def _create(cls, url, n_rows, n_instructions, lines_digest, models, normalisation, text_hidden_size,
                chunk_rows, extra):
        g = zarr.open_group(store=url, mode="w", zarr_format=3)
        comp = compressor()
        for spec in schema.CLIP_ARRAYS:
            parent, name = spec.path.split("/")
            shape = (n_rows, spec.width) if spec.width else (n_rows,)
            chunks = (chunk_rows, spec.width) if spec.width else (chunk_rows,)
            g.require_group(parent).create_array(name, shape=shape, chunks=chunks, dtype=spec.dtype,
                                                 fill_value=spec.fill, compressors=comp)
        for offsets, flat in schema.RAGGED_TOKENS:
            g.require_group(offsets.split("/")[0]).create_array(
                offsets.split("/")[1], shape=(n_rows + 1,), chunks=(chunk_rows,), dtype="int64", fill_value=0,
                compressors=comp)
            g.require_group(flat.split("/")[0]).create_array(
                flat.split("/")[1], shape=(0,), chunks=(schema.TOKEN_CHUNK,), dtype=schema.TOKEN_DTYPE,
                fill_value=0, compressors=comp)
        ig = g.require_group("instructions")
        ig.create_array("offsets", shape=(n_instructions + 1,), chunks=(schema.STATE_CHUNK_ROWS,), dtype="int64",
                        fill_value=0, compressors=comp)
        ig.create_array("states", shape=(0, text_hidden_size), chunks=(schema.STATE_CHUNK_ROWS, text_hidden_size),
                        dtype=schema.STATE_DTYPE, fill_value=0, compressors=comp)
        # Attributes last: a store without them is an interrupted creation and is simply recreated.
        g.attrs.update({
            "schema_version": schema.SCHEMA_VERSION,
            "models": {k: v.to_dict() for k, v in models.items()},
            "normalisation": normalisation.to_dict(),
            "text_hidden_size": int(text_hidden_size),
            "chunk_rows": int(chunk_rows),
            "n_rows": int(n_rows), "n_instructions": int(n_instructions),
            "lines_digest": lines_digest,
            "committed_rows": 0, "committed_instructions": 0, "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prompt_seconds": schema.PROMPT_SECONDS, "prompt_max_tokens": schema.PROMPT_MAX_TOKENS,
            "extra": dict(extra),
        })
        return cls(url, g)

    def _grow(self, n_rows: int, n_instructions: int, lines_digest: str) -> None:
        for spec in schema.CLIP_ARRAYS:
            arr = self.g[spec.path]
            arr.resize((n_rows, spec.width) if spec.width else (n_rows,))
        for offsets, _ in schema.RAGGED_TOKENS:
            self.g[offsets].resize((n_rows + 1,))
        self.g[schema.INSTRUCTION_OFFSETS].resize((n_instructions + 1,))
        self.g.attrs.update({"n_rows": n_rows, "n_instructions": n_instructions,
                             "lines_digest": lines_digest, "complete": False})

    # ---- state -------------------------------------------------------------------------------
    @property
    def info(self) -> StoreInfo:
        return StoreInfo.from_attrs(self.url, self.g.attrs.asdict())

    def rollback_uncommitted(self) -> None:
        """Drop whatever a killed build wrote past its last commit (tokens and states are appended)."""
        info = self.info
        for offsets, flat in schema.RAGGED_TOKENS:
            end = int(self.g[offsets][info.committed_rows]) if info.committed_rows else 0
            if self.g[flat].shape[0] != end:
                self.g[flat].resize((end,))
        st_end = int(self.g[schema.INSTRUCTION_OFFSETS][info.committed_instructions]) if info.committed_instructions else 0
        if self.g[schema.INSTRUCTION_STATES].shape[0] != st_end:
            self.g[schema.INSTRUCTION_STATES].resize((st_end, info.text_hidden_size))

    # ---- instruction states ------------------------------------------------------------------
    def append_instruction_states(self, first_id: int, states: Sequence[np.ndarray]) -> None:
        info = self.info
        if first_id != info.committed_instructions:
            raise RuntimeError(f"instruction batch starts at {first_id}, store expects {info.committed_instructions}")
        arr = self.g[schema.INSTRUCTION_STATES]
        offsets = self.g[schema.INSTRUCTION_OFFSETS]
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
        g = self.g
        g["clips/spk_emb"][b.start:end] = b.spk_emb
        g["clips/xvec"][b.start:end] = b.xvec
        g["clips/spk_norm"][b.start:end] = np.linalg.norm(b.spk_emb, axis=1)
        g["clips/xvec_norm"][b.start:end] = np.linalg.norm(b.xvec, axis=1)
        g["clips/duration"][b.start:end] = b.duration
        g["clips/instruction_id"][b.start:end] = b.instruction_id
        g["clips/status"][b.start:end] = b.status
        prompts = b.prompt_tokens if b.prompt_tokens is not None else \
            [np.asarray(t)[: schema.PROMPT_MAX_TOKENS] for t in b.tokens]
        for (offsets, flat), seqs in zip(schema.RAGGED_TOKENS, (b.tokens, prompts), strict=True):
            self._append_ragged(offsets, flat, b.start, seqs)
        self._write_manifest_part(b.start, b.manifest)
        g.attrs["committed_rows"] = end  # the commit

    def _append_ragged(self, offsets: str, flat: str, start: int, seqs: Sequence[np.ndarray]) -> None:
        """Append rows [start, start + len(seqs)) of a ragged token array (flat values + offsets)."""
        g = self.g
        first = int(g[offsets][start]) if start else 0
        lens = np.array([len(t) for t in seqs], dtype=np.int64)
        if lens.sum():
            values = np.concatenate([np.asarray(t) for t in seqs if len(t)]).astype(schema.TOKEN_DTYPE)
            g[flat].resize((first + values.shape[0],))
            g[flat][first:] = values
        g[offsets][start + 1: start + 1 + len(seqs)] = first + np.cumsum(lens)

    def _write_manifest_part(self, start: int, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        path = f"{self.root}/{schema.MANIFEST_PARTS}/{start:012d}.parquet"
        self.fs.makedirs(f"{self.root}/{schema.MANIFEST_PARTS}", exist_ok=True)
        with self.fs.open(path + ".tmp", "wb") as f:
            f.write(buf.getvalue())
        self.fs.mv(path + ".tmp", path)

    def read_manifest_parts(self) -> pd.DataFrame:
        committed = self.info.committed_rows
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
        """Merge manifest parts into manifest.parquet and mark the store complete."""
        df = self.read_manifest_parts()
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        with self.fs.open(f"{self.root}/{schema.MANIFEST_FILE}.tmp", "wb") as f:
            f.write(buf.getvalue())
        self.fs.mv(f"{self.root}/{schema.MANIFEST_FILE}.tmp", f"{self.root}/{schema.MANIFEST_FILE}")
        self.g.attrs["complete"] = True
        return df

    # ---- embedded tokenizer codebook -----------------------------------------------------------
    def save_arrays(self, group_path: str, arrays: Mapping[str, np.ndarray], attrs: Mapping) -> None:
        sub = self.g.require_group(group_path)
        for name, a in arrays.items():
            a = np.asarray(a)
            sub.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.shape or (1,), overwrite=True)[...] = a
        sub.attrs.update(dict(attrs))
