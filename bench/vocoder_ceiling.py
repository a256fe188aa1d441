"""Ceilings of the instruction-following metric on the lab corpus, per attribute, one run.

    uv run python -m bench.vocoder_ceiling [--clips 240] [--voices 80] [--vocab 1024] [--out DIR]

Direction accuracy (tts_core.evaluation) of five renderings of the same calibrated lab-corpus clips:

* *ground truth*: the espeak-ng audio;
* *mel → Griffin-Lim*: each clip's own log-mel frames decoded by the mel-vq vocoder (no quantisation):
  what that vocoder alone keeps;
* *mel-vq tokens → Griffin-Lim*: the clip tokenized by the mel k-means VQ (fitted on these clips, as
  build-cache does) and decoded: the best a perfect stage-2 model can reach through `--speech-tokenizer mel-vq`;
* *WORLD features → WORLD*: the clip's own 25 Hz WORLD features (F0, coded envelope, aperiodicity; no
  quantisation) through the world-vq decoder: what its frame rate and coding keep;
* *world-vq tokens → WORLD*: the same through `--speech-tokenizer world-vq` (fitted on these clips).

Pitch is also scored with the previous measure (YIN, `librosa.yin` 50–600 Hz over frames within 30 dB of the
loudest) to show what issue #10 reported. Prints a markdown table; with ``--out``, also per-clip JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def yin_f0(wav: np.ndarray, sr: int) -> float:
    """The measure this repository used before Praat (kept here only to compare)."""
    import librosa

    f0 = librosa.yin(wav, fmin=50.0, fmax=600.0, sr=sr, frame_length=2048, hop_length=256)
    rms = librosa.feature.rms(y=wav, frame_length=2048, hop_length=256)[0][: len(f0)]
    loud = 20 * np.log10(rms + 1e-10) > 20 * np.log10(rms.max() + 1e-10) - 30.0
    f0 = f0[: len(loud)][loud & np.isfinite(f0[: len(loud)])]
    return float(np.median(f0)) if f0.size else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=240)
    ap.add_argument("--voices", type=int, default=80, help="first N voices of the lab catalogue")
    ap.add_argument("--vocab", type=int, default=1024, help="codebook size cap (build-cache's default)")
    ap.add_argument("--out", type=Path, help="keep the corpus and per-clip numbers here")
    a = ap.parse_args()

    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus
    from tts_core.corpus.voices import lab_voices
    from tts_core.encoders import embedded
    from tts_core.encoders.mel_vq import MelVQConfig, MelVQTokenizer, log_mel_frames
    from tts_core.encoders.world_vq import analyse, synthesize
    from tts_core.evaluation.directions import accuracies
    from tts_core.evaluation.measures import measure

    torch.set_num_threads(1)
    out = a.out or Path(tempfile.mkdtemp(prefix="bench-vocoder-"))
    t0 = time.time()
    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=out / "corpus", n_clips=a.clips,
                                                   voices=lab_voices()[: a.voices], calibrated=True))
    t_corpus = time.time() - t0
    import csv

    with corpus.attributes.open(encoding="utf-8", newline="") as f:
        attrs = list(csv.DictReader(f))
    texts = [line.split("|")[1] for line in corpus.metadata.read_text(encoding="utf-8").splitlines()]
    cfg = MelVQConfig()
    wavs16 = []
    for r in attrs:
        wav, sr = sf.read(corpus.root / r["path"], dtype="float32")
        wavs16.append(AF.resample(torch.from_numpy(wav), sr, cfg.sample_rate).numpy())
    t0 = time.time()
    tok = embedded.fit(embedded.MEL_VQ, wavs16, vocab_cap=a.vocab, seed=0)  # as build-cache fits them
    t_fit = time.time() - t0
    world = embedded.fit(embedded.WORLD_VQ, wavs16, seed=0)
    t_world = time.time() - t0 - t_fit
    vocab = tok.vocab_size

    rows: dict[str, list[dict]] = {k: [] for k in (
        "ground truth", "mel -> Griffin-Lim", "mel-vq tokens -> Griffin-Lim", "WORLD features -> WORLD",
        "world-vq tokens -> WORLD")}
    t0 = time.time()
    for r, wav, text in zip(attrs, wavs16, texts):
        levels = {k: r[k] for k in ("gender", "pitch", "rate", "loudness")}
        frames = log_mel_frames(wav, cfg)
        renders = {"ground truth": wav,
                   "mel -> Griffin-Lim": MelVQTokenizer(frames, cfg, len(frames)).decode(np.arange(len(frames))),
                   "mel-vq tokens -> Griffin-Lim": tok.decode(tok.tokenize_batch([wav])[0]),
                   "WORLD features -> WORLD": synthesize(analyse(wav, world.config, with_aperiodicity=True),
                                                         world.config),
                   "world-vq tokens -> WORLD": world.decode(world.tokenize_batch([wav])[0])}
        for name, x in renders.items():
            rows[name].append({**levels, **measure(x, cfg.sample_rate, text), "yin_f0_hz": yin_f0(x, cfg.sample_rate),
                               "clip_id": r["clip_id"]})
    t_measure = time.time() - t0

    print(f"lab corpus: {len(attrs)} clips, {len({r['speaker'] for r in attrs})} voices, "
          f"{corpus.total_seconds:.0f} s audio; mel-vq codebook {vocab} (fit {t_fit:.0f} s), world-vq "
          f"{world.vocab_size} codes (fit {t_world:.0f} s); corpus {t_corpus:.0f} s, "
          f"render + measure {t_measure:.0f} s\n")
    print("| rendering | pitch (Praat) | pitch (YIN, old) | rate | loudness |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rs in rows.items():
        acc = accuracies(rs)
        yin = accuracies([{**x, "f0_hz": x["yin_f0_hz"]} for x in rs])["pitch"]
        summary[name] = {**{k: v["accuracy"] for k, v in acc.items()}, "pitch_yin": yin["accuracy"],
                         "pairs": {k: v["pairs"] for k, v in acc.items()}}
        cell = {k: f"{v['accuracy']:.3f} ({v['pairs']})" for k, v in acc.items()}
        print(f"| {name} | {cell['pitch']} | {yin['accuracy']:.3f} ({yin['pairs']}) | {cell['rate']} | "
              f"{cell['loudness']} |")
    for name in list(rows)[1:]:
        ratio = [x["f0_hz"] / g["f0_hz"] for x, g in zip(rows[name], rows["ground truth"])]
        low_male = [x["f0_hz"] for x in rows[name] if x["gender"] == "male" and x["pitch"] == "low"]
        print(f"\n{name}: F0 / ground-truth F0 median {np.nanmedian(ratio):.2f}, within 20%: "
              f"{np.mean(np.abs(np.asarray(ratio) - 1) < 0.2):.2f}; low male F0 median {np.nanmedian(low_male):.0f} Hz")
    if a.out:
        (out / "vocoder_ceiling.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1,
                                                             default=float))
        print(f"\nper-clip numbers: {out / 'vocoder_ceiling.json'}")


if __name__ == "__main__":
    main()
