"""The lab corpus's clips and the split's metadata files: ``split/train.txt`` (the training clips, each with its
extra training-wording captions), ``split/all.txt`` (the same, then the held-out clips) and ``split/roles.csv``."""
from __future__ import annotations

import csv
from pathlib import Path

from instruct_tts.lab.config import LabConfig


def corpus_clips(corpus) -> list[dict]:
    """attributes.csv rows joined with their metadata line (transcript, instruction)."""
    from tts_core.metadata import path_id
    with corpus.attributes.open(encoding="utf-8", newline="") as f:
        attrs = list(csv.DictReader(f))
    lines = [ln for ln in corpus.metadata.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = []
    for a, line in zip(attrs, lines, strict=True):
        path, text, instruction, speaker = line.split("|")
        out.append({**a, "line": line, "transcript": text, "instruction": instruction,
                    "cache_id": path_id(path)})  # the store's clip_id: the corpus's paths are unique
    return out


def write_split(cfg: LabConfig, clips: list[dict], out: Path) -> dict[str, str]:
    """Split the clips (`tts_core.evaluation.lab_split`) and write the split's files; → {cache_id: role}."""
    from tts_core.atomic_files import atomic_write_text
    from tts_core.evaluation.lab_split import HELD_OUT, TRAIN, split_lab_clips

    roles = split_lab_clips([c["speaker"] for c in clips], [c["wording"] for c in clips],
                            [c["instruction"] for c in clips], cfg.held_out_voice_frac, cfg.held_out_instruction_frac)
    out.mkdir(parents=True, exist_ok=True)
    train = [c["line"] for c, r in zip(clips, roles) if r == TRAIN]
    held = [c["line"] for c, r in zip(clips, roles) if r in HELD_OUT]
    train += extra_captions(cfg, clips, roles)
    # train lines first: all.zarr is train.zarr grown by the held-out lines (one tokenizer, identical train rows)
    atomic_write_text(out / "train.txt", "\n".join(train) + "\n")
    atomic_write_text(out / "all.txt", "\n".join(train + held) + "\n")
    atomic_write_text(out / "roles.csv", "clip_id,role\n" + "".join(f"{c['clip_id']},{r}\n"
                                                                   for c, r in zip(clips, roles)))
    return {c["cache_id"]: r for c, r in zip(clips, roles)}


def extra_captions(cfg: LabConfig, clips: list[dict], roles: list[str]) -> list[str]:
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
