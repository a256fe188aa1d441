"""The unit of build-cache model work — one chunk-aligned batch of rows — runnable in any process.

Why workers encode and one process writes: loading audio and running the three frozen models is
nearly all of a build's time, while writing a batch is a few array assignments. So a distributed build
fans `ShardJob`s out (Dask workers through prefect-dask, see flows/build_cache.py) and the flow's
process commits the returned `ClipBatch`es in row order with the same writer a local build uses. No two
processes ever touch one Zarr chunk, the commit / resume protocol is unchanged, and the store is the
one a single-process build writes (tested byte for byte).

Workers load the frozen models once per process (`_worker_models`, keyed by the models config and the
embedded tokenizer's codebook) and keep them for every later shard of the build.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from cache import schema
from cache.quarantine import Reason
from cache.writer import ClipBatch
from tts_core.audio import AudioPolicy, AudioRejected, LoadedAudio, load_clip
from tts_core.audio_paths import clip_path
from tts_core.encoders.embedded import SavedTokenizer
from tts_core.frozen import FrozenModelsConfig
from tts_core.metadata import MetaLine
from tts_core.reference import prompt_audio


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs for rows [start, start + len(lines)) — small and picklable."""

    start: int
    lines: tuple[MetaLine, ...]
    instruction_ids: tuple[int, ...]  # per line, -1 for unusable lines
    metadata_name: str  # for error messages: "meta.txt:17: ..."
    audio_root: str
    audio: AudioPolicy
    models: FrozenModelsConfig
    codebook: SavedTokenizer | None  # the embedded tokenizer (`encoders.embedded.saved`); None: S3 from s3gen weights
    loader_threads: int = 4


# ---- loading and encoding (shared by the local loop and remote workers) -------------------------------------
def load_line(audio_root: Path, metadata_name: str, audio: AudioPolicy, m: MetaLine
              ) -> LoadedAudio | AudioRejected | None:
    """The line's clip, why it cannot be used (its detail starts with `metadata:line`), or None for another
    caption of an earlier line (not loaded). Never raises: an error no check foresaw quarantines this one
    clip as `unreadable`, naming the error."""
    if not m.ok:
        return AudioRejected(m.reason, m.detail)
    if m.clip_of >= 0:
        return None
    try:
        return load_clip(clip_path(audio_root, m.audio_path, audio.allow_outside_root), audio)
    except AudioRejected as exc:
        exc.detail = f"{metadata_name}:{m.line}: {exc.detail}"
        return exc
    except Exception as exc:  # one clip must not stop the build
        return AudioRejected(Reason.UNREADABLE, f"{metadata_name}:{m.line}: {m.audio_path} could not be loaded "
                                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")


def _prompt_tokens(clips: Sequence[LoadedAudio], tokens: Sequence[np.ndarray], tokenizer) -> list[list[np.ndarray]]:
    """T3's prompts as Chatterbox builds them, one list per schema.PROMPTS entry: tokens of the clip's first
    6 s (15 s for Turbo) of its `prompt_wav` (Chatterbox's resampling), cut before tokenizing. Each distinct
    cut is tokenized once; a clip without `prompt_wav` that is no longer than a cut reuses its own tokens."""
    out = [list(tokens) for _ in schema.PROMPTS]
    todo: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (clip, cut length) → [(prompt k, clip j)]
    for k, spec in enumerate(schema.PROMPTS):
        for j, a in enumerate(clips):
            n = len(prompt_audio(a.prompt_source, spec.seconds))
            if a.prompt_wav is not None or n < len(a.wav):
                todo.setdefault((j, n), []).append((k, j))
    keys = list(todo)
    cut = [clips[j].prompt_source[:n] for j, n in keys]
    for key, toks in zip(keys, tokenizer.tokenize_batch(cut) if cut else []):
        for k, j in todo[key]:
            out[k][j] = toks
    return out


def encode_batch(batch: Sequence[MetaLine], loaded: list, iids: Sequence[int], ve, xv, tokenizer,
                 metadata_name: str = "metadata") -> ClipBatch:
    """Loaded (or rejected) clips of consecutive rows → their ClipBatch. A clip a model fails on is
    quarantined with the reason (its detail names `metadata_name:line`, as every quarantine detail does);
    it never sinks its batch. A caption line (``loaded`` None) runs no model: its row points at its clip's
    (STATUS_CAPTION; the writer settles it against that clip's outcome, `tts_core.captions.settle_captions`)."""
    n = len(batch)
    spk = np.zeros((n, schema.SPK_DIM), np.float32)
    xvec = np.zeros((n, schema.XVEC_DIM), np.float32)
    tokens: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    prompts = [[np.zeros(0, np.int64)] * n for _ in schema.PROMPTS]  # one list per schema.PROMPTS entry
    status = np.full(n, schema.STATUS_QUARANTINED, np.int8)
    duration = np.zeros(n, np.float32)
    reasons, details = [""] * n, [""] * n
    ok = [i for i, a in enumerate(loaded) if isinstance(a, LoadedAudio)]
    clip_row = np.full(n, -1, np.int32)
    for i, a in enumerate(loaded):
        if a is None:
            status[i], clip_row[i], details[i] = schema.STATUS_CAPTION, batch[i].clip_of, batch[i].detail
        elif isinstance(a, AudioRejected):
            reasons[i], details[i] = a.reason, a.detail
        else:
            duration[i] = a.duration
            details[i] = ", ".join(a.notes)

    def run(idx: list[int]) -> None:
        wavs = [loaded[i].wav for i in idx]
        s, x, t = ve.embed_batch(wavs), xv.embed_batch(wavs), tokenizer.tokenize_batch(wavs)
        cuts = _prompt_tokens([loaded[i] for i in idx], t, tokenizer)
        for j, i in enumerate(idx):
            if not (np.isfinite(s[j]).all() and np.isfinite(x[j]).all()):
                reasons[i] = Reason.MODEL_NONFINITE
                details[i] = f"{metadata_name}:{batch[i].line}: a frozen model returned NaN/inf for this clip"
                continue
            spk[i], xvec[i], tokens[i], status[i] = s[j], x[j], np.asarray(t[j]), schema.STATUS_OK
            for k, spec in enumerate(schema.PROMPTS):
                prompts[k][i] = np.asarray(cuts[k][j])[: spec.max_tokens]

    try:
        run(ok)
    except Exception:  # one bad clip must not sink its batch: retry one by one, quarantine the culprit
        for i in ok:
            try:
                run([i])
            except Exception as exc:
                reasons[i] = Reason.MODEL_ERROR
                details[i] = f"{metadata_name}:{batch[i].line}: {type(exc).__name__}: {exc}"
    usable = (status == schema.STATUS_OK) | (status == schema.STATUS_CAPTION)
    iid = np.where(usable, np.asarray(iids, np.int64), -1).astype(np.int32)
    clip_row = np.where(status == schema.STATUS_OK, [m.row for m in batch], clip_row).astype(np.int32)
    for i in range(n):
        if status[i] != schema.STATUS_OK:
            spk[i], xvec[i], tokens[i] = 0, 0, np.zeros(0, np.int64)
            for p in prompts:
                p[i] = np.zeros(0, np.int64)
    manifest = pd.DataFrame({
        "row": [m.row for m in batch], "clip_id": [m.clip_id for m in batch],
        "audio_path": [m.audio_path for m in batch], "transcript": [m.transcript for m in batch],
        "instruction": [m.instruction for m in batch], "speaker": [m.speaker for m in batch],
        "instruction_id": iid, "status": [schema.STATUS_NAMES[int(s)] for s in status],
        "reason": reasons, "detail": details, "duration": duration, "line": [m.line for m in batch],
        "language": [m.language for m in batch],
    }, columns=list(schema.MANIFEST_COLUMNS))
    return ClipBatch(batch[0].row, spk, xvec, duration, iid, status, tokens, manifest, *prompts, clip_row=clip_row)


# ---- remote side ---------------------------------------------------------------------------------------------
def _codebook_key(codebook: SavedTokenizer | None) -> str:
    if codebook is None:
        return ""
    h = hashlib.sha256(codebook.kind.encode())
    for name in sorted(codebook.arrays):
        h.update(np.ascontiguousarray(codebook.arrays[name]).tobytes())
    h.update(json.dumps(codebook.config, sort_keys=True, default=str).encode())
    return h.hexdigest()


_WORKER_MODELS: dict[tuple[str, str], tuple] = {}  # this process's loaded models (one set at a time)


def _worker_models(models: FrozenModelsConfig, codebook: SavedTokenizer | None) -> tuple:
    from tts_core.frozen import load_speaker_models, load_speech_tokenizer

    key = (repr(models), _codebook_key(codebook))
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        ve, xv = load_speaker_models(models)

        def no_fit():
            raise RuntimeError("a worker never fits the tokenizer: the build sends the codebook")

        tok, _ = load_speech_tokenizer(models, codebook, no_fit)
        _WORKER_MODELS[key] = (ve, xv, tok)
    return _WORKER_MODELS[key]


def encode_shard(job: ShardJob) -> ClipBatch:
    """Load, validate and encode one shard in this process (models cached per process)."""
    ve, xv, tok = _worker_models(job.models, job.codebook)
    with ThreadPoolExecutor(max(job.loader_threads, 1)) as pool:
        loaded = list(pool.map(lambda m: load_line(Path(job.audio_root), job.metadata_name, job.audio, m), job.lines))
    return encode_batch(job.lines, loaded, job.instruction_ids, ve, xv, tok, job.metadata_name)


# ---- ordering --------------------------------------------------------------------------------------------------
ShardMap = Callable[[Iterable[ShardJob]], Iterator[ClipBatch]]


def ordered_window(submit: Callable[[ShardJob], object], result: Callable[[object], ClipBatch],
                   jobs: Iterable[ShardJob], window: int) -> Iterator[ClipBatch]:
    """Submit jobs keeping at most ``window`` in flight; yield results in submission (= row) order, so
    the writer commits a prefix while later shards still run, and memory stays bounded."""
    pending: deque = deque()
    for job in jobs:
        pending.append(submit(job))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def _init_process_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@contextmanager
def process_shard_map(workers: int) -> Iterator[ShardMap]:
    """A `ShardMap` over ``workers`` local processes (spawned, one torch thread each share of the cores), for
    `build_cache` on one machine: the frozen models are mostly single-threaded work (WORLD analysis, the VoiceEncoder's
    LSTM, CAM++'s small convolutions), so N processes encode faster than one process's N threads. The store is the
    same as the in-process build's (shards are written in row order; each process loads the same models)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_process_worker,
                             initargs=(threads,)) as pool:
        yield lambda jobs: ordered_window(lambda j: pool.submit(encode_shard, j), lambda f: f.result(), jobs,
                                          2 * workers)
