"""S3Gen (Chatterbox's token-to-waveform decoder, optional extra `vocoder`) behind our vocoder interface:
loading a Chatterbox-format s3gen.safetensors written by the test, decoding with the mapper's x-vector,
refusing a checkpoint that lacks weights, and the Synthesizer path that uses it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("chatterbox", reason="the `vocoder` extra (chatterbox-tts) is not installed")

from tts_core.vocoders import S3GenVocoder, _s3gen_class  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FRONT_END = ("tokenizer._mel_filters", "tokenizer.window")


@pytest.fixture(scope="module")
def s3gen_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _s3gen_class()()
    path = tmp_path_factory.mktemp("chatterbox") / "s3gen.safetensors"
    # Chatterbox's key names, fp16 to halve the test's disk use (loading casts to the module's fp32); the S3
    # tokenizer's front end (mel filterbank, window) stays fp32: our loader checks it against the s3tokenizer package
    save_file({k: v.detach().half().contiguous() if v.is_floating_point() and k not in FRONT_END
               else v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_s3gen_loads_official_key_names_and_decodes_25hz_tokens_to_24khz(s3gen_file):
    voc = S3GenVocoder.from_file(s3gen_file)
    tokens = (np.arange(20) * 37) % 6561
    xv = np.random.default_rng(0).normal(size=192).astype(np.float32)
    torch.manual_seed(1)
    a = voc.decode(tokens, x_vector=xv)
    torch.manual_seed(1)
    b = voc.decode(np.concatenate([tokens, [6562]]), x_vector=xv)  # EOS / non-S3 ids are dropped
    assert a.shape == (20 * 960,) and np.isfinite(a).all() and np.abs(a).max() > 0
    assert np.array_equal(a, b)
    torch.manual_seed(1)
    c = voc.decode(tokens, x_vector=-xv)  # the x-vector is the voice: another one, another waveform
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="reference clip or an x-vector"):
        voc.decode(tokens)


def test_s3gen_checkpoint_missing_weights_is_refused(s3gen_file, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(s3gen_file))
    dropped = [k for k in state if k.startswith("mel2wav.")][:3]
    for k in dropped:
        del state[k]
    bad = tmp_path / "s3gen.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match="lacks 3 S3Gen weights"):
        S3GenVocoder.from_file(bad)
    with pytest.raises(FileNotFoundError, match="s3gen.safetensors"):
        S3GenVocoder.from_file(tmp_path / "nowhere" / "s3gen.safetensors")


def test_synthesizer_voices_s3_tokens_with_the_mappers_x_vector(t3_run, s3gen_file):
    """The production path: instruction → mapper x-vector → S3Gen. (The tiny run's tokens are valid S3 ids.)"""
    from tts_core.synthesis import SamplingConfig, Synthesizer

    s = Synthesizer.from_run(t3_run)
    s.vocoder = S3GenVocoder.from_file(s3gen_file)
    kw = dict(instruction="A deep, slow male voice.", sampling=SamplingConfig(max_new_tokens=12))
    a, b = s.synthesize("Hello.", seed=5, **kw), s.synthesize("Hello.", seed=5, **kw)
    assert a.sample_rate == 24_000 and a.x_vector.shape == (192,)
    assert len(a.wav) == 960 * int((a.tokens < 6561).sum()) and np.array_equal(a.wav, b.wav)


def test_reference_paths_equal_the_official_prepare_conditionals(s3gen_file, tmp_path):
    """A 12 s reference through our synthesis path and through chatterbox-tts 0.1.7's own
    `ChatterboxTTS.prepare_conditionals` (same weights): T3's prompt = tokens of the first 6 s, speaker
    embedding of the whole clip, S3Gen's reference = embed_ref of the first 10 s at 24 kHz. The cache's
    prompt rule (tts_core/cachebuild/shards.py) gives the same tokens for the same 16 kHz waveform."""
    from types import SimpleNamespace

    import soundfile as sf
    from chatterbox.models.voice_encoder import VoiceEncoder as OfficialVoiceEncoder
    from chatterbox.tts import ChatterboxTTS

    from tts_core.cachebuild.shards import encode_batch
    from tts_core.audio import LoadedAudio, load_clip
    from tts_core.encoders.s3_tokenizer import S3SpeechTokenizer
    from tts_core.encoders.voice_encoder import VoiceEncoder
    from tts_core.metadata import MetaLine
    from tts_core.reference import Reference, t3_prompt

    voc = S3GenVocoder.from_file(s3gen_file)
    torch.manual_seed(0)
    official_ve = OfficialVoiceEncoder().eval()
    torch.save(official_ve.state_dict(), tmp_path / "ve.pt")  # the multilingual release's format
    sr = 22_050  # neither 16 nor 24 kHz: both loaders resample
    t = np.arange(12 * sr) / sr
    swell = np.clip(t / 12, 0.1, 1.0)  # louder later: a whole-clip log-mel max differs from the first 6 s'
    wav = (0.4 * swell * np.sin(2 * np.pi * (110 + 40 * np.sin(2 * np.pi * 0.7 * t)) * t)
           * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    sf.write(tmp_path / "ref.wav", wav, sr)

    official = SimpleNamespace(s3gen=voc.model, ve=official_ve, device="cpu",
                               t3=SimpleNamespace(hp=SimpleNamespace(speech_cond_prompt_len=150)),
                               ENC_COND_LEN=ChatterboxTTS.ENC_COND_LEN, DEC_COND_LEN=ChatterboxTTS.DEC_COND_LEN)
    ChatterboxTTS.prepare_conditionals(official, str(tmp_path / "ref.wav"))
    want_t3, want_gen = official.conds.t3, official.conds.gen

    ref = Reference.load(tmp_path / "ref.wav")
    tok = S3SpeechTokenizer.from_s3gen(s3gen_file)
    spk, prompt = t3_prompt(ref, VoiceEncoder.from_chatterbox(tmp_path / "ve.pt"), tok, 150)
    assert prompt.tolist() == want_t3.cond_prompt_speech_tokens[0].tolist() and len(prompt) == 150
    np.testing.assert_allclose(spk, want_t3.speaker_emb[0].numpy(), atol=1e-5)
    whole = tok.tokenize_batch([ref.wav_16k])[0][:150]  # the old way: crop the whole clip's tokens
    assert whole.tolist() != prompt.tolist()

    gen = voc.reference_dict(ref)
    assert gen["prompt_feat"].shape[1] == 500 == want_gen["prompt_feat"].shape[1]  # 10 s at 50 Hz, not 600
    assert torch.equal(gen["prompt_feat"], want_gen["prompt_feat"])
    assert torch.equal(gen["prompt_token"], want_gen["prompt_token"])
    torch.testing.assert_close(gen["embedding"], want_gen["embedding"])

    line = MetaLine(0, 1, "ref.wav", "t", "i", "")
    emb = SimpleNamespace(embed_batch=lambda wavs: np.ones((len(wavs), 256), np.float32))
    xv = SimpleNamespace(embed_batch=lambda wavs: np.ones((len(wavs), 192), np.float32))
    cached = encode_batch([line], [LoadedAudio(ref.wav_16k, 12.0)], [0], emb, xv, tok)
    assert cached.prompt_tokens[0].tolist() == prompt.tolist()
    # the build's own loading: the file read once, 16 kHz by torchaudio for the models, the prompt cut from
    # Chatterbox's librosa path (22.05 → 24 → 16 kHz) — the same 16 kHz samples the official code tokenizes
    loaded = load_clip(tmp_path / "ref.wav")
    np.testing.assert_array_equal(loaded.prompt_wav, ref.wav_16k[:15 * 16_000])
    assert not np.array_equal(loaded.wav[:len(loaded.prompt_wav)], loaded.prompt_wav)  # the resamplers differ
    built = encode_batch([line], [loaded], [0], emb, xv, tok)
    assert built.prompt_tokens[0].tolist() == prompt.tolist()
    assert built.prompt15_tokens[0].tolist() == tok.tokenize_batch([ref.wav_16k])[0].tolist()  # 12 s < 15 s
