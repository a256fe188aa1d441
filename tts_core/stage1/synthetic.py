"""Structured synthetic stage-1 data, for tests and smoke runs without a cache or a real text encoder.

``n_clusters`` voices; each has a centroid speaker embedding (256) and x-vector (192). Every clip's
ground truth is its cluster's centroid plus noise, L2-normalised (cos to the centroid ≈ 1/√(1+σ²)).
Every instruction is a few filler words shared by all clusters plus one word naming the cluster, so
the instruction text determines the voice, and only one word in it matters: a model must learn to
attend to that word to beat the train-mean baseline on held-out (unseen) instruction texts.

`HashingTextEncoder` stands in for the frozen text encoder: each word maps to a fixed pseudo-random
vector (seeded by a hash of the word) plus a small position signal. It meets the
`tts_core.encoders.base.TextEncoder` contract and has an honest identity ("synthetic, test only").
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import torch

from tts_core.identity import ModelIdentity
from tts_core.stage1.data import Stage1Data

CLUSTER_WORDS = ("deep", "bright", "raspy", "breathy", "nasal", "booming", "whispery", "shrill",
                 "husky", "silky", "gravelly", "squeaky")
FILLER_WORDS = ("a", "the", "speaker", "with", "voice", "calm", "slow", "fast", "clear", "warm", "tone", "talks",
                "speaks", "sounding", "very", "quite", "gentle", "loud", "soft", "young", "old", "friendly",
                "serious", "tired", "happy", "and", "in", "an", "accent", "style")


class HashingTextEncoder:
    """Deterministic word-hash "text encoder": text → float32 [n_words, hidden_size]."""

    def __init__(self, hidden_size: int = 64, seed: int = 0):
        self.hidden_size = int(hidden_size)
        self.seed = int(seed)
        digest = hashlib.sha256(f"hashing-text-encoder/{hidden_size}/{seed}".encode()).hexdigest()
        self.identity = ModelIdentity(name=f"hashing-text-encoder-h{hidden_size} (synthetic, test only)",
                                      sha256=digest, source="tts_core.stage1.synthetic")
        pos = np.arange(64)[:, None] / np.power(10_000, np.arange(self.hidden_size)[None, :] / self.hidden_size)
        self._pos = (0.1 * np.sin(pos)).astype(np.float32)

    def _word(self, w: str) -> np.ndarray:
        h = int.from_bytes(hashlib.blake2b(f"{self.seed}/{w}".encode(), digest_size=8).digest(), "big")
        return np.random.default_rng(h).standard_normal(self.hidden_size).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = []
        for t in texts:
            words = re.findall(r"[a-z0-9']+", t.lower())
            if not words:
                out.append(np.zeros((0, self.hidden_size), np.float32))
                continue
            arr = np.stack([self._word(w) for w in words]) + self._pos[np.arange(len(words)) % len(self._pos)]
            out.append(arr.astype(np.float32))
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_synthetic_data(n_clips: int = 3000, n_clusters: int = 8, n_instructions: int = 400, hidden_size: int = 64,
                        noise: float = 0.5, seed: int = 0, text_encoder: HashingTextEncoder | None = None,
                        xvec_scale: float = 14.0) -> Stage1Data:
    """Stage1Data whose instruction text determines the target voice (module doc).

    Raw x-vectors are scaled by ``xvec_scale`` (CAM++-like norms ≈ 14) to exercise normalisation.
    """
    if n_clusters > len(CLUSTER_WORDS):
        raise ValueError(f"at most {len(CLUSTER_WORDS)} clusters")
    rng = np.random.default_rng(seed)
    te = text_encoder or HashingTextEncoder(hidden_size, seed=seed)
    c_spk = _unit(rng.standard_normal((n_clusters, 256)))
    c_xv = _unit(rng.standard_normal((n_clusters, 192)))

    texts: list[str] = []
    cluster_of: list[int] = []
    seen = set()
    while len(texts) < n_instructions:
        k = int(rng.integers(n_clusters))
        words = list(rng.choice(FILLER_WORDS, size=int(rng.integers(3, 8))))
        words.insert(int(rng.integers(len(words) + 1)), CLUSTER_WORDS[k])
        t = " ".join(words)
        if t not in seen:
            seen.add(t)
            texts.append(t)
            cluster_of.append(k)
    cluster_of_arr = np.array(cluster_of)

    iid = rng.integers(n_instructions, size=n_clips)
    k = cluster_of_arr[iid]
    spk = _unit(c_spk[k] + noise * rng.standard_normal((n_clips, 256)) / np.sqrt(256))
    xv = xvec_scale * _unit(c_xv[k] + noise * rng.standard_normal((n_clips, 192)) / np.sqrt(192))

    arrays = te.encode(texts)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    states = np.zeros((n_instructions, int(lengths.max()), te.hidden_size), dtype=np.float16)
    for i, a in enumerate(arrays):
        states[i, : len(a)] = a
    return Stage1Data(
        spk=torch.from_numpy(spk.astype(np.float32)), xvec=torch.from_numpy(xv.astype(np.float32)),
        instruction_id=torch.from_numpy(iid.astype(np.int64)), states=torch.from_numpy(states),
        lengths=torch.from_numpy(lengths), clip_ids=[f"clip{i:06d}" for i in range(n_clips)],
        instruction_texts=texts, text_encoder_identity=te.identity.to_dict(),
        speakers=[f"c{int(c)}_s{int(s)}" for c, s in zip(k, rng.integers(4, size=n_clips))],
        cache_identity={"url": "synthetic", "seed": seed, "n_clusters": n_clusters},
    )
