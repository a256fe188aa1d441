"""Benchmark: cache-build clips/s and reader rows/s, measured in one run on this machine.

    uv run python -m bench.cache_build [--clips 192] [--device cpu|cuda]
    uv run python -m bench.cache_build --production-shapes --device cuda   # what `bench.gpu` runs

Prints clips/s of the build (model loading excluded and included), of each frozen model alone, and
rows/s of the reader three ways (whole-table arrays, random-access Dataset, DataLoader workers).

``--production-shapes`` (`frozen_throughput`): the production frozen models at their real shapes with seeded
random weights — flan-t5-large's encoder (24 layers, d 1024, gated-GELU, fp32 as the build runs it), the S3
tokenizer (S3TokenizerV2: 1280-d, 6 layers), Chatterbox's VoiceEncoder and CAM++ — through the same wrapper
classes and calls the build makes per chunk (`embed_batch`, `tokenize_batch`, `encode`), on synthetic 10 s
clips with one unique instruction each. GPU utilisation is sampled (nvidia-smi) while they run.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GOAL_CLIPS_S = 150.0
CORPUS_CLIPS = 300_000
FLAN_T5_LARGE = dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, feed_forward_proj="gated-gelu",
                     vocab_size=32128, is_encoder_decoder=False)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               vocab_size=32128, is_encoder_decoder=False)


@dataclass
class FrozenBenchConfig:
    device: str = "cpu"
    clips: int = 512
    batch: int = 64  # clips per call (the build's chunk)
    clip_s: float = 10.0
    tiny: bool = False  # dry run: small T5 / S3 widths (VoiceEncoder and CAM++ are small anyway)
    seed: int = 0


def production_models(c: FrozenBenchConfig):
    """(VoiceEncoder, CAM++, S3 tokenizer, text encoder) at production shapes, seeded random weights."""
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from tts_core.encoders.campplus import CampPlus
    from tts_core.encoders.s3_tokenizer import S3_NAME, S3SpeechTokenizer
    from tts_core.encoders.text_encoder import HFTextEncoder, embedded_model_dir
    from tts_core.encoders.voice_encoder import VoiceEncoder
    from tts_core.identity import ModelIdentity

    torch.manual_seed(c.seed)
    ident = ModelIdentity("random (bench)", "0" * 64)
    ve, xv = VoiceEncoder().eval().to(c.device), CampPlus().eval().to(c.device)
    s3cfg = ModelConfig(n_audio_state=128, n_audio_head=2, n_audio_layer=1) if c.tiny else ModelConfig()
    s3 = S3SpeechTokenizer(S3TokenizerV2(S3_NAME, config=s3cfg), ident, c.device)
    t5 = T5EncoderModel(T5Config(**(TINY_T5 if c.tiny else FLAN_T5_LARGE)))
    tok = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)  # ids < T5's vocab
    te = HFTextEncoder(t5, tok, ident, kind="t5", device=c.device)
    return ve, xv, s3, te


def _clips(c: FrozenBenchConfig) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(c.seed)
    n = int(16_000 * c.clip_s)
    t = np.arange(n) / 16_000
    wavs = [(0.1 * np.sin(2 * np.pi * rng.uniform(90, 250) * t) * (1 + np.sin(2 * np.pi * 3 * t))
             + 0.01 * rng.standard_normal(n)).astype(np.float32) for _ in range(c.clips)]
    words = ("deep", "bright", "slow", "fast", "calm", "male", "female", "voice", "quiet", "loud", "warm", "speaking")
    texts = [f"{i}: a " + " ".join(rng.choice(words, 10)) for i in range(c.clips)]
    return wavs, texts


class GpuUtilisation:
    """Samples `nvidia-smi`'s utilisation.gpu every 0.2 s in a thread; mean over the block (None: no reading)."""

    def __enter__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=2).stdout
                self.samples.append(float(out.split()[0]))
            except Exception:  # no nvidia-smi (CPU), or a parse error: no reading
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=3)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def frozen_throughput(c: FrozenBenchConfig) -> dict:
    """clips/s of each production-shaped frozen model and of all four in sequence (what a build does per clip)."""
    models = production_models(c)
    wavs, texts = _clips(c)
    calls = {"voice_encoder": lambda w, t: models[0].embed_batch(w), "campplus": lambda w, t: models[1].embed_batch(w),
             "s3_tokenizer": lambda w, t: models[2].tokenize_batch(w), "text_encoder": lambda w, t: models[3].encode(t)}
    for fn in calls.values():  # warm-up: kernels, cuDNN autotune, allocator
        fn(wavs[:min(4, c.clips)], texts[:min(4, c.clips)])
    sync = torch.cuda.synchronize if c.device.startswith("cuda") else (lambda: None)
    seconds = {}
    with GpuUtilisation() as util:
        for name, fn in calls.items():
            sync()
            t0 = time.perf_counter()
            for i in range(0, c.clips, c.batch):
                fn(wavs[i:i + c.batch], texts[i:i + c.batch])
            sync()
            seconds[name] = time.perf_counter() - t0
    total = sum(seconds.values())
    rate = c.clips / total
    return {"clips": c.clips, "clip_s": c.clip_s, "per_model_clips_s": {k: c.clips / v for k, v in seconds.items()},
            "clips_s": rate, "gpu_util_pct": util.mean, "projected_300k_s": CORPUS_CLIPS / rate,
            "goals": {f"≥ {GOAL_CLIPS_S:.0f} clips/s": rate >= GOAL_CLIPS_S}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--production-shapes", action="store_true", help="production-shaped frozen models (module doc)")
    a = ap.parse_args()
    if a.production_shapes:
        r = frozen_throughput(FrozenBenchConfig(device=a.device, clips=a.clips))
        print({k: v for k, v in r.items()})
        return

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
