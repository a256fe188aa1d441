"""An embedded speech tokenizer that keeps F0 and level: WORLD analysis, product code, WORLD synthesis.

The mel k-means stand-in (`mel_vq`) averages away the harmonic fine structure, so its tokens do not carry
pitch (docs/benchmarks.md, "Vocoder ceiling"). Here each 40 ms token (25 Hz, like S3) is a product code:

    token = envelope_code · (n_f0_bins + 1) + f0_code

* envelope_code: nearest k-means centroid of the frame's coded WORLD spectral envelope (CheapTrick,
  `pyworld.code_spectral_envelope`: a mel-cepstrum-like vector whose first coefficient is the level, so
  loudness survives quantisation);
* f0_code: 0 = unvoiced, else the nearest of `n_f0_bins` log-spaced F0 levels over [f0_min, f0_max]
  (per token: median of the voiced DIO+StoneMask frames in its 40 ms).

Decoding is WORLD synthesis at 16 kHz: envelope centroids and F0 levels interpolated between token centres
onto a 5 ms grid, each cluster's mean aperiodicity, `len = n_tokens · 640` samples. The identity says
what this is (a WORLD product code fitted on the corpus), so a store built with it can never pass as S3.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from tts_core.checkpoint import read_state_dict_safetensors, save_state_dict_safetensors
from tts_core.encoders.embedded import TokenConfig, check_finite_features, checked_tokens
from tts_core.identity import ModelIdentity, sha256_state_dict

CONFIG_KEY = "world_vq_config"  # safetensors metadata key: what makes a file a WorldVQTokenizer file


def _pyworld():
    import pyworld  # the pyworld-prebuilt wheel; imported on use: only world-vq needs it

    return pyworld


@dataclass(frozen=True)
class WorldVQConfig(TokenConfig):
    sample_rate: int = 16_000
    hop_length: int = 640  # 25 tokens per second, as S3
    frame_period_ms: float = 5.0  # WORLD's F0 analysis and synthesis grid
    f0_floor: float = 55.0  # DIO search range: a little wider than the bins
    f0_ceil: float = 450.0
    f0_min: float = 60.0  # lowest and highest F0 level of the code
    f0_max: float = 400.0
    n_f0_bins: int = 31  # + 1 unvoiced code
    n_envelope_codes: int = 64
    envelope_dims: int = 40  # coded spectral envelope size
    voiced_share: float = 0.5  # a token is voiced when at least this share of its DIO frames are

    def __post_init__(self):
        if self.hop_length % self.frame_hop:
            raise ValueError("frame_period_ms must divide the token hop")

    @property
    def frame_hop(self) -> int:
        return int(round(self.sample_rate * self.frame_period_ms / 1000))

    @property
    def vocab_size(self) -> int:
        return self.n_envelope_codes * (self.n_f0_bins + 1)

    @property
    def fft_size(self) -> int:
        return int(_pyworld().get_cheaptrick_fft_size(self.sample_rate, self.f0_floor))

    def f0_levels(self) -> np.ndarray:
        """[n_f0_bins] geometric F0 levels (Hz), one per voiced code."""
        return np.geomspace(self.f0_min, self.f0_max, self.n_f0_bins)


@dataclass(frozen=True)
class WorldFrames:
    """Token-rate WORLD features of one clip: T = ceil(len / hop), frame i centred on sample i·hop."""

    f0: np.ndarray  # [T] Hz, 0 = unvoiced
    envelope: np.ndarray  # [T, envelope_dims] coded spectral envelope
    aperiodicity: np.ndarray  # [T, fft_size // 2 + 1]


def analyse(wav: np.ndarray, config: WorldVQConfig, with_aperiodicity: bool = False) -> WorldFrames:
    """DIO + StoneMask F0 on the 5 ms grid, pooled per token; CheapTrick (and D4C) at the token centres."""
    pw = _pyworld()
    x = np.ascontiguousarray(wav, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {x.shape}")
    fs, hop = config.sample_rate, config.hop_length
    n_tok = max(1, math.ceil(x.size / hop))
    if x.size < hop:
        x = np.pad(x, (0, hop - x.size))
    f0, t = pw.dio(x, fs, f0_floor=config.f0_floor, f0_ceil=config.f0_ceil, frame_period=config.frame_period_ms)
    f0 = pw.stonemask(x, f0, t, fs)
    per = hop // config.frame_hop  # DIO frames per token
    tok_f0 = np.zeros(n_tok)
    for i in range(n_tok):  # frames within ±hop/2 of the token centre
        window = f0[max(0, i * per - per // 2): i * per + per // 2]
        voiced = window[window > 0]
        if window.size and voiced.size >= config.voiced_share * window.size:
            tok_f0[i] = np.median(voiced)
    t_tok = np.arange(n_tok) * hop / fs
    sp = pw.cheaptrick(x, tok_f0, t_tok, fs, f0_floor=config.f0_floor)
    env = pw.code_spectral_envelope(sp, fs, config.envelope_dims)
    ap = pw.d4c(x, tok_f0, t_tok, fs) if with_aperiodicity else np.zeros((n_tok, 0))
    return WorldFrames(tok_f0, env.astype(np.float32), ap.astype(np.float32))


def f0_codes(f0: np.ndarray, config: WorldVQConfig) -> np.ndarray:
    """0 for unvoiced, else 1 + the nearest log-F0 level."""
    levels = np.log(config.f0_levels())
    voiced = f0 > 0
    out = np.zeros(f0.shape, np.int64)
    out[voiced] = 1 + np.abs(np.log(f0[voiced])[:, None] - levels[None, :]).argmin(1)
    return out


def _identity(envelopes: np.ndarray, aperiodicity: np.ndarray, config: WorldVQConfig, n_fit_frames: int,
              source: str = "") -> ModelIdentity:
    name = (f"world-vq-25hz ({config.n_envelope_codes} WORLD envelope codes x {config.n_f0_bins} log-F0 levels "
            f"+ unvoiced, fitted on {n_fit_frames} frames; embedded stand-in for S3)")
    state = {"envelopes": torch.from_numpy(envelopes), "aperiodicity": torch.from_numpy(aperiodicity),
             "config": torch.tensor(list(json.dumps(asdict(config), sort_keys=True).encode()), dtype=torch.uint8)}
    return ModelIdentity(name, sha256_state_dict(state), source=source)


class WorldVQTokenizer:
    """SpeechTokenizer + decoder: 40 ms WORLD frames → (envelope code, F0 code) → one token; tokens → audio."""

    kind = "world-vq"

    def __init__(self, envelopes: np.ndarray, aperiodicity: np.ndarray, config: WorldVQConfig, n_fit_frames: int,
                 source: str = ""):
        envelopes = np.ascontiguousarray(envelopes, dtype=np.float32)
        aperiodicity = np.ascontiguousarray(aperiodicity, dtype=np.float32)
        want_env = (config.n_envelope_codes, config.envelope_dims)
        want_ap = (config.n_envelope_codes, config.fft_size // 2 + 1)
        if envelopes.shape != want_env or aperiodicity.shape != want_ap:
            raise ValueError(f"envelopes must be {list(want_env)} and aperiodicity {list(want_ap)} for this config, "
                             f"got {list(envelopes.shape)} and {list(aperiodicity.shape)}")
        self.config = config
        self.envelopes, self.aperiodicity = envelopes, aperiodicity
        self.n_fit_frames = int(n_fit_frames)
        self.vocab_size = config.vocab_size
        self.frame_rate = config.frame_rate
        self.sample_rate = config.sample_rate
        self.identity = _identity(envelopes, aperiodicity, config, self.n_fit_frames, source)

    # ---- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, wavs16k: Sequence[np.ndarray], seed: int = 0, max_frames: int = 200_000,
            config: WorldVQConfig | None = None) -> "WorldVQTokenizer":
        """K-means of the clips' coded envelopes (a seeded subsample of at most `max_frames`); each
        cluster's aperiodicity is the mean over its frames (voiced ones where it has any)."""
        from sklearn.cluster import MiniBatchKMeans

        config = config or WorldVQConfig()
        if len(wavs16k) == 0:
            raise ValueError("fit needs at least one clip")
        frames = [analyse(w, config, with_aperiodicity=True) for w in wavs16k]
        check_finite_features([f.envelope for f in frames], "WORLD envelopes")
        check_finite_features([f.aperiodicity for f in frames], "WORLD aperiodicity")
        env = np.concatenate([f.envelope for f in frames])
        ap = np.concatenate([f.aperiodicity for f in frames])
        voiced = np.concatenate([f.f0 > 0 for f in frames])
        if len(env) > max_frames:
            keep = np.sort(np.random.default_rng(seed).choice(len(env), size=max_frames, replace=False))
            env, ap, voiced = env[keep], ap[keep], voiced[keep]
        k = config.n_envelope_codes
        if len(env) < k:
            raise ValueError(f"{len(env)} frames cannot fit {k} envelope codes: give more audio or fewer codes")
        kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3, max_iter=100)
        labels = kmeans.fit(env.astype(np.float64)).predict(env.astype(np.float64))
        mean_ap = np.empty((k, ap.shape[1]), np.float32)
        for c in range(k):
            members = labels == c
            pick = members & voiced if np.any(members & voiced) else members
            mean_ap[c] = ap[pick].mean(0) if pick.any() else 1.0 - 1e-3  # an empty cluster: noise
        return cls(kmeans.cluster_centers_.astype(np.float32), mean_ap, config, len(env))

    # ---- tokenizing ------------------------------------------------------------------------------
    def envelope_codes(self, envelope: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(self.envelopes).double()
        x = torch.from_numpy(envelope).double()
        return torch.argmin((c**2).sum(1)[None, :] - 2.0 * x @ c.T, dim=1).numpy().astype(np.int64)

    def tokenize_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per clip; T = ceil(len / 640) tokens (as the mel-VQ and S3 at 25 Hz)."""
        out = []
        for w in wavs:
            fr = analyse(w, self.config)
            out.append(self.envelope_codes(fr.envelope) * (self.config.n_f0_bins + 1) + f0_codes(fr.f0, self.config))
        return out

    # ---- decoding --------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tokens → 16 kHz float32 audio, len = n_tokens · hop, by WORLD synthesis."""
        cfg = self.config
        tokens = checked_tokens(tokens, self.vocab_size)
        if tokens.size == 0:
            return np.zeros(0, np.float32)
        env_code, f0_code = np.divmod(tokens, cfg.n_f0_bins + 1)
        f0 = np.where(f0_code > 0, cfg.f0_levels()[np.maximum(f0_code - 1, 0)], 0.0)
        return synthesize(WorldFrames(f0, self.envelopes[env_code], self.aperiodicity[env_code]), cfg)

    # ---- persistence -----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {**asdict(self.config), "n_fit_frames": self.n_fit_frames}

    def arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, config dict): what a cache stores; `from_arrays(*tok.arrays())` rebuilds the tokenizer."""
        return {"envelopes": self.envelopes.copy(), "aperiodicity": self.aperiodicity.copy()}, self.config_dict()

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], config: Mapping, source: str = "") -> "WorldVQTokenizer":
        missing = {"envelopes", "aperiodicity"} - set(arrays) or {"n_fit_frames"} - set(config)
        if missing:
            raise ValueError(f"not a world-vq tokenizer: no {', '.join(sorted(missing))}")
        return cls(arrays["envelopes"], arrays["aperiodicity"], WorldVQConfig.from_dict(config),
                   int(config["n_fit_frames"]), source=source)

    def to_safetensors(self, path: str | Path) -> Path:
        state = {k: torch.from_numpy(v) for k, v in self.arrays()[0].items()}
        return save_state_dict_safetensors(state, path, metadata={CONFIG_KEY: json.dumps(self.config_dict())})

    @classmethod
    def from_safetensors(cls, path: str | Path) -> "WorldVQTokenizer":
        state, meta = read_state_dict_safetensors(path)
        if CONFIG_KEY not in meta or set(state) != {"envelopes", "aperiodicity"}:
            raise ValueError(f"{path} is not a WorldVQTokenizer file (expected {CONFIG_KEY} metadata and exactly "
                             f"the tensors envelopes, aperiodicity; found {sorted(state)})")
        return cls.from_arrays({k: v.numpy() for k, v in state.items()}, json.loads(meta[CONFIG_KEY]),
                               source=str(path))


def synthesize(frames: WorldFrames, config: WorldVQConfig) -> np.ndarray:
    """Token-rate WORLD features → 16 kHz float32 audio of len T · hop: envelopes interpolated between token
    centres onto the 5 ms grid, aperiodicity of the nearest token, F0 by `_frame_f0`."""
    pw = _pyworld()
    n = frames.f0.size
    per = config.hop_length // config.frame_hop
    t = np.arange(n * per + 1) / per  # synthesis frames, in token units (token i centred at i)
    nearest = np.clip(np.rint(t).astype(int), 0, n - 1)
    env = np.stack([np.interp(t, np.arange(n), frames.envelope[:, d]) for d in range(frames.envelope.shape[1])], 1)
    sp = pw.decode_spectral_envelope(np.ascontiguousarray(env, dtype=np.float64), config.sample_rate,
                                     config.fft_size)
    ap = np.ascontiguousarray(frames.aperiodicity[nearest], dtype=np.float64)
    wav = pw.synthesize(_frame_f0(frames.f0, t), sp, ap, config.sample_rate, config.frame_period_ms)
    return np.pad(wav, (0, max(0, n * config.hop_length - wav.size)))[: n * config.hop_length].astype(np.float32)


def _frame_f0(tok_f0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """F0 per synthesis frame: a frame takes the voicing of its nearest token; voiced frames interpolate
    log-F0 between the neighbouring voiced tokens (a smooth contour instead of 40 ms steps)."""
    voiced = np.flatnonzero(tok_f0 > 0)
    f0 = np.zeros(t.size)
    if voiced.size == 0:
        return f0
    on = (tok_f0 > 0)[np.clip(np.rint(t).astype(int), 0, tok_f0.size - 1)]
    f0[on] = np.exp(np.interp(t, voiced, np.log(tok_f0[voiced])))[on]
    return f0
