"""What the instruction embedding carries: a linear probe of the levels an instruction asks for.

Stage 2 reads an instruction only through the frozen stage-1 pooling (``style_emb``). If the level an unseen
wording asks for cannot be read from that vector by a classifier fitted on the *training* instructions, no T3
trained on those instructions can be expected to follow it either: the probe separates "the T3 did not learn
it" from "the frozen text encoder does not say it". It is a diagnostic beside the model, not a bound (the
adapters are small MLPs, not linear maps).

Per attribute, a multinomial logistic regression (scikit-learn) on standardised embeddings, fitted on the
training instructions and the levels `parse_instruction` reads from their texts. Its score for an instruction
is P(more) − P(less) (e.g. P(fast) − P(slow)), which the lab scores with the same direction accuracy as a
measurement of audio.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tts_core.evaluation.directions import ATTRIBUTES


def fit_level_probes(emb: np.ndarray, levels: Sequence[Mapping[str, str | None]], seed: int = 0
                     ) -> dict[str, Pipeline]:
    """emb [N, H] of training instructions, levels[i] = {attribute: level or None} → {attribute: probe}.
    An attribute with fewer than two levels among the training texts gets no probe."""
    emb = np.asarray(emb, np.float64)
    probes = {}
    for attr in ATTRIBUTES:
        y = np.asarray([str(lv.get(attr)) for lv in levels], dtype=object)
        keep = y != "None"
        if len(set(y[keep])) < 2:
            continue
        probes[attr] = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)
                                     ).fit(emb[keep], y[keep])
    return probes


def probe_scores(probes: Mapping[str, Pipeline], emb: np.ndarray) -> dict[str, np.ndarray]:
    """{attribute: P(more) − P(less) per row of emb}; NaN for an attribute without a probe."""
    emb = np.asarray(emb, np.float64)
    out = {}
    for attr, (_, low, high) in ATTRIBUTES.items():
        probe = probes.get(attr)
        if probe is None:
            out[attr] = np.full(len(emb), np.nan)
            continue
        p = probe.predict_proba(emb)
        classes = list(probe.classes_)
        col = {c: p[:, classes.index(c)] if c in classes else np.zeros(len(emb)) for c in (low, high)}
        out[attr] = col[high] - col[low]
    return out
