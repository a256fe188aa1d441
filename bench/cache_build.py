"""Benchmark: cache-build clips/s and reader rows/s, measured in one run on this machine.

    uv run python -m bench.cache_build [--clips 192] [--device cpu|cuda]

Prints clips/s of the build (model loading excluded and included), of each frozen model alone, and
rows/s of the reader three ways (whole-table arrays, random-access Dataset, DataLoader workers).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()

    from tts_core.cachebuild.build import BuildConfig, build_cache
    from cache.reader import CacheDataset, CacheReader
    from tts_core.audio import load_clip
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus
    from tts_core.frozen import FrozenModelsConfig, load_speaker_models, load_text_encoder

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=work / "corpus", n_clips=a.clips, seed=0))
    print(f"device: {a.device}  torch threads: {torch.get_num_threads()}  clips: {a.clips}")

    models = FrozenModelsConfig(device=a.device)
    lines = [l.split("|") for l in corpus.metadata.read_text().splitlines() if l.strip()]
    wavs = [load_clip(corpus.root / l[0]).wav for l in lines]
    audio_s = sum(len(w) for w in wavs) / 16_000
    ve, xv = load_speaker_models(models)
    te = load_text_encoder(models)
    for name, fn in (("voice_encoder", ve.embed_batch), ("xvector", xv.embed_batch)):
        fn(wavs[:8])
        t = time.perf_counter()
        for i in range(0, len(wavs), 64):
            fn(wavs[i:i + 64])
        dt = time.perf_counter() - t
        print(f"  {name:14s} {len(wavs) / dt:8.1f} clips/s  ({audio_s / dt:7.1f} s audio/s)")
    texts = sorted({l[2] for l in lines})
    t = time.perf_counter()
    te.encode(texts)
    print(f"  {'text_encoder':14s} {len(texts) / (time.perf_counter() - t):8.1f} instructions/s")

    store = str(work / "bench.zarr")
    t = time.perf_counter()
    s = build_cache(BuildConfig(metadata=corpus.metadata, audio_root=corpus.root, store=store,
                                models=models, chunk_rows=64))
    total = time.perf_counter() - t
    print(f"build-cache: {s.n_ok} clips in {total:.1f} s = {s.n_ok / total:.1f} clips/s "
          f"(incl. model loading and tokenizer fit; {audio_s / total:.1f} s audio/s)")
    t = time.perf_counter()
    build_cache(BuildConfig(metadata=corpus.metadata, audio_root=corpus.root, store=store, models=models))
    print(f"idempotent rerun: {time.perf_counter() - t:.1f} s (no model work)")

    r = CacheReader(store)
    t = time.perf_counter()
    spk, xvec, ids = r.spk_emb(), r.xvec(), r.instruction_id()
    states, lens = r.instruction_states_padded()
    dt = time.perf_counter() - t
    print(f"reader whole-table: {len(r) / dt:12.0f} rows/s")
    ds = CacheDataset(r)
    order = np.random.default_rng(0).permutation(len(ds))
    t = time.perf_counter()
    for i in order:
        ds[int(i)]
    dt = time.perf_counter() - t
    print(f"reader Dataset random access: {len(ds) / dt:8.0f} rows/s")
    loader = ds.loader(batch_size=None, shuffle=True, num_workers=2)
    t = time.perf_counter()
    n = sum(1 for _ in loader)
    print(f"reader DataLoader (2 workers): {n / (time.perf_counter() - t):7.0f} rows/s")


if __name__ == "__main__":
    main()
