"""The lab's measurements on held-out clips, from the trained artifacts: stage-1 cosines against the mean vector and
the oracle, stage-2 held-out speech loss per kept checkpoint, and the attribute rows of every rendering (ground-truth
audio, ground-truth tokens through the vocoder, the model, the model with a reference clip, the sampling sweeps) and
of the instruction-embedding probe. The questions themselves are `tts_core.evaluation.held_out`'s; this module feeds them
the lab's clips and runs.

Held-out speech loss is computed here, after training, from the kept checkpoints (teacher-forced, dropout off):
nothing held out is in the training store, so stage 2 needs no hold-out option, and training and held-out rows are
scored the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instruct_tts.lab.config import LabConfig
from instruct_tts.lab.paths import LabPaths


@dataclass
class HeldOutMeasurements:
    """What the lab measures on held-out clips, as the report reads it."""
    stage1_cosines: dict  # {split: `tts_core.evaluation.held_out.stage1_cosines`}
    curve: list[dict]  # stage-2 held-out speech loss per kept checkpoint
    train_log: list[dict]  # the stage-2 loop's metrics.jsonl rows
    renderings: dict  # {split: {rendering: attribute rows}}
    probe: dict  # {split: instruction-embedding probe rows}
    sweeps: dict  # {option: {value: {split: model rows}}}
    records: list[dict]  # every clip of every rendering and sweep: measurements.json
    seconds: dict  # wall seconds of each measurement (the report's profile)


def measure_held_out(cfg: LabConfig, p: LabPaths, root: Path, clips: list[dict], roles: dict,
                     say) -> HeldOutMeasurements:
    """Step 5: every measurement on the held-out clips, in the lab's order."""
    from tts_core.evaluation.lab_split import HELD_OUT

    import time

    by_id = {c["cache_id"]: c for c in clips}
    held = {split: [c for c, r in roles.items() if r == split] for split in HELD_OUT}
    seconds, t = {}, time.time()

    def timed(name: str, value):
        nonlocal t
        seconds[name], t = time.time() - t, time.time()
        return value

    stage1 = timed("stage-1 cosines", stage1_cosines_by_split(p, clips, roles, held))
    curve, train_log = timed("stage-2 held-out loss curve", stage2_curve(cfg, p, roles, held))
    renderings, measured = timed("renderings (ground truth, vocoder, model, reference)",
                                 render_held_out(cfg, p, root, by_id, held, say))
    probe = timed("instruction-embedding probe", instruction_probe_by_split(cfg, p, by_id, roles, renderings))
    sweeps = timed("sampling sweeps", sweep_renderings(cfg, p, by_id, renderings, say))
    measured += [{"split": split, "rendering": f"model, {opt} = {v:g}", "speaker": by_id[r["clip_id"]]["speaker"], **r}
                 for opt, by_value in sweeps.items() for v, by_split in by_value.items()
                 for split, rows in by_split.items() for r in rows]
    return HeldOutMeasurements(stage1, curve, train_log, renderings, probe, sweeps, measured, seconds)


def stage1_cosines_by_split(p: LabPaths, clips: list[dict], roles: dict, held: dict) -> dict:
    """{split: stage-1 cosines of its clips' rows in all.zarr} (`tts_core.evaluation.held_out.stage1_cosines`), the
    mean vector and oracles fitted on the training rows."""
    from tts_core.evaluation.held_out import SAMPLING_CURVE, stage1_cosines
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
    """``k`` of ``ids`` (all when fewer), drawn with ``seed``, in their order."""
    if len(ids) <= k:
        return list(ids)
    idx = np.sort(np.random.default_rng(seed).choice(len(ids), k, replace=False))
    return [ids[i] for i in idx]


def stage2_curve(cfg: LabConfig, p: LabPaths, roles: dict, held: dict) -> tuple[list[dict], list[dict]]:
    """Teacher-forced speech loss of every kept checkpoint on up to ``loss_clips`` clips per held-out split and of
    the training clips, beside the loop's own; → (curve, the loop's log)."""
    from tts_core.evaluation.held_out import SpeechLossProbe
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


def render_held_out(cfg: LabConfig, p: LabPaths, root: Path, by_id: dict, held: dict, say) -> tuple[dict, dict]:
    """{split: {rendering: attribute rows}} on up to ``eval_clips`` held-out clips per split, and per-clip records.
    Held-out voices also get the model conditioned on a reference clip of the voice (another clip of the same
    speaker) *and* the instruction: does the instruction still steer a voice the model is told to clone?"""
    import soundfile as sf

    from cache.reader import CacheReader
    from tts_core.evaluation.directions import ATTRIBUTES
    from tts_core.evaluation.held_out import asked_levels, attribute_row
    from tts_core.evaluation.lab_split import HELD_OUT_VOICE
    from tts_core.synthesis import Synthesizer

    from tts_core.evaluation.lab_report import WITH_REFERENCE
    from tts_core.reference import Reference

    synth = Synthesizer.from_run(p.t3, device=cfg.device, text_encoder=cfg.text_encoder)
    by_speaker: dict[str, list[str]] = {}
    for cid in held.get(HELD_OUT_VOICE, []):
        by_speaker.setdefault(by_id[cid]["speaker"], []).append(cid)
    reader = CacheReader(p.all_store)
    ok_row = {c: i for i, c in enumerate(reader.ok_manifest["clip_id"].astype(str))}
    sampling, with_reference = cfg.sampling(), cfg.sampling(reference=True)
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
                ref_id = others[k % len(others)]
                ref = Reference.load(root / by_id[ref_id]["path"])
                r2 = synth.synthesize(text, instruction=c["instruction"], reference=ref, seed=cfg.seed + k,
                                      sampling=with_reference)
                renders[WITH_REFERENCE] = (r2.wav, r2.sample_rate)
                voice_kept = _reference_cosines(synth, ref, renders)
            for name, (w, s) in renders.items():
                row = {**attribute_row(w, s, text, levels), "wording": c["wording"], "instruction": c["instruction"],
                       "clip_id": cid, "seed": cfg.seed + k}
                if name in voice_kept:
                    row["ref_spk_cos"], row["reference_clip"] = voice_kept[name], ref_id
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
REFERENCE_SWEEP = "reference_guidance"  # instruction guidance W with a reference clip (`reference_guidance_sweep`)


def sweep_renderings(cfg: LabConfig, p: LabPaths, by_id: dict, renderings: dict, say) -> dict:
    """{option: {value: {split: model rows}}}: the model re-rendered from the instruction alone on the first
    ``sweep_clips`` clips (same clips, transcripts and seeds as the main table) of each held-out split, once per value
    of each sweep (`LabConfig.repetition_sweep`, ``guidance_sweep``); the other sampling options as the main table.
    A value that samples exactly as the main table (e.g. 1.2 = the official repetition penalty, W = 0) reuses its
    rows instead of rendering them again."""
    from tts_core.evaluation.held_out import asked_levels, attribute_row
    from tts_core.synthesis import Synthesizer

    wanted = {opt: tuple(getattr(cfg, field)) for opt, field in SWEEPS.items() if getattr(cfg, field)}
    if not wanted and not cfg.reference_guidance_sweep:
        return {}
    synth = Synthesizer.from_run(p.t3, device=cfg.device, text_encoder=cfg.text_encoder)
    family = synth.t3.cfg.family
    out: dict = {}
    if cfg.reference_guidance_sweep:
        out[REFERENCE_SWEEP] = reference_sweep(cfg, synth, p, by_id, renderings, say)
    for opt, values in wanted.items():
        out[opt] = {}
        for v in values:
            by_split = {}
            same_as_main = cfg.sampling(**{opt: v}).for_family(family) == cfg.sampling().for_family(family)
            for split, by_name in renderings.items():
                if same_as_main:  # the main table's rows: same clips, seeds and sampling, so the same tokens
                    by_split[split] = [{k: x for k, x in r.items() if k not in ("seed", "ref_spk_cos", "reference_clip")}
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


def reference_sweep(cfg: LabConfig, synth, p: LabPaths, by_id: dict, renderings: dict, say) -> dict:
    """{W: {held-out voices: rows}}: the "reference clip + instruction" rendering of the first ``sweep_clips``
    held-out-voice clips (same reference clip, transcript and seed as the main table) at each W of
    ``reference_guidance_sweep``, each row with its voice cosine to the reference: the curve the reference clip's
    default W is chosen from (keep the voice, still follow the instruction)."""
    from tts_core.evaluation.held_out import asked_levels, attribute_row
    from tts_core.evaluation.lab_report import WITH_REFERENCE
    from tts_core.evaluation.lab_split import HELD_OUT_VOICE
    from tts_core.reference import Reference

    root = p.corpus  # the corpus's root: its metadata paths are relative to it
    base_rows = renderings.get(HELD_OUT_VOICE, {}).get(WITH_REFERENCE, [])[: cfg.sweep_clips]
    main_w = cfg.sampling(reference=True).instruction_guidance
    out = {}
    for w in cfg.reference_guidance_sweep:
        rows = []
        for base in base_rows:
            if w == main_w:  # the main table's rendering: same clip, reference, seed and sampling
                rows.append({k: x for k, x in base.items() if k != "seed"})
                continue
            c = by_id[base["clip_id"]]
            ref = Reference.load(root / by_id[base["reference_clip"]]["path"])
            res = synth.synthesize(c["transcript"], instruction=c["instruction"], reference=ref, seed=base["seed"],
                                   sampling=cfg.sampling(reference=True, instruction_guidance=w))
            rows.append({**attribute_row(res.wav, res.sample_rate, c["transcript"], asked_levels(c["instruction"])),
                         "ref_spk_cos": _reference_cosines(synth, ref, {"model": (res.wav, res.sample_rate)}).get(
                             "model", float("nan")),
                         "wording": c["wording"], "instruction": c["instruction"], "clip_id": base["clip_id"],
                         "reference_clip": base["reference_clip"]})
        out[w] = {HELD_OUT_VOICE: rows}
        say(f"  sweep W with a reference clip = {w:g}: {len(rows)} clips"
            + (" (the main table's renderings)" if w == main_w else " rendered and measured"))
    return out


def instruction_probe_by_split(cfg: LabConfig, p: LabPaths, by_id: dict, roles: dict, renderings: dict) -> dict:
    """{split: probe rows} for the clips the model rendered (`tts_core.evaluation.held_out.instruction_probe_rows`)."""
    from tts_core.evaluation.held_out import instruction_probe_rows
    from tts_core.evaluation.lab_split import TRAIN

    train_texts = [by_id[c]["instruction"] for c, r in roles.items() if r == TRAIN]
    return instruction_probe_rows(p.all_store, p.mapper, train_texts,
                                  {split: by_name["model"] for split, by_name in renderings.items()}, seed=cfg.seed)
