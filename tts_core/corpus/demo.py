"""Generate the embedded demo corpus: real labelled speech from espeak-ng, offline, deterministic.

Each clip is one public-domain sentence spoken by one espeak-ng voice variant with pitch, rate and loudness
levels turned into espeak parameters (plus a little seeded jitter), and an instruction that describes exactly
those attributes. Output, the contract with the cache builder (`tts_core.metadata`):

    out_dir/wavs/<clip_id>.wav   PCM_16 mono at `sample_rate`
    out_dir/metadata.txt         wavs/<clip_id>.wav|<transcript>|<instruction>|<speaker>
    out_dir/attributes.csv       levels and the espeak parameters actually used, per clip
    out_dir/corpus.json          the generating config; an equal config on a complete corpus skips the work

Why fresh worker processes: libespeak-ng carries hidden state from one utterance to the next (e.g. its
pitch-flutter phase), so a clip's samples depend on everything the process spoke before. The voices are split
into a fixed number of render groups (`RENDER_GROUPS`, not the CPU count); each group speaks its clips in clip
order in a freshly spawned process. Every file is then independent of worker count, scheduling and of anything
the calling process synthesised itself, and a smaller corpus is a byte-identical prefix of a larger one.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile as sf

from tts_core.corpus.espeak import RATE_MAX, RATE_MIN, EspeakParams, EspeakSynth, variant_gender
from tts_core.corpus.instructions import LOUDNESSES, PITCHES, RATES, VoiceAttributes, make_instruction
from tts_core.corpus.sentences import SENTENCES

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
NATIVE_SAMPLE_RATE = 22_050
DEFAULT_VOICES: tuple[str, ...] = ("en+m1", "en+m3", "en+m7", "en-us+m2", "en+f1", "en+f3", "en+f4", "en-us+f2")

# level -> (centre, +-jitter) in espeak units. Volume stays <= ~100: above it libespeak-ng saturates int16.
PITCH_PARAM = {"low": (20, 4), "mid": (50, 4), "high": (80, 4)}  # 0-100, 50 = the variant's own pitch
RATE_PARAM = {"slow": (125, 8), "normal": (175, 8), "fast": (250, 10)}  # words per minute
VOLUME_PARAM = {"quiet": (30, 3), "normal": (58, 4), "loud": (90, 4)}  # 0-200, 100 = espeak's default
RANGE_PARAM = (50, 10)  # pitch range (intonation), jittered for variety only
RENDER_GROUPS = 2  # fixed: part of what the bytes depend on (see module docstring); more = more spawn overhead
PEAK_LIMIT = 0.95  # a clip louder than this is re-spoken at a lower espeak volume: never clip

CONFIG_NAME, METADATA_NAME, ATTRIBUTES_NAME, WAV_DIR = "corpus.json", "metadata.txt", "attributes.csv", "wavs"
ATTRIBUTE_COLUMNS = ("clip_id", "path", "speaker", "gender", "pitch", "rate", "loudness", "espeak_pitch",
                     "espeak_range", "espeak_rate_wpm", "espeak_volume", "duration_s", "peak", "rms", "sentence_id")


@dataclass
class DemoCorpusConfig:
    out_dir: Path
    n_clips: int = 300
    seed: int = 0
    voices: tuple[str, ...] = DEFAULT_VOICES  # espeak "<language>+<variant>"; gender comes from the variant file
    sample_rate: int = NATIVE_SAMPLE_RATE  # written as is; the cache resamples
    workers: int | None = None  # processes; None = min(CPUs, RENDER_GROUPS). Output does not depend on it.

    def identity(self) -> dict:
        """Everything the bytes depend on (not out_dir, not workers)."""
        return {"generator_version": GENERATOR_VERSION, "espeakng_loader": version("espeakng-loader"),
                "n_clips": self.n_clips, "seed": self.seed, "voices": list(self.voices),
                "sample_rate": self.sample_rate,
                "sentences_sha256": hashlib.sha256("\n".join(SENTENCES).encode()).hexdigest()}


@dataclass(frozen=True)
class DemoCorpus:
    root: Path  # audio_root for the cache builder: metadata paths are relative to it
    metadata: Path
    attributes: Path
    config: Path
    n_clips: int
    speakers: tuple[str, ...]
    total_seconds: float
    generated: bool  # False: an identical corpus was already there and was reused


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to speak one clip; planned up front so the plan alone fixes the corpus."""

    index: int
    clip_id: str
    voice: str
    attrs: VoiceAttributes
    params: EspeakParams
    sentence_id: int
    text: str
    instruction: str
    noise_seed: int

    @property
    def rel_path(self) -> str:
        return f"{WAV_DIR}/{self.clip_id}.wav"


@dataclass(frozen=True)
class ClipResult:
    index: int
    volume: int  # espeak volume actually used (lowered only if the planned one would have clipped)
    duration_s: float
    peak: float
    rms: float


def _jitter(rng: np.random.Generator, centre_jitter: tuple[int, int]) -> int:
    centre, j = centre_jitter
    return int(centre + rng.integers(-j, j + 1))


def _balanced_levels(rng: np.random.Generator, levels: tuple[str, ...], n: int) -> list[str]:
    """Shuffled blocks of all levels: every 3 consecutive clips of a voice cover low/mid/high etc."""
    out: list[str] = []
    while len(out) < n:
        out.extend(levels[i] for i in rng.permutation(len(levels)))
    return out[:n]


def params_for(attrs: VoiceAttributes, rng: np.random.Generator) -> EspeakParams:
    """espeak parameters for the attribute levels, with a little jitter so levels are ranges, not points."""
    return EspeakParams(pitch=_jitter(rng, PITCH_PARAM[attrs.pitch]), range=_jitter(rng, RANGE_PARAM),
                        rate=min(RATE_MAX, max(RATE_MIN, _jitter(rng, RATE_PARAM[attrs.rate]))),
                        volume=_jitter(rng, VOLUME_PARAM[attrs.loudness]))


def plan_clips(cfg: DemoCorpusConfig) -> list[ClipSpec]:
    """The whole corpus as data: voices round-robin, levels balanced per voice, sentences in seeded cycles."""
    if cfg.n_clips < 1 or not cfg.voices:
        raise ValueError("need n_clips >= 1 and at least one voice")
    if len(set(cfg.voices)) != len(cfg.voices):
        raise ValueError(f"duplicate voices in {cfg.voices}")
    genders = {}
    for voice in cfg.voices:
        variant = voice.partition("+")[2]
        if not variant:
            raise ValueError(f"voice {voice!r} has no variant; use '<language>+<variant>', e.g. 'en+m3'")
        genders[voice] = variant_gender(variant)
        if genders[voice] not in ("male", "female"):
            raise ValueError(f"voice {voice!r} is {genders[voice]!r}; instructions need male or female")
    n_voices = len(cfg.voices)
    per_voice = -(-cfg.n_clips // n_voices)
    levels = {voice: [_balanced_levels(np.random.default_rng([cfg.seed, 1, v, a]), lv, per_voice)
                      for a, lv in enumerate((PITCHES, RATES, LOUDNESSES))]  # one stream each: n-independent
              for v, voice in enumerate(cfg.voices)}
    sent_rng = np.random.default_rng([cfg.seed, 2])
    order = np.concatenate([sent_rng.permutation(len(SENTENCES))
                            for _ in range(-(-cfg.n_clips // len(SENTENCES)))])
    width = max(5, len(str(cfg.n_clips - 1)))
    specs = []
    for i in range(cfg.n_clips):
        voice, k = cfg.voices[i % n_voices], i // n_voices
        pitch, rate, loud = (lv[k] for lv in levels[voice])
        attrs = VoiceAttributes(genders[voice], pitch, rate, loud)
        rng = np.random.default_rng([cfg.seed, 3, i])
        params = params_for(attrs, rng)
        sid = int(order[i])
        specs.append(ClipSpec(i, f"demo_{i:0{width}d}", voice, attrs, params, sid, SENTENCES[sid],
                              make_instruction(attrs, int(rng.integers(2**31))), int(rng.integers(2**31))))
    return specs


def render_clip(synth: EspeakSynth, spec: ClipSpec) -> tuple[np.ndarray, int]:
    """Speak one clip; returns (float32 wav at the native rate, espeak volume used). Never clips."""
    volume = spec.params.volume
    for _ in range(8):
        params = EspeakParams(spec.params.pitch, spec.params.range, spec.params.rate, volume)
        wav = synth.synth(spec.text, spec.voice, params, noise_seed=spec.noise_seed)
        if wav.size == 0:
            raise RuntimeError(f"espeak-ng produced no audio for {spec.clip_id} ({spec.voice}): {spec.text!r}")
        peak = float(np.abs(wav).max())
        if peak < PEAK_LIMIT:
            return wav, volume
        volume = max(1, int(volume * 0.9 * PEAK_LIMIT / peak))
    raise RuntimeError(f"{spec.clip_id}: still clipping at espeak volume {volume}")


def _render_group(specs: list[ClipSpec], wav_dir: str, sample_rate: int) -> list[ClipResult]:
    """Worker: one render group's clips, in clip order, in a fresh process (see module docstring)."""
    synth = EspeakSynth()
    results = []
    for spec in specs:
        wav, volume = render_clip(synth, spec)
        if sample_rate != synth.sample_rate:
            import torch
            import torchaudio.functional as AF

            wav = AF.resample(torch.from_numpy(wav), synth.sample_rate, sample_rate).numpy()
            wav = np.clip(wav, -PEAK_LIMIT, PEAK_LIMIT)
        sf.write(os.path.join(wav_dir, f"{spec.clip_id}.wav"), wav, sample_rate, subtype="PCM_16", format="WAV")
        results.append(ClipResult(spec.index, volume, round(len(wav) / sample_rate, 4),
                                  round(float(np.abs(wav).max()), 4), round(float(np.sqrt(np.mean(wav**2))), 5)))
    return results


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _is_complete(out: Path, state: dict | None, identity: dict) -> bool:
    if not state or not state.get("complete") or state.get("identity") != identity:
        return False
    meta = out / METADATA_NAME
    if not meta.is_file() or not (out / ATTRIBUTES_NAME).is_file():
        return False
    rows = [line.split("|", 1)[0] for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    return len(rows) == identity["n_clips"] and all((out / r).is_file() for r in rows)


def _corpus(out: Path, state: dict, generated: bool) -> DemoCorpus:
    s = state["summary"]
    return DemoCorpus(root=out, metadata=out / METADATA_NAME, attributes=out / ATTRIBUTES_NAME,
                      config=out / CONFIG_NAME, n_clips=s["n_clips"], speakers=tuple(s["speakers"]),
                      total_seconds=s["total_seconds"], generated=generated)


def generate_demo_corpus(cfg: DemoCorpusConfig) -> DemoCorpus:
    """Write the corpus under `cfg.out_dir`, or reuse it when an identical, complete one is already there."""
    out = Path(cfg.out_dir)
    identity = cfg.identity()
    state = _read_state(out / CONFIG_NAME)
    if _is_complete(out, state, identity):
        log.info("demo corpus in %s is up to date (same config); skipping generation", out)
        return _corpus(out, state, generated=False)

    wav_dir = out / WAV_DIR
    if state is None and wav_dir.is_dir() and any(wav_dir.iterdir()):
        raise FileExistsError(f"{wav_dir} exists but is not a demo corpus (no {CONFIG_NAME}); refusing to overwrite")
    specs = plan_clips(cfg)  # validates voices before anything is written
    wav_dir.mkdir(parents=True, exist_ok=True)
    for old in wav_dir.glob("*.wav"):  # ours (config present): stale clips from another config
        old.unlink()
    _write_json(out / CONFIG_NAME, {"identity": identity, "complete": False})

    groups: list[list[ClipSpec]] = [[] for _ in range(min(RENDER_GROUPS, len(cfg.voices)))]
    for spec in specs:
        groups[cfg.voices.index(spec.voice) % len(groups)].append(spec)
    workers = cfg.workers or min(os.cpu_count() or 1, len(groups))
    results: dict[int, ClipResult] = {}
    # fresh processes (spawn, one group each): libespeak-ng state must start clean for every group
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        futures = [ex.submit(_render_group, group, str(wav_dir), cfg.sample_rate) for group in groups]
        for fut in futures:
            results.update((r.index, r) for r in fut.result())

    meta_tmp = out / (METADATA_NAME + ".tmp")
    with meta_tmp.open("w", encoding="utf-8", newline="\n") as f:
        for s in specs:
            f.write(f"{s.rel_path}|{s.text}|{s.instruction}|{s.voice}\n")
    attr_tmp = out / (ATTRIBUTES_NAME + ".tmp")
    with attr_tmp.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(ATTRIBUTE_COLUMNS)
        for s in specs:
            r = results[s.index]
            w.writerow([s.clip_id, s.rel_path, s.voice, s.attrs.gender, s.attrs.pitch, s.attrs.rate,
                        s.attrs.loudness, s.params.pitch, s.params.range, s.params.rate, r.volume,
                        f"{r.duration_s:.4f}", f"{r.peak:.4f}", f"{r.rms:.5f}", s.sentence_id])
    meta_tmp.replace(out / METADATA_NAME)
    attr_tmp.replace(out / ATTRIBUTES_NAME)
    speakers = list(dict.fromkeys(s.voice for s in specs))
    summary = {"n_clips": len(specs), "speakers": speakers,
               "total_seconds": round(sum(r.duration_s for r in results.values()), 3)}
    state = {"identity": identity, "complete": True, "summary": summary}
    _write_json(out / CONFIG_NAME, state)
    log.info("demo corpus: %d clips, %.1f s of audio, %d voices -> %s", len(specs), summary["total_seconds"],
             len(speakers), out)
    return _corpus(out, state, generated=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate the espeak-ng demo corpus (offline, deterministic).")
    p.add_argument("--out", type=Path, default=Path("demo/corpus"))
    p.add_argument("--n-clips", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voices", default=",".join(DEFAULT_VOICES), help="comma-separated espeak voices")
    p.add_argument("--sample-rate", type=int, default=NATIVE_SAMPLE_RATE)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    cfg = DemoCorpusConfig(out_dir=a.out, n_clips=a.n_clips, seed=a.seed, sample_rate=a.sample_rate,
                           voices=tuple(v.strip() for v in a.voices.split(",") if v.strip()), workers=a.workers)
    corpus = generate_demo_corpus(cfg)
    what = "generated" if corpus.generated else "already up to date (same config), skipped generation"
    print(f"demo corpus {what}: {corpus.n_clips} clips, {corpus.total_seconds:.1f} s, "
          f"{len(corpus.speakers)} voices ({', '.join(corpus.speakers)})")
    print(f"  metadata:   {corpus.metadata}")
    print(f"  attributes: {corpus.attributes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
