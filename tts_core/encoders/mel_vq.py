"""The embedded stand-in for S3: 25 Hz log-mel frames quantised by k-means fitted on the corpus.

No S3 weights can be had offline, yet the cache, the T3 layout and the training loop need a real discrete
speech code at 25 Hz. This one is honest about what it is (its identity says so), deterministic for a seed,
and comes with a real (if crude) decoder: centroid log-mel → inverse mel filterbank → Griffin-Lim, so
generated token streams can be listened to without S3Gen.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torchaudio

from tts_core.checkpoint import read_state_dict_safetensors, save_state_dict_safetensors
from tts_core.encoders.embedded import TokenConfig, check_finite_features, checked_tokens
from tts_core.identity import ModelIdentity, sha256_state_dict

CONFIG_KEY = "mel_vq_config"  # safetensors metadata key: what makes a file a MelVQTokenizer file


@dataclass(frozen=True)
class MelVQConfig(TokenConfig):
    """Front end: one log-mel frame per 40 ms hop (25 Hz, like S3), centred STFT, natural-log power mel."""

    sample_rate: int = 16_000
    n_fft: int = 1024  # 64 ms window: wider than the hop so every sample is seen
    hop_length: int = 640  # 16000 / 640 = 25 frames per second
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8_000.0
    log_floor: float = 1e-5  # ln(1e-5) ≈ -11.5 is the silence level
    decode_hop: int = 160  # Griffin-Lim runs 4x finer than the tokens: 84% window overlap, cleaner phase
    griffin_lim_iters: int = 32

    def __post_init__(self):
        if self.hop_length % self.decode_hop:
            raise ValueError("decode_hop must divide hop_length (each token becomes a whole number of frames)")


def _identity(codebook: np.ndarray, n_fit_frames: int, source: str = "") -> ModelIdentity:
    name = f"mel-kmeans-vq-25hz (fitted on {n_fit_frames} frames; embedded stand-in for S3)"
    return ModelIdentity(name, sha256_state_dict({"codebook": torch.from_numpy(codebook)}), source=source)


def mel_transform(config: MelVQConfig) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
        f_min=config.f_min, f_max=config.f_max, n_mels=config.n_mels, power=2.0, center=True)


def log_mel_frames(wav: np.ndarray, config: MelVQConfig,
                   transform: torchaudio.transforms.MelSpectrogram | None = None) -> np.ndarray:
    """[T, n_mels] float32 natural-log power mel, T = ceil(len / hop): frame i is centred on sample i·hop."""
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {tuple(x.shape)}")
    n_frames = max(1, math.ceil(x.numel() / config.hop_length))
    if x.numel() <= config.n_fft // 2:  # the centred STFT's reflect padding needs a little audio
        x = torch.nn.functional.pad(x, (0, config.n_fft // 2 + 1 - x.numel()))
    with torch.no_grad():
        mel = (transform or mel_transform(config))(x)[:, :n_frames]
    return torch.log(mel.clamp(min=config.log_floor)).T.contiguous().numpy()


class MelVQTokenizer:
    """SpeechTokenizer: each 40 ms log-mel frame → index of its nearest k-means centroid."""

    kind = "mel-vq"  # tts_core.encoders.embedded

    def __init__(self, codebook: np.ndarray, config: MelVQConfig, n_fit_frames: int, source: str = ""):
        codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        if codebook.ndim != 2 or codebook.shape[1] != config.n_mels:
            raise ValueError(f"codebook must be [vocab, {config.n_mels}], got {codebook.shape}")
        self.config = config
        self.codebook = codebook
        self.n_fit_frames = int(n_fit_frames)
        self.vocab_size = int(codebook.shape[0])
        self.frame_rate = config.frame_rate
        self.identity = _identity(codebook, self.n_fit_frames, source)
        self._mel = mel_transform(config)

    # ---- front end -------------------------------------------------------------------------------
    def log_mel(self, wav: np.ndarray) -> np.ndarray:
        """[T, n_mels] float32, T = ceil(len / hop): frame i is centred on sample i·hop."""
        return log_mel_frames(wav, self.config, self._mel)

    # ---- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, wavs16k: Sequence[np.ndarray], vocab_size: int = 1024, seed: int = 0,
            max_frames: int = 200_000, config: MelVQConfig | None = None) -> "MelVQTokenizer":
        """MiniBatchKMeans on (a seeded subsample of at most `max_frames` of) the clips' log-mel frames."""
        from sklearn.cluster import MiniBatchKMeans

        config = config or MelVQConfig()
        if len(wavs16k) == 0:
            raise ValueError("fit needs at least one clip")
        transform = mel_transform(config)
        per_clip = [log_mel_frames(w, config, transform) for w in wavs16k]
        check_finite_features(per_clip, "log-mel frames")
        frames = np.concatenate(per_clip)
        if len(frames) > max_frames:
            keep = np.sort(np.random.default_rng(seed).choice(len(frames), size=max_frames, replace=False))
            frames = frames[keep]
        if len(frames) < vocab_size:
            raise ValueError(f"{len(frames)} frames cannot fit {vocab_size} codes: give more audio or a "
                             f"smaller vocab_size")
        kmeans = MiniBatchKMeans(n_clusters=vocab_size, random_state=seed, batch_size=4096, n_init=3,
                                 max_iter=100)
        kmeans.fit(frames.astype(np.float64))  # seeded: the same clips give the same codebook
        return cls(kmeans.cluster_centers_.astype(np.float32), config, len(frames))

    # ---- tokenizing ------------------------------------------------------------------------------
    def quantize(self, frames: np.ndarray, chunk: int = 16_384) -> np.ndarray:
        """Nearest centroid (squared Euclidean) of each [T, n_mels] frame."""
        codebook = torch.from_numpy(self.codebook).double()
        c2 = (codebook**2).sum(1)
        out = []
        for start in range(0, len(frames), chunk):
            x = torch.from_numpy(frames[start:start + chunk]).double()
            out.append(torch.argmin(c2[None, :] - 2.0 * x @ codebook.T, dim=1))
        return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)

    def tokenize_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per-clip front end (no padding), one nearest-centroid pass: batch results equal single-clip ones."""
        mels = [self.log_mel(w) for w in wavs]
        if not mels:
            return []
        codes = self.quantize(np.concatenate(mels))
        return [a.copy() for a in np.split(codes, np.cumsum([len(m) for m in mels])[:-1])]

    # ---- decoding --------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tokens → 16 kHz float32 audio (len = n_tokens · hop) via centroid log-mel and Griffin-Lim."""
        cfg = self.config
        tokens = checked_tokens(tokens, self.vocab_size)
        if tokens.size == 0:
            return np.zeros(0, np.float32)
        mel = torch.from_numpy(np.exp(self.codebook[tokens])).T  # [n_mels, T] power
        repeat = cfg.hop_length // cfg.decode_hop
        mel = mel.repeat_interleave(repeat, dim=1)
        mel = torch.cat([mel, mel[:, -1:]], dim=1)  # centred STFT of n·hop samples: n·hop/decode_hop + 1 frames
        inverse = torchaudio.transforms.InverseMelScale(
            n_stft=cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=cfg.f_min,
            f_max=cfg.f_max)
        griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=cfg.n_fft, hop_length=cfg.decode_hop, power=2.0, n_iter=cfg.griffin_lim_iters,
            length=tokens.size * cfg.hop_length, rand_init=False)  # zero-phase start: deterministic
        with torch.no_grad():
            wav = griffin_lim(inverse(mel.float()).clamp(min=0.0))
        return wav.numpy().astype(np.float32, copy=False)

    # ---- persistence -----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """Front-end config plus the fit size, i.e. everything besides the codebook that the identity needs."""
        return {**asdict(self.config), "n_fit_frames": self.n_fit_frames}

    def arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """({"codebook"}, config dict): what a cache stores; `from_arrays(*tok.arrays())` rebuilds the tokenizer."""
        return {"codebook": self.codebook.copy()}, self.config_dict()

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], config: MelVQConfig | Mapping,
                    n_fit_frames: int | None = None, source: str = "") -> "MelVQTokenizer":
        if "codebook" not in arrays:
            raise ValueError("not a mel-vq tokenizer: no codebook array")
        codebook = np.asarray(arrays["codebook"])
        if isinstance(config, Mapping):
            n_fit_frames = n_fit_frames if n_fit_frames is not None else config.get("n_fit_frames")
            config = MelVQConfig.from_dict(config)
        if n_fit_frames is None:
            raise ValueError("n_fit_frames is part of the identity: pass it or a config dict from config_dict()")
        return cls(codebook, config, int(n_fit_frames), source=source)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"codebook": torch.from_numpy(self.codebook.copy())}

    def to_safetensors(self, path: str | Path) -> Path:
        return save_state_dict_safetensors(self.state_dict(), path,
                                           metadata={CONFIG_KEY: json.dumps(self.config_dict())})

    @classmethod
    def from_safetensors(cls, path: str | Path) -> "MelVQTokenizer":
        state, meta = read_state_dict_safetensors(path)
        if CONFIG_KEY not in meta or set(state) != {"codebook"}:
            raise ValueError(f"{path} is not a MelVQTokenizer file (expected {CONFIG_KEY} metadata and exactly the "
                             f"tensor codebook; found {sorted(state)})")
        return cls.from_arrays({"codebook": state["codebook"].numpy()}, json.loads(meta[CONFIG_KEY]), source=str(path))
