"""Build a cache store from a metadata file: validate every clip, run the frozen models once, write.

The loop is plain Python so that the CLI, the Prefect flow and the tests all run the same code; the
flow only adds retries, artifacts and reports around it (flows/build_cache.py). The store it writes is
the `cache` package's, which is storage only.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from filelock import FileLock, Timeout

from cache import norms, schema
from cache.store import EXPECTED_ERRNOS, StoreError, io_error, lock_path, os_errors
from cache.norms import publish_norm_report
from cache.writer import CacheWriter, ClipBatch, saved_codebook
from tts_core.cachebuild.shards import ShardJob, ShardMap, encode_batch, load_line
from tts_core.audio import AudioPolicy, LoadedAudio, load_clip  # noqa: F401  (load_clip: tests patch it)
from tts_core.captions import group_captions, settle_captions
from tts_core.encoders import embedded
from tts_core.frozen import FrozenModelsConfig, load_speaker_models, load_speech_tokenizer, load_text_encoder
from tts_core.metadata import MetaLine, lines_digest, read_metadata


@dataclass
class BuildConfig:
    metadata: Path
    audio_root: Path
    store: str
    models: FrozenModelsConfig = field(default_factory=FrozenModelsConfig)
    normalisation: schema.Normalisation = field(default_factory=schema.Normalisation)
    audio: AudioPolicy = field(default_factory=AudioPolicy)
    instruction_batch: int = 64
    loader_threads: int = 4
    tokenizer_fit_clips: int = 200
    report_max_rows: int | None = 200_000
    chunk_rows: int = schema.CLIP_CHUNK  # rows per chunk and per batch; fixed when the store is created
    max_batches: int | None = None  # stop after this many clip batches (tests, staged runs)

    def __post_init__(self) -> None:
        for name in ("chunk_rows", "loader_threads", "instruction_batch", "tokenizer_fit_clips"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise StoreError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class BuildProgress:
    phase: str  # "instructions" | "clips"
    done: int
    total: int


@dataclass
class BuildSummary:
    store: str
    n_rows: int
    n_ok: int
    n_quarantined: int
    reasons: dict[str, int]
    n_instructions: int
    resumed_from: int
    did_model_work: bool
    complete: bool
    seconds: float
    report: norms.NormReport | None
    report_paths: dict[str, str]
    model_names: dict[str, str]
    n_captions: int = 0  # usable (clip, instruction) pairs: the OK clips' own lines + their other captions

    def lines(self) -> list[str]:
        out = [f"store: {self.store}",
               f"rows: {self.n_rows}  ok: {self.n_ok}  quarantined: {self.n_quarantined}  "
               f"unique instructions: {self.n_instructions}",
               f"clips: {self.n_ok}  captions (clip, instruction pairs): {self.n_captions}"]
        if not self.did_model_work:
            out.append("cache already complete for this metadata and these models: nothing to do")
        elif self.resumed_from:
            out.append(f"resumed at row {self.resumed_from}")
        out += [f"  quarantined {k}: {v}" for k, v in sorted(self.reasons.items())]
        out += [f"  {role}: {name}" for role, name in self.model_names.items()]
        if self.report is not None:
            out.append(f"norm verdict: {self.report.verdict} (spk mean {self.report.spk.mean:.3f}, "
                       f"xvec mean {self.report.xvec.mean:.3f}, ratio {self.report.ratio:.2f})")
            out.append(f"  {self.report.recommendation}")
        out += [f"norm report: {p}" for p in self.report_paths.values()]
        return out


def _store_lock(url: str) -> FileLock:
    """An OS-level lock keyed by the store's resolved location (released by the kernel if the process dies).
    For an object store it guards this machine only; across machines one writer per store is the user's
    contract (docs/scaling.md)."""
    path = lock_path(url)
    with os_errors(str(path.parent)):
        path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=0)


def instruction_ids(lines: list[MetaLine]) -> tuple[np.ndarray, list[str]]:
    """Ids in first-appearance order over usable lines: stable when lines are appended."""
    ids, texts, index = np.full(len(lines), -1, dtype=np.int32), [], {}
    for m in lines:
        if m.ok:
            if m.instruction not in index:
                index[m.instruction] = len(texts)
                texts.append(m.instruction)
            ids[m.row] = index[m.instruction]
    return ids, texts


def build_cache(cfg: BuildConfig, progress: Callable[[BuildProgress], None] | None = None,
                shard_map: ShardMap | None = None) -> BuildSummary:
    """Build (or resume, or confirm) ``cfg.store``. ``shard_map``: where clip batches are encoded —
    None = here, with audio prefetch threads; else a function mapping `ShardJob`s to their
    `ClipBatch`es *in order* (e.g. on Dask workers, flows/build_cache.py). The store is the same."""
    lock = _store_lock(cfg.store)
    try:
        lock.acquire()
    except Timeout:  # (a TimeoutError, so before OSError)
        raise StoreError(f"another build is writing {cfg.store} (lock {lock.lock_file} is held); "
                         "wait for it to finish or use another --store") from None
    except OSError as exc:
        raise io_error(lock.lock_file, exc) from None
    try:
        # Expected faults the store layer did not already name (a full disk under a report or temp file)
        with os_errors(cfg.store, only=EXPECTED_ERRNOS):
            return _build_locked(cfg, progress or (lambda p: None), shard_map)
    finally:
        lock.release()


def _build_locked(cfg: BuildConfig, progress: Callable[[BuildProgress], None], shard_map: ShardMap | None
                  ) -> BuildSummary:
    t0 = time.perf_counter()
    lines, _ = read_metadata(cfg.metadata)
    lines = group_captions(lines, cfg.audio_root, Path(cfg.metadata).name)
    if not lines:
        raise StoreError(f"{cfg.metadata} has no data lines (expected audio_path|transcript|instruction)")
    inst_ids, inst_texts = instruction_ids(lines)
    digest = lines_digest(lines)
    _check_audio_root(cfg)
    recorded = CacheWriter.recorded_rows(cfg.store)
    prefix = lines_digest(lines[:recorded]) if recorded and recorded < len(lines) else None

    saved = saved_codebook(cfg.store)
    if saved is not None and saved.kind != cfg.models.speech_tokenizer and cfg.models.s3gen_path() is None:
        raise StoreError(f"{cfg.store} holds {saved.kind} speech tokens, this build asks for "
                         f"{cfg.models.speech_tokenizer}: pass --speech-tokenizer {saved.kind}, or another --store")
    ve, xv = load_speaker_models(cfg.models)
    text_enc = load_text_encoder(cfg.models)
    fit_lines: list[MetaLine] = []
    try:
        tokenizer, fitted = load_speech_tokenizer(cfg.models, saved, lambda: _fit_clips(cfg, lines, fit_lines))
    except embedded.FitInputError as exc:
        m = fit_lines[exc.clip]
        raise StoreError(f"{Path(cfg.metadata).name}:{m.line}: {m.audio_path} gives non-finite {exc.what}, which would "
                         "poison the embedded tokenizer's fit; remove or re-export it, then rerun") from None
    identities = {"voice_encoder": ve.identity, "xvector": xv.identity,
                  "speech_tokenizer": tokenizer.identity, "text_encoder": text_enc.identity}
    w = CacheWriter.open_for_build(
        cfg.store, n_rows=len(lines), n_instructions=len(inst_texts), lines_digest=digest,
        prefix_digest=prefix, models=identities, normalisation=cfg.normalisation,
        text_hidden_size=text_enc.hidden_size, chunk_rows=cfg.chunk_rows,
        extra={"metadata": str(cfg.metadata), AUDIO_ROOT_ATTR: _root_name(cfg.audio_root),
               "tokenizer_vocab": int(tokenizer.vocab_size), "tokenizer_frame_rate": float(tokenizer.frame_rate),
               embedded.KIND_ATTR: getattr(tokenizer, "kind", "s3")})
    if fitted:
        arrays, conf = tokenizer.arrays()
        w.save_arrays(schema.TOKENIZER_GROUPS[tokenizer.kind], arrays, conf)
    info = w.info
    resumed_from = info.committed_rows
    did_work = not info.complete

    # 1) instruction states, once per unique text
    done = info.committed_instructions
    while done < len(inst_texts):
        chunk = inst_texts[done: done + cfg.instruction_batch]
        w.append_instruction_states(done, text_enc.encode(chunk))
        done += len(chunk)
        progress(BuildProgress("instructions", done, len(inst_texts)))

    # 2) clips, one chunk-aligned batch at a time; audio of the next batch loads while models run
    chunk = info.chunk_rows
    starts = list(range(info.committed_rows, len(lines), chunk))
    if cfg.max_batches is not None:
        starts = starts[: cfg.max_batches]
    if shard_map is None:
        batches = _local_batches(cfg, lines, starts, chunk, inst_ids, ve, xv, tokenizer)
    else:
        codebook = embedded.saved(tokenizer) if hasattr(tokenizer, "arrays") else None  # workers rebuild it
        jobs = (ShardJob(start=s, lines=tuple(lines[s:s + chunk]),
                         instruction_ids=tuple(int(i) for i in inst_ids[s:s + chunk]),
                         metadata_name=Path(cfg.metadata).name, audio_root=str(cfg.audio_root), audio=cfg.audio,
                         models=cfg.models, codebook=codebook, loader_threads=cfg.loader_threads) for s in starts)
        batches = shard_map(jobs)
    status = w.statuses()
    for b in batches:
        settle_captions(b, status, schema.STATUS_CAPTION, schema.STATUS_OK, schema.STATUS_QUARANTINED)
        w.write_clip_batch(b)
        progress(BuildProgress("clips", b.start + b.n, len(lines)))

    complete = w.info.committed_rows == len(lines)
    report, paths = None, {}
    if complete:
        if not w.info.complete:
            w.finalize()
        report, paths = publish_norm_report(cfg.store, cfg.report_max_rows)
    manifest = w.read_manifest_parts()
    q = manifest[manifest.status == "quarantined"]
    usable = manifest[manifest.status.isin(["ok", "caption"])]
    return BuildSummary(
        store=cfg.store, n_rows=len(lines), n_ok=int((manifest.status == "ok").sum()), n_quarantined=len(q),
        n_captions=len(usable),
        reasons=dict(Counter(q.reason)), n_instructions=len(inst_texts), resumed_from=resumed_from,
        did_model_work=did_work, complete=complete, seconds=time.perf_counter() - t0, report=report,
        report_paths=paths, model_names={k: v.name for k, v in identities.items()})


AUDIO_ROOT_ATTR = "audio_root"  # key of the store's "extra" attributes: the resolved --audio-root


def _root_name(root: Path | str) -> str:
    return str(Path(root).resolve())


def _check_audio_root(cfg: BuildConfig) -> None:
    """The audio root is part of what a store was built from (like its metadata lines): resuming or
    appending with another one would mix rows read from two trees, so it is refused, saying what differs."""
    recorded = (CacheWriter.recorded_extra(cfg.store) or {}).get(AUDIO_ROOT_ATTR)
    if recorded is not None and _root_name(recorded) != _root_name(cfg.audio_root):
        raise StoreError(f"{cfg.store} was built from audio under {recorded}, this run reads --audio-root "
                         f"{_root_name(cfg.audio_root)}: its rows would come from two trees. Rerun with "
                         f"--audio-root {recorded}, or use a new --store.")


def _fit_clips(cfg: BuildConfig, lines: list[MetaLine], used: list[MetaLine]) -> list[np.ndarray]:
    """The first N loadable clips, in file order: deterministic input for the embedded tokenizer. They pass
    the same checks as every clip (so an absurd one is quarantined before the fit sees it); ``used``
    receives their lines, so that a fit failing on one can name it."""
    wavs = []
    for m in lines:
        if len(wavs) >= cfg.tokenizer_fit_clips:
            break
        a = load_line(cfg.audio_root, Path(cfg.metadata).name, cfg.audio, m)
        if isinstance(a, LoadedAudio):
            wavs.append(a.wav)
            used.append(m)
    if not wavs:
        raise StoreError(f"no loadable clip in {cfg.metadata} to fit the embedded tokenizer on")
    return wavs


def _local_batches(cfg: BuildConfig, lines: list[MetaLine], starts: list[int], chunk: int, inst_ids: np.ndarray,
                   ve, xv, tokenizer) -> Iterator[ClipBatch]:
    """Encode batches in this process; the next batch's audio loads on threads while the models run."""
    def submit(start: int) -> list:
        return [pool.submit(load_line, cfg.audio_root, Path(cfg.metadata).name, cfg.audio, m)
                for m in lines[start:start + chunk]]

    with ThreadPoolExecutor(cfg.loader_threads) as pool:
        pending = submit(starts[0]) if starts else None
        for k, start in enumerate(starts):
            loaded = [f.result() for f in pending]
            if k + 1 < len(starts):
                pending = submit(starts[k + 1])
            yield encode_batch(lines[start:start + chunk], loaded, inst_ids[start:start + chunk], ve, xv, tokenizer,
                               Path(cfg.metadata).name)
