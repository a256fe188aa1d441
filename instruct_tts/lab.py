"""`instruct-tts lab`: does training make the model follow instructions? One command, one report.

lab corpus (espeak-ng, calibrated levels, hundreds of voices) → split (held-out voices, held-out instructions incl.
every held-out-wording clip; `evaluation.lab_split`) → two caches: ``train.zarr`` (the training clips only) and
``all.zarr`` (a copy of it grown by the held-out clips: same rows, same tokenizer, one codebook) → stage 1 and
stage 2 on ``train.zarr`` → on held-out clips: stage-1 cosines vs mean/oracle, stage-2 held-out speech loss per
checkpoint, and direction accuracies of ground-truth audio, ground-truth tokens through the vocoder, and the model →
``report.md``, ``report.json``, ``measurements.json`` and plots in ``--out``.

Each stage is the stage's own library call (the lab is orchestration + report); every step resumes or is reused,
so rerunning the command redoes only what is missing (the evaluation is always recomputed).

Held-out speech loss is computed here, after training, from the kept checkpoints (teacher-forced, dropout off):
nothing held out is in the training store, so stage 2 needs no hold-out option, and training and held-out rows are
scored the same way.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from tts_core.recipe import INSTRUCTION_DROPOUT, MAPPER_DRAWS, MAPPER_TEMPERATURE, PROMPT_INSTRUCTION_PROB

PRESETS = {
    # CI: the whole pipeline in a couple of minutes on 2 cores (tests/test_lab.py)
    "tiny": dict(t3="tiny", n_clips=96, stage1_steps=20, stage1_batch_size=32, stage2_steps=12, curve_points=2, eval_clips=12,
                 loss_clips=12, max_new_tokens=40, n_boot=200,
                 mapper_draws=1, mapper_temperature=0.3,  # one draw at T 0.3: what its 20-step mapper was checked with
                 instruction_guidance=0.0, repetition_sweep=(1.0, 1.2), guidance_sweep=(0.0, 2.0),
                 sweep_clips=4),
    # a check that the lab works, ~10 minutes on 2 cores
    "medium": dict(n_clips=1200, stage1_steps=1000, stage2_steps=800, curve_points=4, eval_clips=60, loss_clips=60,
                   max_new_tokens=150),
    # the lab: issue #10's run, sized for <= 60 minutes on 2 cores (docs/benchmarks.md has the measured wall time)
    "default": dict(),
}


@dataclass
class LabConfig:
    out: Path = Path("lab")
    n_clips: int = 4000  # lab corpus size (6 clips per voice: 640 voices from 3840 clips on)
    seed: int = 0
    device: str = "cpu"
    held_out_wording: float = 0.1  # share of instructions in the held-out wording (all of them are held out)
    held_out_voice_frac: float = 0.1  # share of espeak voices held out (with both pitch-factor twins)
    held_out_instruction_frac: float = 0.05  # share of training-wording instruction texts held out
    # training-wording captions per *training* clip (its own + more, `corpus.instructions.paraphrases`): more
    # metadata lines of one audio file, encoded once (tts_core.captions). 1 = one caption per clip, the run to
    # compare against (same clips, same steps: `--compare-to`)
    captions_per_clip: int = 3
    compare_to: str | None = None  # another lab run's directory: the report puts its held-out results beside these
    speech_tokenizer: str = "world-vq"  # FrozenModelsConfig.speech_tokenizer: the one whose tokens keep F0
    # a local HF encoder directory (flan-t5-large in production); None: the embedded MiniLM. The report's
    # instruction-embedding probe says how much of the unseen wording a text encoder carries (docs/lab.md).
    text_encoder: str | None = None

    # stage 1 (mapper)
    stage1_steps: int = 3000  # both phases together; each phase also early-stops on its held-out AvgCos
    stage1_batch_size: int = 64
    mapper_hidden_dim: int = 256
    mapper_blocks: int = 4
    # what stage 2 and synthesis get from the mapper (MapperConfig.draws / .temperature, recorded in mapper.json):
    # the recipe measured on the stage-1 sampling curve (tts_core.recipe: the mean of 64 draws at T 0.8)
    mapper_draws: int = MAPPER_DRAWS
    mapper_temperature: float = MAPPER_TEMPERATURE
    # stage 2 (T3)
    t3: str = "small"  # T3 preset (tts_core.t3.config.PRESET_SHAPES); "small" beat "tiny" (docs/benchmarks.md)
    stage2_steps: int = 3000
    stage2_batch_size: int = 16
    stage2_lr: float = 2e-3
    curve_points: int = 6  # checkpoints kept (and scored for held-out speech loss) along stage 2
    # evaluation
    eval_clips: int = 150  # per held-out split: clips synthesized by the model and rendered from tokens
    loss_clips: int = 150  # per split (and training): clips scored for teacher-forced speech loss
    max_new_tokens: int = 200  # 8 s at 25 tokens/s
    n_boot: int = 1000
    # sampling of every model rendering: None = the T3 family's official value (repetition penalty 1.2: the sweep
    # below found no value better on every attribute, docs/benchmarks.md "Lab"); instruction guidance None = the
    # run's default (`tts_core.sampling_defaults.default_instruction_guidance`: W 3 with stage 2's null instruction)
    repetition_penalty: float | None = None
    instruction_guidance: float | None = None
    # sampling sweeps (report sections "accuracy vs ..."): the model re-rendered on the first ``sweep_clips`` evaluation
    # clips of each held-out split at each value, everything else as above; () = not run
    repetition_sweep: tuple[float, ...] = (1.0, 1.1, 1.2)
    guidance_sweep: tuple[float, ...] = (0.0, 1.5, 3.0)  # instruction guidance W
    sweep_clips: int = 40
    # stage-2 row mix (Stage2Config's defaults, i.e. the recipe, tts_core.recipe; None = Stage2Config's). A fifth of
    # the rows are prompt + instruction, so the "reference clip + instruction" path is trained; the rest keep the
    # cards' 50/50 instruction-only / audio-only; a tenth of instruction rows get the null instruction.
    instruction_dropout: float | None = INSTRUCTION_DROPOUT
    prompt_instruction_prob: float | None = PROMPT_INSTRUCTION_PROB

    @classmethod
    def preset(cls, name: str, **overrides) -> "LabConfig":
        if name not in PRESETS:
            raise ValueError(f"lab preset {name!r}: one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        return cls(**{**PRESETS[name], **{k: v for k, v in overrides.items() if k in known and v is not None}})

    def stage1_train(self) -> dict:
        n = self.stage1_steps
        return dict(batch_size=self.stage1_batch_size, lr_phase1=3e-3, lr_phase2=7.5e-4, epochs=100_000,
                    min_phase_steps=n // 2, max_steps=n, eval_every=max(10, n // 20), patience=4, held_out_frac=0.1,
                    warmup_steps=min(50, n // 5), device=self.device, seed=self.seed)

    def stage2_train(self) -> dict:
        n = self.stage2_steps
        every = max(1, -(-n // max(self.curve_points, 1)))  # ceil: the last point is the final step
        mix = {k: getattr(self, k) for k in ("instruction_dropout", "prompt_instruction_prob")
               if getattr(self, k) is not None}
        return dict(batch_size=self.stage2_batch_size, lr=self.stage2_lr, warmup_steps=min(30, n // 5),
                    epochs=100_000, max_steps=n, log_every=max(1, n // 50), save_every=every,
                    keep_checkpoints=self.curve_points + 1, device=self.device, seed=self.seed, **mix)

    def sampling(self, **overrides):
        """The `SamplingConfig` of the lab's model renderings (``overrides``: a sweep's value)."""
        from tts_core.sampling_defaults import default_instruction_guidance
        from tts_core.stage2 import Stage2Config
        from tts_core.synthesis import SamplingConfig
        from tts_core.t3.config import T3Config

        w = self.instruction_guidance
        if w is None:  # what `Synthesizer.guidance` gives this run: resolved here so the report names the W used
            w = default_instruction_guidance(Stage2Config.from_dict(self.stage2_train()).run_record(),
                                             T3Config.preset(self.t3).family)
        return SamplingConfig(**{"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                                 "instruction_guidance": w, **overrides})


def frozen_models(cfg: LabConfig):
    """The frozen models the lab's caches are built with: the embedded defaults, with ``speech_tokenizer``
    choosing the tokenizer + vocoder (world-vq: its tokens carry F0 and level, docs/lab.md) and ``text_encoder``
    the instruction encoder."""
    from tts_core.frozen import FrozenModelsConfig

    return FrozenModelsConfig(device=cfg.device, speech_tokenizer=cfg.speech_tokenizer,
                              text_encoder=Path(cfg.text_encoder) if cfg.text_encoder else None)


@dataclass
class LabPaths:
    out: Path

    @property
    def corpus(self) -> Path: return self.out / "corpus"
    @property
    def split(self) -> Path: return self.out / "split"
    @property
    def train_store(self) -> str: return str(self.out / "cache" / "train.zarr")
    @property
    def all_store(self) -> str: return str(self.out / "cache" / "all.zarr")
    @property
    def mapper(self) -> Path: return self.out / "runs" / "mapper"
    @property
    def t3(self) -> Path: return self.out / "runs" / "t3"


def run_lab(cfg: LabConfig, say: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole lab; returns the report dict (also written to ``out/report.json``)."""
    from tts_core.corpus.demo import generate_demo_corpus, lab_corpus_config
    from tts_core.sampling_defaults import trained_null_instruction
    from tts_core.stage2 import Stage2Config

    p = LabPaths(Path(cfg.out))
    t_start, seconds = time.time(), {}
    guided = max((cfg.sampling().instruction_guidance or 0.0, *cfg.guidance_sweep), default=0.0)
    if guided > 0 and not trained_null_instruction(Stage2Config.from_dict(cfg.stage2_train()).run_record()):
        # found now, not after the training it would waste
        raise ValueError(f"instruction guidance W = {guided:g} needs stage 2's null instruction, but "
                         "--instruction-dropout is 0: pass --instruction-guidance 0 --guidance-sweep '' as well")

    def step(name: str, k: int, what: str):
        say(f"[{k}/6] {what}")
        seconds[name] = time.time()

    def done(name: str) -> None:
        seconds[name] = time.time() - seconds[name]

    step("corpus", 1, f"lab corpus: {cfg.n_clips} clips -> {p.corpus}")
    corpus = generate_demo_corpus(lab_corpus_config(p.corpus, n_clips=cfg.n_clips, seed=cfg.seed,
                                                    held_out_wording=cfg.held_out_wording))
    clips = _corpus_clips(corpus)
    roles = _write_split(cfg, clips, p.split)
    done("corpus")

    step("caches", 2, f"build-cache: training clips -> {p.train_store}, + held-out clips -> {p.all_store}")
    _build_caches(cfg, corpus.root, p, say)
    done("caches")

    step("stage1", 3, f"train-stage1 ({cfg.stage1_steps} steps max) -> {p.mapper}")
    from tts_core.mapper.flow import MapperConfig
    from tts_core.stage1.from_store import train_stage1_from_store
    from tts_core.stage1.train import Stage1TrainConfig

    train_stage1_from_store(p.train_store, Stage1TrainConfig(**cfg.stage1_train(), out_dir=str(p.mapper)),
                            MapperConfig(hidden_dim=cfg.mapper_hidden_dim, n_blocks=cfg.mapper_blocks,
                                         draws=cfg.mapper_draws, temperature=cfg.mapper_temperature))
    done("stage1")

    step("stage2", 4, f"train-stage2 ({cfg.t3} T3, {cfg.stage2_steps} steps) -> {p.t3}")
    from tts_core.stage2.train import Stage2Config, train_stage2

    train_stage2(Stage2Config.from_dict({**cfg.stage2_train(), "store": p.train_store, "mapper_dir": str(p.mapper),
                                         "t3": cfg.t3, "out_dir": str(p.t3)}))
    done("stage2")

    step("evaluate", 5, f"evaluate held-out clips ({cfg.eval_clips} per split synthesized)")
    by_id = {c["cache_id"]: c for c in clips}
    held = {split: [c for c, r in roles.items() if r == split] for split in _held_out_splits()}
    stage1 = _stage1_cosines(p, clips, roles, held)
    curve, train_log = _stage2_curve(cfg, p, roles, held)
    renderings, measured = _renderings(cfg, p, corpus.root, by_id, held, say)
    probe = _instruction_probe(cfg, p, by_id, roles, renderings)
    sweeps = _sweeps(cfg, p, by_id, renderings, say)
    measured += [{"split": split, "rendering": f"model, {opt} = {v:g}", "speaker": by_id[r["clip_id"]]["speaker"], **r}
                 for opt, by_value in sweeps.items() for v, by_split in by_value.items()
                 for split, rows in by_split.items() for r in rows]
    done("evaluate")

    step("report", 6, f"report -> {p.out / 'report.md'}")
    report = _report(cfg, corpus, clips, roles, stage1, curve, train_log, renderings, probe, seconds,
                     time.time() - t_start, sweeps)
    (p.out / "measurements.json").write_text(json.dumps(measured, indent=1, default=_json))
    say(f"lab done in {report['wall_s'] / 60:.1f} min: {p.out / 'report.md'}")
    return report


# ---- steps ------------------------------------------------------------------------------------------------------
def _held_out_splits() -> tuple[str, ...]:
    from tts_core.evaluation.lab_split import HELD_OUT

    return HELD_OUT


def _corpus_clips(corpus) -> list[dict]:
    """attributes.csv rows joined with their metadata line (transcript, instruction)."""
    with corpus.attributes.open(encoding="utf-8", newline="") as f:
        attrs = list(csv.DictReader(f))
    lines = [ln for ln in corpus.metadata.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = []
    for a, line in zip(attrs, lines, strict=True):
        path, text, instruction, speaker = line.split("|")
        out.append({**a, "line": line, "transcript": text, "instruction": instruction,
                    "cache_id": str(PurePosixPath(path).with_suffix(""))})  # the store's clip_id (tts_core.metadata)
    return out


def _write_split(cfg: LabConfig, clips: list[dict], out: Path) -> dict[str, str]:
    from tts_core.atomic_files import atomic_write_text
    from tts_core.evaluation.lab_split import HELD_OUT, TRAIN, split_lab_clips

    roles = split_lab_clips([c["speaker"] for c in clips], [c["wording"] for c in clips],
                            [c["instruction"] for c in clips], cfg.held_out_voice_frac, cfg.held_out_instruction_frac)
    out.mkdir(parents=True, exist_ok=True)
    train = [c["line"] for c, r in zip(clips, roles) if r == TRAIN]
    held = [c["line"] for c, r in zip(clips, roles) if r in HELD_OUT]
    train += _extra_captions(cfg, clips, roles)
    # train lines first: all.zarr is train.zarr grown by the held-out lines (one tokenizer, identical train rows)
    atomic_write_text(out / "train.txt", "\n".join(train) + "\n")
    atomic_write_text(out / "all.txt", "\n".join(train + held) + "\n")
    atomic_write_text(out / "roles.csv", "clip_id,role\n" + "".join(f"{c['clip_id']},{r}\n"
                                                                   for c, r in zip(clips, roles)))
    return {c["cache_id"]: r for c, r in zip(clips, roles)}


def _extra_captions(cfg: LabConfig, clips: list[dict], roles: list[str]) -> list[str]:
    """``captions_per_clip − 1`` more training-wording lines per training clip (same audio, transcript and
    speaker), after all clip lines so the clips' rows are the one-caption run's. No held-out text (normalised)
    is ever a caption, so the split stays clean."""
    from tts_core.corpus.instructions import VoiceAttributes, paraphrases
    from tts_core.evaluation.lab_split import HELD_OUT, TRAIN
    from tts_core.seeds import mix_seed
    from tts_core.stage1.data import normalise_instruction

    if cfg.captions_per_clip <= 1:
        return []
    held = {normalise_instruction(c["instruction"]) for c, r in zip(clips, roles) if r in HELD_OUT}
    out = []
    for c, r in zip(clips, roles):
        if r != TRAIN:
            continue
        attrs = VoiceAttributes(c["gender"], c["pitch"], c["rate"], c["loudness"])
        path, text, own, speaker = c["line"].split("|")
        for t in paraphrases(attrs, mix_seed(cfg.seed, c["clip_id"]), cfg.captions_per_clip - 1,
                             exclude=lambda t: t == own or normalise_instruction(t) in held):
            out.append(f"{path}|{text}|{t}|{speaker}")
    return out


def _build_caches(cfg: LabConfig, root: Path, p: LabPaths, say) -> None:
    from tts_core.cachebuild.build import BuildConfig, build_cache
    from cache.reader import CacheReader
    from cache.store import StoreError

    models = frozen_models(cfg)
    for line in build_cache(BuildConfig(metadata=p.split / "train.txt", audio_root=root, store=p.train_store,
                                        models=models)).lines():
        say("  " + line)
    if not Path(p.all_store).exists():  # grow a copy of the training store: same tokenizer, no re-encoding
        shutil.copytree(p.train_store, p.all_store + ".tmp", dirs_exist_ok=True)
        Path(p.all_store + ".tmp").rename(p.all_store)
    for line in build_cache(BuildConfig(metadata=p.split / "all.txt", audio_root=root, store=p.all_store,
                                        models=models)).lines():
        say("  " + line)
    a, t = CacheReader(p.all_store).identities, CacheReader(p.train_store).identities
    if {k: v.to_dict() for k, v in a.items()} != {k: v.to_dict() for k, v in t.items()}:
        raise StoreError(f"{p.all_store} and {p.train_store} were encoded by different models; delete "
                         f"{p.all_store} and rerun")


def _stage1_cosines(p: LabPaths, clips: list[dict], roles: dict, held: dict) -> dict:
    from tts_core.evaluation.lab import SAMPLING_CURVE, stage1_cosines
    from tts_core.evaluation.lab_split import TRAIN, espeak_variant
    from tts_core.stage1.artifacts import load_stage1_model
    from tts_core.stage1.from_store import load_stage1_data

    data = load_stage1_data(p.all_store)
    model, _ = load_stage1_model(p.mapper, text_encoder_identity=data.text_encoder_identity)
    by_id = {c["cache_id"]: c for c in clips}
    keys = [f"{by_id[c]['gender']}/{by_id[c]['pitch']}" for c in data.clip_ids]
    timbre = [espeak_variant(by_id[c]["speaker"]) for c in data.clip_ids]
    row_roles = np.asarray([roles.get(c, "") for c in data.clip_ids])
    train_rows = np.flatnonzero(row_roles == TRAIN)
    return {split: stage1_cosines(data, model, train_rows, np.flatnonzero(row_roles == split), keys,
                                  timbre_keys=timbre, curve=SAMPLING_CURVE)
            for split in held if (row_roles == split).any()}


def _sample(ids: list[str], k: int, seed: int) -> list[str]:
    if len(ids) <= k:
        return list(ids)
    idx = np.sort(np.random.default_rng(seed).choice(len(ids), k, replace=False))
    return [ids[i] for i in idx]


def _stage2_curve(cfg: LabConfig, p: LabPaths, roles: dict, held: dict) -> tuple[list[dict], list[dict]]:
    from tts_core.evaluation.lab import SpeechLossProbe
    from tts_core.evaluation.lab_split import TRAIN

    probe = SpeechLossProbe(p.all_store, p.mapper, p.t3)
    sets = {split: probe.rows(_sample(ids, cfg.loss_clips, cfg.seed)) for split, ids in held.items()}
    sets["train_rows"] = probe.rows(_sample([c for c, r in roles.items() if r == TRAIN], cfg.loss_clips, cfg.seed))
    train_log = [json.loads(ln) for ln in (p.t3 / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    ckpts = sorted((p.t3 / "checkpoints").glob("step_*"), key=lambda d: int(d.name.split("_")[1]))
    curve = []
    for ck in ckpts:
        step = int(ck.name.split("_")[1])
        point = {"step": step, **{k: probe.loss(ck, rows) for k, rows in sets.items() if len(rows)}}
        logged = [h for h in train_log if h["step"] <= step]
        point["train_loop_speech"] = logged[-1]["loss_speech"] if logged else None
        curve.append(point)
    return curve, train_log


def _renderings(cfg: LabConfig, p: LabPaths, root: Path, by_id: dict, held: dict, say) -> tuple[dict, dict]:
    """{split: {rendering: attribute rows}} on up to ``eval_clips`` held-out clips per split, and per-clip records.
    Held-out voices also get the model conditioned on a reference clip of the voice (another clip of the same
    speaker) *and* the instruction: does the instruction still steer a voice the model is told to clone?"""
    import soundfile as sf

    from cache.reader import CacheReader
    from tts_core.evaluation.directions import ATTRIBUTES
    from tts_core.evaluation.lab import asked_levels, attribute_row
    from tts_core.evaluation.lab_split import HELD_OUT_VOICE
    from tts_core.synthesis import SamplingConfig, Synthesizer

    from tts_core.evaluation.lab_report import WITH_REFERENCE
    from tts_core.reference import Reference

    synth = Synthesizer.from_run(p.t3, device=cfg.device, text_encoder=cfg.text_encoder)
    by_speaker: dict[str, list[str]] = {}
    for cid in held.get(HELD_OUT_VOICE, []):
        by_speaker.setdefault(by_id[cid]["speaker"], []).append(cid)
    reader = CacheReader(p.all_store)
    ok_row = {c: i for i, c in enumerate(reader.ok_manifest["clip_id"].astype(str))}
    sampling = cfg.sampling()
    out, records = {}, []
    for split, ids in held.items():
        usable = [c for c in ids if c in ok_row and any(asked_levels(by_id[c]["instruction"]).get(a) in (lo, hi)
                                                        for a, (_, lo, hi) in ATTRIBUTES.items())]
        chosen = _sample(usable, cfg.eval_clips, cfg.seed)
        rows: dict[str, list[dict]] = {"ground truth audio": [], "ground-truth tokens -> vocoder": [], "model": []}
        if split == HELD_OUT_VOICE:
            rows[WITH_REFERENCE] = []
        for k, cid in enumerate(chosen):
            c = by_id[cid]
            levels, text = asked_levels(c["instruction"]), c["transcript"]
            wav, sr = sf.read(str(root / c["path"]), dtype="float32")
            r = ok_row[cid]
            xv = reader.xvec([r])[0]
            gt_tok = synth.vocoder.decode(reader.speech_tokens(r), x_vector=xv)
            res = synth.synthesize(text, instruction=c["instruction"], seed=cfg.seed + k, sampling=sampling)
            renders = {"ground truth audio": (wav, sr),
                       "ground-truth tokens -> vocoder": (gt_tok, synth.vocoder.sample_rate),
                       "model": (res.wav, res.sample_rate)}
            voice_kept = {}
            if split == HELD_OUT_VOICE:  # the same voice's other clip as the reference, plus the instruction
                others = [o for o in by_speaker[c["speaker"]] if o != cid] or [cid]
                ref = Reference.load(root / by_id[others[k % len(others)]]["path"])
                r2 = synth.synthesize(text, instruction=c["instruction"], reference=ref, seed=cfg.seed + k,
                                      sampling=sampling)
                renders[WITH_REFERENCE] = (r2.wav, r2.sample_rate)
                voice_kept = _reference_cosines(synth, ref, renders)
            for name, (w, s) in renders.items():
                row = {**attribute_row(w, s, text, levels), "wording": c["wording"], "instruction": c["instruction"],
                       "clip_id": cid, "seed": cfg.seed + k}
                if name in voice_kept:
                    row["ref_spk_cos"] = voice_kept[name]
                rows[name].append(row)
                records.append({"split": split, "rendering": name, "clip_id": cid, "speaker": c["speaker"], **row})
            if (k + 1) % 10 == 0 or k + 1 == len(chosen):
                say(f"  {split}: {k + 1}/{len(chosen)} clips rendered and measured")
        out[split] = rows
    return out, records


def _reference_cosines(synth, ref, renders: dict) -> dict[str, float]:
    """{rendering: VoiceEncoder cosine of its audio to the reference clip's}: is the voice kept when an instruction
    steers a cloned voice? Ground truth (the same voice, another clip) is the ceiling; the instruction-only model
    (which never heard the reference) the baseline."""
    import librosa

    from tts_core.reference import S3_SR

    names = [n for n, (w, _) in renders.items() if w is not None and len(w)]
    wavs = [np.ascontiguousarray(librosa.resample(np.asarray(renders[n][0], np.float32), orig_sr=renders[n][1],
                                                  target_sr=S3_SR), np.float32) for n in names]
    emb = synth.voice_encoder.embed_batch([ref.wav_16k, *wavs])
    return {n: float(emb[0] @ e) for n, e in zip(names, emb[1:])}


SWEEPS = {"repetition_penalty": "repetition_sweep", "instruction_guidance": "guidance_sweep"}


def _sweeps(cfg: LabConfig, p: LabPaths, by_id: dict, renderings: dict, say) -> dict:
    """{option: {value: {split: model rows}}}: the model re-rendered from the instruction alone on the first
    ``sweep_clips`` clips (same clips, transcripts and seeds as the main table) of each held-out split, once per value
    of each sweep (`LabConfig.repetition_sweep`, ``guidance_sweep``); the other sampling options as the main table.
    A value that samples exactly as the main table (e.g. 1.2 = the official repetition penalty, W = 0) reuses its
    rows instead of rendering them again."""
    from tts_core.evaluation.lab import asked_levels, attribute_row
    from tts_core.synthesis import Synthesizer

    wanted = {opt: tuple(getattr(cfg, field)) for opt, field in SWEEPS.items() if getattr(cfg, field)}
    if not wanted:
        return {}
    synth = Synthesizer.from_run(p.t3, device=cfg.device, text_encoder=cfg.text_encoder)
    family = synth.t3.cfg.family
    out: dict = {}
    for opt, values in wanted.items():
        out[opt] = {}
        for v in values:
            by_split = {}
            same_as_main = cfg.sampling(**{opt: v}).for_family(family) == cfg.sampling().for_family(family)
            for split, by_name in renderings.items():
                if same_as_main:  # the main table's rows: same clips, seeds and sampling, so the same tokens
                    by_split[split] = [{k: x for k, x in r.items() if k != "seed"}
                                       for r in by_name["model"][: cfg.sweep_clips]]
                    continue
                rows = []
                for base in by_name["model"][: cfg.sweep_clips]:
                    c = by_id[base["clip_id"]]
                    res = synth.synthesize(c["transcript"], instruction=c["instruction"], seed=base["seed"],
                                           sampling=cfg.sampling(**{opt: v}))
                    rows.append({**attribute_row(res.wav, res.sample_rate, c["transcript"],
                                                 asked_levels(c["instruction"])),
                                 "wording": c["wording"], "instruction": c["instruction"], "clip_id": base["clip_id"]})
                by_split[split] = rows
            out[opt][v] = by_split
            say(f"  sweep {opt} = {v}: {sum(map(len, by_split.values()))} clips "
                + ("(the main table's renderings)" if same_as_main else "rendered and measured"))
    return out


def _instruction_probe(cfg: LabConfig, p: LabPaths, by_id: dict, roles: dict, renderings: dict) -> dict:
    """{split: probe rows} for the clips the model rendered (`tts_core.evaluation.lab.instruction_probe_rows`)."""
    from tts_core.evaluation.lab import instruction_probe_rows
    from tts_core.evaluation.lab_split import TRAIN

    train_texts = [by_id[c]["instruction"] for c, r in roles.items() if r == TRAIN]
    return instruction_probe_rows(p.all_store, p.mapper, train_texts,
                                  {split: by_name["model"] for split, by_name in renderings.items()}, seed=cfg.seed)


def _report(cfg: LabConfig, corpus, clips: list[dict], roles: dict, stage1_cos: dict, curve: list[dict], train_log: list[dict],
            renderings: dict, probe: dict, seconds: dict, wall_s: float, sweeps: dict | None = None) -> dict:
    from tts_core.atomic_files import atomic_write_text
    from tts_core.evaluation import lab_report as lr
    from tts_core.evaluation.lab_split import HELD_OUT_VOICE, TRAIN, espeak_voice, role_counts

    out = Path(cfg.out)
    tables = lr.attribute_tables(renderings, cfg.n_boot, cfg.seed)
    stage1 = lr.stage1_section(stage1_cos, cfg.n_boot, cfg.seed)
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "corpus": {"n_clips": corpus.n_clips, "n_voices": len(corpus.speakers),
                   "n_espeak_voices": len({espeak_voice(s) for s in corpus.speakers})},
        "split_counts": role_counts(list(roles.values())),
        "held_out_voices": sorted({espeak_voice(c["speaker"]) for c in clips if roles[c["cache_id"]] == HELD_OUT_VOICE}),
        "training_voices": sorted({espeak_voice(c["speaker"]) for c in clips if roles[c["cache_id"]] == TRAIN}),
        "step_seconds": {k: float(v) for k, v in seconds.items() if k != "report"},
        "wall_s": float(wall_s),
        "tables": tables, "by_wording": lr.wording_section(renderings, probe, cfg.n_boot, cfg.seed), "stage1": stage1,
        "stage2": {"curve": curve, "final_train_loss": train_log[-1] if train_log else None},
        "sampling": {"main": {k: v for k, v in asdict(cfg.sampling()).items() if k != "max_new_tokens"},
                     "sweeps": lr.sweep_section(sweeps or {}, cfg.n_boot, cfg.seed)},
    }
    report["captions"] = _caption_counts(cfg, out)
    if cfg.compare_to:
        report["compare_to"] = lr.caption_comparison(report, json.loads((Path(cfg.compare_to) / "report.json")
                                                                        .read_text(encoding="utf-8")))
    report["reference_voice"] = lr.reference_voice(renderings, cfg.n_boot, cfg.seed)
    report["targets"] = lr.targets(tables, stage1, report["by_wording"])
    report["notes"] = lr.notes(report)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=_json))
    atomic_write_text(out / "report.md", lr.to_markdown(report))
    lr.plot_attributes(tables, out / "attributes.png")
    lr.plot_stage2(train_log, curve, out / "stage2_loss.png")
    lr.plot_measurements(renderings, out / "measurements.png")
    return report


def _caption_counts(cfg: LabConfig, out: Path) -> dict:
    """Clips, captions and unique instructions of the training store (what stage 1 and 2 trained on)."""
    from cache.reader import CacheReader

    r = CacheReader(LabPaths(out).train_store)
    off, ids = r.captions
    return {"per_clip": cfg.captions_per_clip, "train_clips": len(r), "train_pairs": int(len(ids)),
            "train_instructions": int(len(np.unique(ids)))}


def _json(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))
