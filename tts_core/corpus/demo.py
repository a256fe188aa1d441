"""Generate the embedded demo corpus: real labelled speech from espeak-ng, offline, deterministic.

Each clip is one public-domain sentence spoken by one espeak-ng voice variant with pitch, rate and loudness
levels turned into espeak parameters (plus a little seeded jitter), and an instruction that describes exactly
those attributes. Output, the contract with the cache builder (`tts_core.metadata`):

    out_dir/wavs/<clip_id>.wav   PCM_16 mono at `sample_rate`
    out_dir/metadata.txt         wavs/<clip_id>.wav|<transcript>|<instruction>|<speaker>
    out_dir/attributes.csv       levels and the espeak parameters actually used, per clip
    out_dir/corpus.json          the generating config; an equal config on a complete corpus skips the work
    out_dir/calibration.json     calibrated corpora only: per espeak voice, F0 and rate at a few settings

Two kinds of corpus. The default (`make demo`): 8 voices, each level a fixed espeak setting per voice.
Calibrated (`calibrated=True`, the lab's: `lab_corpus_config`, hundreds of voices from `voices.lab_voices`):
each level is a *target* — F0 per gender (times the voice's own pitch factor), letters per second of speech,
BS.1770 loudness — reached through a per-voice calibration (`calibration.py`) and, for loudness, a gain
applied to the rendered clip; so the levels hold across voices whose espeak settings mean different things.
Either kind can write a share of its instructions in the held-out wording (`instructions.WORDINGS`).

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
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile as sf

from tts_core.corpus.calibration import CALIBRATION_VERSION, VoiceCalibration, calibrate_voices
from tts_core.corpus.espeak import RATE_MAX, RATE_MIN, EspeakParams, EspeakSynth
from tts_core.corpus.instructions import LOUDNESSES, PITCHES, RATES, VoiceAttributes, make_instruction
from tts_core.corpus.sentences import SENTENCES
from tts_core.corpus.voices import Voice, lab_voices, parse_voice

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3
NATIVE_SAMPLE_RATE = 22_050
DEFAULT_VOICES: tuple[str, ...] = ("en+m1", "en+m3", "en+m7", "en-us+m2", "en+f1", "en+f3", "en+f4", "en-us+f2")

# level -> (centre, +-jitter) in espeak units. Volume stays <= ~100: above it libespeak-ng saturates int16.
PITCH_PARAM = {"low": (20, 4), "mid": (50, 4), "high": (80, 4)}  # 0-100, 50 = the variant's own pitch
RATE_PARAM = {"slow": (125, 8), "normal": (175, 8), "fast": (250, 10)}  # words per minute
VOLUME_PARAM = {"quiet": (30, 3), "normal": (58, 4), "loud": (90, 4)}  # 0-200, 100 = espeak's default
RANGE_PARAM = (50, 10)  # pitch range (intonation), jittered for variety only
# calibrated corpora: level -> target, jittered by a factor exp(±j) (pitch, rate) or ±j dB (loudness)
PITCH_TARGET_HZ = {"male": {"low": 80.0, "mid": 105.0, "high": 140.0},
                   "female": {"low": 160.0, "mid": 210.0, "high": 280.0}}
PITCH_TARGET_JITTER = math.log(1.05)
RATE_TARGET_LPS = {"slow": 12.5, "normal": 17.0, "fast": 23.0}  # letters per second of speech (VAD)
RATE_TARGET_JITTER = math.log(1.04)
LOUDNESS_TARGET_LUFS = {"quiet": -38.0, "normal": -30.0, "loud": -22.0}  # peak-to-loudness of espeak <= ~20 dB
LOUDNESS_TARGET_JITTER = 1.5
CALIBRATED_VOLUME = 60  # espeak volume of every calibrated render; the loudness target is a gain afterwards
RENDER_GROUPS = 2  # fixed: part of what the bytes depend on (see module docstring); more = more spawn overhead
PEAK_LIMIT = 0.95  # a clip louder than this is re-spoken at a lower espeak volume: never clip

CONFIG_NAME, METADATA_NAME, ATTRIBUTES_NAME, WAV_DIR = "corpus.json", "metadata.txt", "attributes.csv", "wavs"
CALIBRATION_NAME = "calibration.json"
ATTRIBUTE_COLUMNS = ("clip_id", "path", "speaker", "gender", "pitch", "rate", "loudness", "espeak_pitch",
                     "espeak_range", "espeak_rate_wpm", "espeak_volume", "duration_s", "peak", "rms", "sentence_id",
                     "wording", "target_f0_hz", "target_lps", "target_lufs")


@dataclass
class DemoCorpusConfig:
    out_dir: Path
    n_clips: int = 300
    seed: int = 0
    voices: tuple[str, ...] = DEFAULT_VOICES  # voice ids (`voices.parse_voice`); gender comes from the variant
    sample_rate: int = NATIVE_SAMPLE_RATE  # written as is; the cache resamples
    workers: int | None = None  # processes; None = min(CPUs, RENDER_GROUPS). Output does not depend on it.
    calibrated: bool = False  # levels as calibrated targets (module docstring); needed for '@' pitch factors
    held_out_wording: float = 0.0  # share of clips whose instruction uses the held-out wording

    def identity(self) -> dict:
        """Everything the bytes depend on (not out_dir, not workers)."""
        return {"generator_version": GENERATOR_VERSION, "espeakng_loader": version("espeakng-loader"),
                "n_clips": self.n_clips, "seed": self.seed, "voices": list(self.voices),
                "sample_rate": self.sample_rate, "calibrated": self.calibrated,
                "held_out_wording": self.held_out_wording,
                "sentences_sha256": hashlib.sha256("\n".join(SENTENCES).encode()).hexdigest()}


CLIPS_PER_LAB_VOICE = 6  # enough clips per voice to cover each level twice, so a held-out voice is a fair test


def lab_corpus_config(out_dir: Path, n_clips: int = 4000, seed: int = 0, held_out_wording: float = 0.1,
                      **kwargs) -> DemoCorpusConfig:
    """The instruction-following lab's corpus: calibrated levels, a tenth of the instructions in held-out
    wording, and the first n_clips / 6 voices of the catalogue (`voices.lab_voices`, 640: all of them from
    3840 clips on), so a small lab run calibrates only the voices it speaks with."""
    catalogue = lab_voices()
    voices = kwargs.pop("voices", catalogue[: max(1, min(len(catalogue), n_clips // CLIPS_PER_LAB_VOICE))])
    return DemoCorpusConfig(out_dir=out_dir, n_clips=n_clips, seed=seed, voices=voices, calibrated=True,
                            held_out_wording=held_out_wording, **kwargs)


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
    espeak_voice: str  # `voice` without its pitch factor: what libespeak-ng is given
    wording: str = "train"
    target_f0_hz: float | None = None  # calibrated corpora: the targets the settings were chosen for
    target_lps: float | None = None
    target_lufs: float | None = None  # the rendered clip is scaled to this loudness

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


def _log_jitter(rng: np.random.Generator, centre: float, j: float) -> float:
    return float(centre * math.exp(rng.uniform(-j, j)))


def calibrated_params(attrs: VoiceAttributes, voice: Voice, cal: VoiceCalibration,
                      rng: np.random.Generator) -> tuple[EspeakParams, float, float, float]:
    """(espeak parameters, target F0, target letters/s, target LUFS) for the levels, via the voice's calibration."""
    f0 = _log_jitter(rng, PITCH_TARGET_HZ[attrs.gender][attrs.pitch] * (voice.pitch_factor or 1.0),
                     PITCH_TARGET_JITTER)
    lps = _log_jitter(rng, RATE_TARGET_LPS[attrs.rate], RATE_TARGET_JITTER)
    lufs = float(LOUDNESS_TARGET_LUFS[attrs.loudness] + rng.uniform(-LOUDNESS_TARGET_JITTER, LOUDNESS_TARGET_JITTER))
    params = EspeakParams(pitch=cal.pitch_for(f0), range=_jitter(rng, RANGE_PARAM), rate=cal.rate_for(lps),
                          volume=CALIBRATED_VOLUME)
    return params, round(f0, 2), round(lps, 3), round(lufs, 2)


def plan_clips(cfg: DemoCorpusConfig, calibration: dict[str, VoiceCalibration] | None = None) -> list[ClipSpec]:
    """The whole corpus as data: voices round-robin, levels balanced per voice, sentences in seeded cycles.
    A calibrated config needs `calibration` (espeak voice -> `VoiceCalibration`, see `load_or_calibrate`)."""
    if cfg.n_clips < 1 or not cfg.voices:
        raise ValueError("need n_clips >= 1 and at least one voice")
    if len(set(cfg.voices)) != len(cfg.voices):
        raise ValueError(f"duplicate voices in {cfg.voices}")
    if not 0.0 <= cfg.held_out_wording <= 1.0:
        raise ValueError(f"held_out_wording={cfg.held_out_wording}: a share, 0-1")
    voices = {v: parse_voice(v) for v in cfg.voices}
    if not cfg.calibrated and any(v.pitch_factor is not None for v in voices.values()):
        raise ValueError("voice ids with an '@<pitch factor>' need a calibrated corpus (calibrated=True)")
    if cfg.calibrated:
        missing = sorted({v.espeak for v in voices.values()} - set(calibration or {}))
        if missing:
            raise ValueError(f"calibrated corpus: no calibration for {missing[:3]} ({len(missing)} voices)")
    genders = {k: v.gender for k, v in voices.items()}
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
        targets: tuple = (None, None, None)
        if cfg.calibrated:
            params, *targets = calibrated_params(attrs, voices[voice], calibration[voices[voice].espeak], rng)
        else:
            params = params_for(attrs, rng)
        wording = "held_out" if np.random.default_rng([cfg.seed, 4, i]).random() < cfg.held_out_wording else "train"
        sid = int(order[i])
        specs.append(ClipSpec(i, f"demo_{i:0{width}d}", voice, attrs, params, sid, SENTENCES[sid],
                              make_instruction(attrs, int(rng.integers(2**31)), wording), int(rng.integers(2**31)),
                              voices[voice].espeak, wording, *targets))
    return specs


def render_clip(synth: EspeakSynth, spec: ClipSpec) -> tuple[np.ndarray, int]:
    """Speak one clip; returns (float32 wav at the native rate, espeak volume used). Never clips."""
    volume = spec.params.volume
    for _ in range(8):
        params = EspeakParams(spec.params.pitch, spec.params.range, spec.params.rate, volume)
        wav = synth.synth(spec.text, spec.espeak_voice, params, noise_seed=spec.noise_seed)
        if wav.size == 0:
            raise RuntimeError(f"espeak-ng produced no audio for {spec.clip_id} ({spec.voice}): {spec.text!r}")
        peak = float(np.abs(wav).max())
        if peak < PEAK_LIMIT:
            return wav, volume
        volume = max(1, int(volume * 0.9 * PEAK_LIMIT / peak))
    raise RuntimeError(f"{spec.clip_id}: still clipping at espeak volume {volume}")


def _render_group(specs: list[ClipSpec], wav_dir: str, sample_rate: int) -> list[ClipResult]:
    """Worker: one render group's clips, in clip order, in a fresh process (see module docstring). One torch
    thread: the groups already fill the cores, and torch's own threads beside them made the loudness scaling
    (BS.1770) five times slower than the speech itself."""
    import torch

    torch.set_num_threads(1)
    synth = EspeakSynth()
    results = []
    for spec in specs:
        wav, volume = render_clip(synth, spec)
        if sample_rate != synth.sample_rate:
            import torchaudio.functional as AF

            wav = AF.resample(torch.from_numpy(wav), synth.sample_rate, sample_rate).numpy()
            wav = np.clip(wav, -PEAK_LIMIT, PEAK_LIMIT)
        if spec.target_lufs is not None:
            wav = to_loudness(wav, sample_rate, spec.target_lufs)
        sf.write(os.path.join(wav_dir, f"{spec.clip_id}.wav"), wav, sample_rate, subtype="PCM_16", format="WAV")
        results.append(ClipResult(spec.index, volume, round(len(wav) / sample_rate, 4),
                                  round(float(np.abs(wav).max()), 4), round(float(np.sqrt(np.mean(wav**2))), 5)))
    return results


def to_loudness(wav: np.ndarray, sr: int, target_lufs: float) -> np.ndarray:
    """Scale to `target_lufs` (BS.1770); if that would peak above `PEAK_LIMIT`, only up to the limit."""
    from tts_core.evaluation.measures import loudness_lufs

    wav = wav * np.float32(10 ** ((target_lufs - loudness_lufs(wav, sr)) / 20))
    peak = float(np.abs(wav).max())
    return (wav * np.float32(PEAK_LIMIT / peak) if peak > PEAK_LIMIT else wav).astype(np.float32)


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


def load_or_calibrate(cfg: DemoCorpusConfig, out: Path) -> dict[str, VoiceCalibration] | None:
    """The calibration of a calibrated config's espeak voices: from `out`/calibration.json when it was made
    for the same voices and espeak-ng, else measured now (`calibration.py`) and saved there. None: uncalibrated."""
    if not cfg.calibrated:
        return None
    espeak_voices = list(dict.fromkeys(parse_voice(v).espeak for v in cfg.voices))  # validates every id
    key = {"calibration_version": CALIBRATION_VERSION, "espeakng_loader": version("espeakng-loader"),
           "voices": espeak_voices}
    saved = _read_state(out / CALIBRATION_NAME)
    if not saved or saved.get("identity") != key:
        log.info("calibrating %d espeak voices (pitch and rate settings -> F0 and letters/s)", len(espeak_voices))
        groups = min(RENDER_GROUPS, len(espeak_voices))
        cal = calibrate_voices(espeak_voices, groups, cfg.workers or min(os.cpu_count() or 1, groups))
        out.mkdir(parents=True, exist_ok=True)
        saved = {"identity": key, "voices": {v: asdict(c) for v, c in cal.items()}}
        _write_json(out / CALIBRATION_NAME, saved)
    return {v: VoiceCalibration.from_dict(d) for v, d in saved["voices"].items()}


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
    specs = plan_clips(cfg, load_or_calibrate(cfg, out))  # validates voices before any clip is written
    wav_dir.mkdir(parents=True, exist_ok=True)
    for old in wav_dir.glob("*.wav"):  # ours (config present): stale clips from another config
        old.unlink()
    _write_json(out / CONFIG_NAME, {"identity": identity, "complete": False})

    groups: list[list[ClipSpec]] = [[] for _ in range(min(RENDER_GROUPS, len(cfg.voices)))]
    voice_index = {v: k for k, v in enumerate(cfg.voices)}
    for spec in specs:
        groups[voice_index[spec.voice] % len(groups)].append(spec)
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
                        f"{r.duration_s:.4f}", f"{r.peak:.4f}", f"{r.rms:.5f}", s.sentence_id, s.wording,
                        *("" if t is None else t for t in (s.target_f0_hz, s.target_lps, s.target_lufs))])
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
    p.add_argument("--n-clips", type=int, default=None, help="default 300 (--lab: 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voices", default=None, help="comma-separated voice ids (default: the demo's 8)")
    p.add_argument("--lab", action="store_true",
                   help="the lab corpus: every catalogue voice, calibrated levels, 10%% held-out wording")
    p.add_argument("--held-out-wording", type=float, default=None, help="share of held-out-wording instructions")
    p.add_argument("--sample-rate", type=int, default=NATIVE_SAMPLE_RATE)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    extra = {} if a.voices is None else {"voices": tuple(v.strip() for v in a.voices.split(",") if v.strip())}
    if a.held_out_wording is not None:
        extra["held_out_wording"] = a.held_out_wording
    common = dict(out_dir=a.out, seed=a.seed, sample_rate=a.sample_rate, workers=a.workers, **extra)
    try:
        cfg = (lab_corpus_config(n_clips=a.n_clips or 4000, **common) if a.lab
               else DemoCorpusConfig(n_clips=a.n_clips or 300, **common))
        corpus = generate_demo_corpus(cfg)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}")
        return 2
    what = "generated" if corpus.generated else "already up to date (same config), skipped generation"
    shown = ", ".join(corpus.speakers[:8]) + (", ..." if len(corpus.speakers) > 8 else "")
    print(f"demo corpus {what}: {corpus.n_clips} clips, {corpus.total_seconds:.1f} s, "
          f"{len(corpus.speakers)} voices ({shown})")
    print(f"  metadata:   {corpus.metadata}")
    print(f"  attributes: {corpus.attributes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
