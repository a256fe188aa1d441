"""Does the embedded text encoder carry unseen wording? Two measurements, one run (docs/benchmarks.md, "Lab").

    uv run python -m bench.wording_probe [--texts 3000] [--held-out 600]

1. *Zero-shot*: each held-out-wording phrase (`tts_core.corpus.instructions`, wording ``held_out``) in a short
   frame ("speak …", "a … voice"), embedded by the frozen text encoder (mean-pooled: the sentence embedding
   MiniLM was trained for), assigned the level whose training phrases it is most similar to on average.
2. *Probe with more training phrasings*: the instruction-embedding probe (`evaluation.instruction_probe`) fitted on
   ``--texts`` instructions of the training wording, and again on as many of the training wording extended by
   ``EXTRA`` — 16–25 more phrases per attribute, none using a word that only the held-out wording has — then scored by
   direction accuracy on ``--held-out`` held-out-wording instructions. If the extended wording scores much
   higher, richer training phrasings are the way to unseen wording; if not, the encoder is the limit.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import re

import numpy as np

EXTRA = {  # slot -> level -> added phrases; none uses a word that only the held-out wording has (checked below)
    "pitch_adj": {"low": ("gravelly, low", "baritone", "rumbling, low", "dark, deep", "lower-pitched", "heavy, low"),
                  "high": ("soprano", "thin, high", "light", "higher-pitched", "tinny, high", "chirpy, high"),
                  "mid": ("normal-pitched", "neutral-pitched", "medium", "moderate-pitched")},
    "rate_adv": {"slow": ("deliberately", "at a measured pace", "lazily", "at an easy, slow pace", "taking their time"),
                 "fast": ("swiftly", "at a brisk clip", "at high speed", "racing along", "in quick-fire style"),
                 "normal": ("at a steady pace", "at a comfortable pace", "at a standard speed", "at a usual pace")},
    "rate_pred": {"slow": ("measured", "lazy", "deliberate", "slow-moving"),
                  "fast": ("swift", "racing", "quick-fire", "fast-moving"),
                  "normal": ("steady", "comfortable in speed", "standard in speed")},
    "loud_adv": {"quiet": ("gently", "under the breath", "in a muted way", "very softly"),
                 "loud": ("forcefully", "powerfully", "resoundingly", "at high volume", "with a big, strong voice"),
                 "normal": ("at a comfortable volume", "at a standard level", "at a usual volume", "at a balanced volume")},
    "loud_pred": {"quiet": ("muted", "gentle", "soft-spoken", "low in volume"),
                  "loud": ("forceful", "powerful", "resounding", "high in volume"),
                  "normal": ("balanced in volume", "standard in volume", "comfortable in volume")},
}
FRAMES = {"pitch_adj": "a {} voice", "rate_adv": "speak {}", "rate_pred": "the delivery is {}",
          "loud_adv": "speak {}", "loud_pred": "the delivery is {}"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--held-out", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from tts_core.corpus import instructions as ins
    from tts_core.encoders.text_encoder import HFTextEncoder, embedded_model_dir
    from tts_core.evaluation.directions import ATTRIBUTES, direction_accuracy
    from tts_core.evaluation.instruction_probe import fit_level_probes, probe_scores

    train, held = ins.WORDINGS["train"], ins.WORDINGS["held_out"]

    def phrases(w) -> list[str]:
        return [p for slot in (*ins.SLOT_ATTRIBUTE, "voice", "person") for ps in getattr(w, slot).values()
                for p in ps] + list(w.filler) + list(w.templates)

    train_words = set().union(*map(_words, phrases(train)))
    unseen = set().union(*map(_words, phrases(held))) - train_words  # the words that make the held-out wording new
    added = {p for levels in EXTRA.values() for ps in levels.values() for p in ps}
    shared = {p: _words(p) & unseen for p in added if _words(p) & unseen}
    if shared:
        raise SystemExit(f"EXTRA uses words only the held-out wording has: {shared}")
    encoder = HFTextEncoder.from_dir(embedded_model_dir())

    def embed(texts):
        v = np.stack([s.mean(0) for s in encoder.encode(list(texts))])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    print(f"text encoder: {embedded_model_dir()}\n\n## zero-shot: nearest training level of each held-out phrase\n")
    right = total = 0
    for slot, frame in FRAMES.items():
        t = [(lv, p) for lv, ps in getattr(train, slot).items() for p in ps]
        h = [(lv, p) for lv, ps in getattr(held, slot).items() for p in ps]
        sim = embed(frame.format(p) for _, p in h) @ embed(frame.format(p) for _, p in t).T
        levels = list(getattr(train, slot))
        for i, (lv, phrase) in enumerate(h):
            guess = max(levels, key=lambda x: sim[i, [j for j, (l2, _) in enumerate(t) if l2 == x]].mean())
            right += guess == lv
            total += 1
            print(f"- {slot} {lv}: {phrase!r} -> {guess}{'' if guess == lv else '  (wrong)'}")
    print(f"\nright: {right}/{total}\n")

    extended = dataclasses.replace(train, **{slot: {lv: tuple(ps) + tuple(EXTRA[slot].get(lv, ()))
                                                    for lv, ps in getattr(train, slot).items()} for slot in EXTRA})
    ins.WORDINGS["extended"] = extended  # the generator's own templates and seeding, more phrases
    combos = [ins.VoiceAttributes(*c) for c in itertools.product(ins.GENDERS, ins.PITCHES, ins.RATES, ins.LOUDNESSES)]

    def sample(wording: str, n: int, salt: int):
        rng = random.Random(f"{a.seed}:{salt}")
        attrs = [rng.choice(combos) for _ in range(n)]
        return [ins.make_instruction(x, seed=rng.randrange(10 ** 9), wording=wording) for x in attrs], attrs

    ho_texts, ho_attrs = sample("held_out", a.held_out, 1)
    ho_emb = embed(ho_texts)
    print("## probe on held-out-wording instructions (direction accuracy)\n")
    print("| training wording | phrases per level (mean) | pitch | rate | loudness |\n|---|---|---|---|---|")
    for name in ("train", "extended"):
        texts, attrs = sample(name, a.texts, 2)
        levels = [{k: getattr(x, k) for k in ATTRIBUTES} for x in attrs]
        scores = probe_scores(fit_level_probes(embed(texts), levels, seed=a.seed), ho_emb)
        w = ins.WORDINGS[name]
        per_level = np.mean([len(ps) for slot in EXTRA for ps in getattr(w, slot).values()])
        cells = []
        for attr, (_, low, high) in ATTRIBUTES.items():
            groups = [x.gender for x in ho_attrs] if attr == "pitch" else None
            acc, _ = direction_accuracy(scores[attr], [getattr(x, attr) for x in ho_attrs], low, high, groups)
            cells.append(f"{acc:.3f}")
        print(f"| {name} | {per_level:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
