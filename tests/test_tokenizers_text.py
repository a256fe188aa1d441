"""Speech tokenizers (S3 from an s3gen checkpoint, the embedded mel k-means VQ) and the instruction encoder."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import s3tokenizer
from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2
from tts_core import checkpoint
from tts_core.encoders.base import SpeechTokenizer, TextEncoder
from tts_core.encoders.mel_vq import MelVQTokenizer
from tts_core.encoders.s3_tokenizer import S3_NAME, S3SpeechTokenizer, config_from_state, package_mel_filters
from tts_core.encoders.text_encoder import HFTextEncoder, TextEncoderNotFound, embedded_model_dir
from tts_core.identity import sha256_file
from text_encoder_files import tiny_t5_config, write_tiny_t5_dir  # noqa: E402

SR = 16_000


def _t(seconds: float) -> np.ndarray:
    return np.arange(int(round(seconds * SR))) / SR


def chirp(seconds: float) -> np.ndarray:
    t = _t(seconds)
    return (0.5 * np.sin(2 * np.pi * (150 * t + 900 * t**2))).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(len(_t(seconds)))).astype(np.float32)


def voiced(seconds: float, f0: float = 120.0) -> np.ndarray:
    """Harmonic 'vowel' with a 4 Hz syllable envelope: closer to speech than a pure tone."""
    t = _t(seconds)
    env = 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12))
    return (0.2 * env * x).astype(np.float32)


# ---- S3 tokenizer from an s3gen checkpoint --------------------------------------------------------
SMALL_S3 = dict(n_audio_state=128, n_audio_head=2, n_audio_layer=2)  # head dim must stay 64


@pytest.fixture(scope="module")
def s3_source():
    torch.manual_seed(0)
    return S3TokenizerV2(S3_NAME, ModelConfig(**SMALL_S3)).eval()


def write_s3gen(path, source: S3TokenizerV2, front_end_buffers: bool = True):
    """An s3gen.safetensors in Chatterbox's layout: tokenizer.* beside flow/speaker-encoder/HiFT weights."""
    state = {f"tokenizer.{k}": v.contiguous() for k, v in source.state_dict().items()}
    if front_end_buffers:  # Chatterbox's S3Tokenizer subclass registers these two buffers
        state["tokenizer._mel_filters"] = package_mel_filters(source.config.n_mels)
        state["tokenizer.window"] = torch.hann_window(400)
    state["flow.encoder.embed.weight"] = torch.randn(8, 4)
    state["speaker_encoder.head.conv.weight"] = torch.randn(4, 4)
    state["mel2wav.conv_pre.weight"] = torch.randn(4, 4)
    save_file(state, str(path))
    return path


def reference_tokens(source: S3TokenizerV2, wav: np.ndarray) -> np.ndarray:
    mel = s3tokenizer.log_mel_spectrogram(torch.from_numpy(wav), n_mels=source.config.n_mels)
    codes, lens = source.quantize(mel[None], torch.tensor([mel.shape[1]]))
    return codes[0, : lens[0]].numpy()


def test_s3_loads_tokenizer_keys_and_matches_source(tmp_path, s3_source):
    tok = S3SpeechTokenizer.from_s3gen(write_s3gen(tmp_path / "s3gen.safetensors", s3_source))
    assert isinstance(tok, SpeechTokenizer)
    assert tok.vocab_size == 6561 and tok.frame_rate == 25.0
    assert tok.identity.name == "s3tokenizer-v2-25hz (chatterbox s3gen)"
    wav = voiced(1.5)
    got = tok.tokenize_batch([wav])[0]
    np.testing.assert_array_equal(got, reference_tokens(s3_source, wav))
    assert len(np.unique(got)) > 1  # a meaningful comparison, not a constant stream
    assert got.dtype == np.int64 and got.min() >= 0 and got.max() < 6561
    assert got.flags.writeable  # a plain numpy copy, not a view of an inference-mode tensor


def test_s3_batch_of_different_lengths_equals_single_clips(tmp_path, s3_source):
    tok = S3SpeechTokenizer.from_s3gen(write_s3gen(tmp_path / "s3gen.safetensors", s3_source))
    wavs = [voiced(1.0), chirp(1.52), noise(0.37), voiced(2.0, f0=210.0), noise(0.01, seed=1)]
    batch = tok.tokenize_batch(wavs)
    for wav, tokens in zip(wavs, batch):
        np.testing.assert_array_equal(tokens, tok.tokenize_batch([wav])[0])
        if len(wav) >= SR // 4:
            assert abs(len(tokens) - 25 * len(wav) / SR) <= 1
    assert len(batch[-1]) >= 1  # 10 ms still gives a token (zero-padded to one STFT window)
    assert tok.tokenize_batch([]) == []


def test_s3_without_front_end_buffers_and_identity(tmp_path, s3_source):
    a = S3SpeechTokenizer.from_s3gen(write_s3gen(tmp_path / "a.safetensors", s3_source))
    b = S3SpeechTokenizer.from_s3gen(write_s3gen(tmp_path / "b.safetensors", s3_source, front_end_buffers=False))
    assert a.identity.same_model(b.identity)  # same tokenizer weights; source path and buffers don't matter
    torch.manual_seed(1)
    other = S3TokenizerV2(S3_NAME, ModelConfig(**SMALL_S3))
    c = S3SpeechTokenizer.from_s3gen(write_s3gen(tmp_path / "c.safetensors", other))
    assert not a.identity.same_model(c.identity)


def test_s3_real_config_is_read_off_the_weights():
    with torch.device("meta"):  # the real 1280-d, 6-layer model, shapes only
        real = S3TokenizerV2(S3_NAME, ModelConfig())
    assert config_from_state(real.state_dict()) == ModelConfig()


def test_s3_clear_errors(tmp_path, s3_source):
    with pytest.raises(FileNotFoundError, match="s3gen.safetensors"):
        S3SpeechTokenizer.from_s3gen(tmp_path / "missing.safetensors")
    save_file({"flow.w": torch.zeros(2)}, str(tmp_path / "flow_only.safetensors"))
    with pytest.raises(ValueError, match="tokenizer"):
        S3SpeechTokenizer.from_s3gen(tmp_path / "flow_only.safetensors")
    path = write_s3gen(tmp_path / "bad_window.safetensors", s3_source)
    state = load_file(str(path))
    state["tokenizer.window"] = torch.ones(400)
    save_file(state, str(path))
    with pytest.raises(ValueError, match="window"):
        S3SpeechTokenizer.from_s3gen(path)


# ---- the embedded mel k-means tokenizer -----------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    return [chirp(2.0), noise(2.0), voiced(2.0), voiced(1.5, f0=220.0), chirp(1.0) * 0.2]


@pytest.fixture(scope="module")
def mel_vq(corpus):
    return MelVQTokenizer.fit(corpus, vocab_size=16, seed=0)


def test_mel_vq_is_deterministic_and_25hz(corpus, mel_vq):
    n_frames = sum(-(-len(w) // 640) for w in corpus)
    again = MelVQTokenizer.fit(corpus, vocab_size=16, seed=0)
    np.testing.assert_array_equal(again.codebook, mel_vq.codebook)
    assert again.identity == mel_vq.identity
    assert isinstance(mel_vq, SpeechTokenizer)
    assert mel_vq.vocab_size == 16 and mel_vq.frame_rate == 25.0
    assert mel_vq.identity.name == (f"mel-kmeans-vq-25hz (fitted on {n_frames} frames; "
                                     "embedded stand-in for S3)")
    wavs = [chirp(1.0), noise(0.52), voiced(2.0), noise(0.005)]
    batch = mel_vq.tokenize_batch(wavs)
    assert [len(t) for t in batch] == [25, 13, 50, 1]  # ceil(seconds · 25)
    for wav, tokens in zip(wavs, batch):
        assert tokens.dtype == np.int64 and tokens.min() >= 0 and tokens.max() < 16
        np.testing.assert_array_equal(tokens, mel_vq.tokenize_batch([wav])[0])
    assert len(np.unique(np.concatenate(batch))) > 3


def test_mel_vq_subsamples_and_refuses_too_few_frames(corpus):
    small = MelVQTokenizer.fit(corpus, vocab_size=8, seed=3, max_frames=100)
    assert small.n_fit_frames == 100 and "fitted on 100 frames" in small.identity.name
    with pytest.raises(ValueError, match="frames"):
        MelVQTokenizer.fit([chirp(0.2)], vocab_size=16)


def test_mel_vq_round_trips(tmp_path, mel_vq):
    wavs = [voiced(1.3), chirp(0.7)]
    expected = mel_vq.tokenize_batch(wavs)
    path = mel_vq.to_safetensors(tmp_path / "mel_vq.safetensors")
    for restored in (MelVQTokenizer.from_safetensors(path), MelVQTokenizer.from_arrays(*mel_vq.arrays())):
        assert restored.identity.same_model(mel_vq.identity)
        assert restored.config == mel_vq.config
        for a, b in zip(restored.tokenize_batch(wavs), expected):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="n_fit_frames"):
        MelVQTokenizer.from_arrays({"codebook": mel_vq.codebook}, mel_vq.config)


def test_mel_vq_decode_is_audible_and_faithful(mel_vq):
    a, b = voiced(1.0), noise(1.0)
    for src, other in ((a, b), (b, a)):
        wav = mel_vq.decode(mel_vq.tokenize_batch([src])[0])
        assert wav.dtype == np.float32 and len(wav) == len(src) and np.isfinite(wav).all()
        assert np.abs(wav).max() > 1e-3
        got = mel_vq.log_mel(wav)
        assert np.mean((got - mel_vq.log_mel(src)) ** 2) < np.mean((got - mel_vq.log_mel(other)) ** 2)
    with pytest.raises(ValueError):
        mel_vq.decode([16])


# ---- instruction encoder --------------------------------------------------------------------------
TEXTS = ["a calm deep male voice", "hi", "An excited young woman, speaking fast with a high pitch and lots of energy."]


@pytest.fixture(scope="module")
def minilm():
    return HFTextEncoder.embedded_default()


def test_embedded_minilm_offline(minilm):
    assert isinstance(minilm, TextEncoder)
    model_dir = embedded_model_dir()
    assert minilm.hidden_size == json.loads((model_dir / "config.json").read_text())["hidden_size"] == 384
    assert minilm.identity.sha256 == sha256_file(model_dir / "model.safetensors")
    assert minilm.kind == "encoder"
    out = minilm.encode(TEXTS)
    lengths = [len(minilm.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert [o.shape for o in out] == [(n, 384) for n in lengths] and len(set(lengths)) == 3
    assert all(o.dtype == np.float32 for o in out)
    for text, batched in zip(TEXTS, out):
        np.testing.assert_allclose(minilm.encode([text])[0], batched, atol=1e-5)


def test_text_encoder_is_fp32_inside_autocast(minilm):
    plain = minilm.encode(TEXTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = minilm.encode(TEXTS)
    for a, b in zip(plain, inside):
        assert b.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-6)  # bf16 matmuls would differ by ~1e-2


def test_text_encoder_missing_dir_says_what_to_put_there(tmp_path):
    with pytest.raises(TextEncoderNotFound, match="config.json"):
        HFTextEncoder.from_dir(tmp_path / "flan-t5-large")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TextEncoderNotFound, match="model.safetensors"):
        HFTextEncoder.from_dir(tmp_path)


def test_tiny_t5_dir_loads_as_encoder_only(tmp_path):
    from transformers import T5EncoderModel

    full = write_tiny_t5_dir(tmp_path)  # flan-t5 checkpoints hold the whole seq2seq

    enc = HFTextEncoder.from_dir(tmp_path)
    assert enc.kind == "t5" and isinstance(enc.model, T5EncoderModel)
    assert enc.hidden_size == 32 and enc.identity.name == f"t5:{tmp_path.name}"
    assert enc.identity.sha256 == sha256_file(tmp_path / "model.safetensors")
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())

    texts = ["a soft voice", "loud, fast and high."]
    out = enc.encode(texts)
    reference = full.encoder
    for text, states in zip(texts, out):
        ids = enc.tokenizer(text, return_tensors="pt")["input_ids"]
        assert states.shape == (ids.shape[1], 32)
        with torch.no_grad():
            np.testing.assert_allclose(states, reference(input_ids=ids).last_hidden_state[0].numpy(), atol=1e-5)


def test_tied_t5_weights_save_and_load(tmp_path, monkeypatch):
    from safetensors.torch import save_file as raw_save_file
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(tiny_t5_config())
    state = model.state_dict()
    assert state["shared.weight"].data_ptr() == state["encoder.embed_tokens.weight"].data_ptr()
    with pytest.raises(RuntimeError):  # the failure mode: plain safetensors refuses the tie
        raw_save_file(state, str(tmp_path / "raw.safetensors"))

    path = checkpoint.save_state_dict_safetensors(model, tmp_path / "t5.safetensors")
    stored, _ = checkpoint.read_state_dict_safetensors(path)
    assert set(stored) == set(state)

    torch.manual_seed(1)
    fresh = T5EncoderModel(tiny_t5_config())
    checkpoint.load_state_dict_safetensors(fresh, path, strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    assert fresh.shared.weight.data_ptr() == fresh.encoder.embed_tokens.weight.data_ptr()

    # atomic: a save that fails midway leaves the previous file intact and no temporary behind
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save_state_dict_safetensors(fresh, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5.safetensors"]
