"""The embedded WORLD tokenizer (world-vq): deterministic, strict on load, exact lengths, keeps F0 and level;
and the one factory every path rebuilds an embedded tokenizer through (tts_core.encoders.embedded)."""
import numpy as np
import pytest
import torch

from tts_core.checkpoint import save_state_dict_safetensors
from tts_core.encoders import embedded
from tts_core.encoders.base import SpeechTokenizer
from tts_core.encoders.mel_vq import MelVQTokenizer
from tts_core.encoders.world_vq import WorldVQConfig, WorldVQTokenizer
from tts_core.evaluation.measures import median_f0
from tts_core.frozen import FrozenModelsConfig, load_speech_tokenizer

SR = 16_000
SMALL = WorldVQConfig(n_envelope_codes=8, n_f0_bins=15)  # a small code: fast to fit on a few seconds


def vowel(seconds: float, f0: float, gain: float = 0.3) -> np.ndarray:
    """Harmonics under a fixed formant-like tilt, with a 3 Hz syllable envelope."""
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, int(3800 / f0)))
    return (gain * x / np.abs(x).max() * (0.55 - 0.45 * np.cos(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def clips():
    return [vowel(1.0, f0, g) for f0 in (90.0, 130.0, 200.0, 280.0) for g in (0.05, 0.3)]


@pytest.fixture(scope="module")
def tok(clips):
    return WorldVQTokenizer.fit(clips, seed=0, config=SMALL)


def test_fit_is_deterministic_and_identity_is_honest(clips, tok):
    again = WorldVQTokenizer.fit(clips, seed=0, config=SMALL)
    assert again.identity.same_model(tok.identity) and np.array_equal(again.envelopes, tok.envelopes)
    assert isinstance(tok, SpeechTokenizer) and tok.vocab_size == 8 * 16 and tok.frame_rate == 25.0
    assert "world-vq" in tok.identity.name and "stand-in for S3" in tok.identity.name
    other = WorldVQTokenizer.fit(clips, seed=0, config=WorldVQConfig(n_envelope_codes=8, n_f0_bins=14))
    assert not other.identity.same_model(tok.identity)  # the F0 grid is part of the model


def test_round_trips_through_file_arrays_and_factory(tmp_path, clips, tok):
    expected = tok.tokenize_batch(clips[:3])
    path = tok.to_safetensors(tmp_path / "tok.safetensors")
    for restored in (WorldVQTokenizer.from_safetensors(path), WorldVQTokenizer.from_arrays(*tok.arrays()),
                     embedded.load_file(path), embedded.restore(embedded.saved(tok))):
        assert isinstance(restored, WorldVQTokenizer) and restored.identity.same_model(tok.identity)
        assert restored.config == tok.config
        for a, b in zip(restored.tokenize_batch(clips[:3]), expected):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tok.decode(expected[0]), embedded.load_file(path).decode(expected[0]))


def test_strict_loading_refuses_other_files(tmp_path, clips, tok):
    mel = MelVQTokenizer.fit(clips, vocab_size=8, seed=0)
    mel_path = mel.to_safetensors(tmp_path / "mel.safetensors")
    with pytest.raises(ValueError, match="not a WorldVQTokenizer file"):
        WorldVQTokenizer.from_safetensors(mel_path)
    with pytest.raises(ValueError, match="not a MelVQTokenizer file"):
        MelVQTokenizer.from_safetensors(tok.to_safetensors(tmp_path / "world.safetensors"))
    assert isinstance(embedded.load_file(mel_path), MelVQTokenizer)
    arrays, config = tok.arrays()
    extra = save_state_dict_safetensors({**{k: torch.from_numpy(v) for k, v in arrays.items()},
                                         "stray": torch.zeros(1)}, tmp_path / "extra.safetensors",
                                        metadata={"world_vq_config": "{}"})
    with pytest.raises(ValueError, match="stray"):
        WorldVQTokenizer.from_safetensors(extra)
    with pytest.raises(ValueError, match="aperiodicity"):
        WorldVQTokenizer.from_arrays({"envelopes": arrays["envelopes"]}, config)
    with pytest.raises(ValueError, match="envelopes must be"):  # arrays of another config
        WorldVQTokenizer.from_arrays(arrays, {**config, "n_envelope_codes": 16})
    with pytest.raises(ValueError, match="no .*metadata"):
        embedded.load_file(save_state_dict_safetensors({"x": torch.zeros(1)}, tmp_path / "x.safetensors"))


def test_decode_length_range_and_determinism(tok):
    for n in (1, 7, 25):
        tokens = np.arange(n) % tok.vocab_size
        wav = tok.decode(tokens)
        assert wav.dtype == np.float32 and len(wav) == n * 640 and np.isfinite(wav).all()
        np.testing.assert_array_equal(wav, tok.decode(tokens))
    assert tok.decode([]).size == 0
    assert [len(t) for t in tok.tokenize_batch([np.pad(vowel(1.0, 120.0), (0, 1)), vowel(1.0, 120.0)[:100]])] == [26, 1]
    with pytest.raises(ValueError, match="lie in"):
        tok.decode([tok.vocab_size])


def test_tokens_keep_pitch_and_level(tok):
    """Through tokens and back, F0 stays within one F0 level (±6%) and 15 dB of gain stays ≥ 10 dB."""
    for f0 in (100.0, 160.0, 240.0):
        out = tok.decode(tok.tokenize_batch([vowel(1.0, f0)])[0])
        assert median_f0(out, SR) == pytest.approx(f0, rel=0.06)

    def db(x):
        return 10 * np.log10(np.mean(x.astype(np.float64) ** 2))

    quiet, loud = (tok.decode(tok.tokenize_batch([vowel(1.0, 150.0, g)])[0]) for g in (0.05, 0.3))
    assert db(loud) - db(quiet) > 10.0


def test_factory_and_config_pick_the_kind(clips):
    with pytest.raises(ValueError, match="choose one of mel-vq, world-vq"):
        FrozenModelsConfig(speech_tokenizer="wavlm")
    world, fitted = load_speech_tokenizer(FrozenModelsConfig(speech_tokenizer="world-vq"), None, lambda: clips)
    assert fitted and isinstance(world, WorldVQTokenizer) and world.vocab_size == 64 * 32
    saved = embedded.saved(world)
    again, fitted = load_speech_tokenizer(FrozenModelsConfig(speech_tokenizer="world-vq"), saved, lambda: [])
    assert not fitted and again.identity.same_model(world.identity)
    mel, _ = load_speech_tokenizer(FrozenModelsConfig(), None, lambda: clips)
    assert isinstance(mel, MelVQTokenizer)
    vocoder = embedded.EmbeddedVocoder(world)
    assert vocoder.sample_rate == SR and len(vocoder.decode(np.array([3, 5, -1, world.vocab_size]))) == 2 * 640


def test_store_records_the_kind_and_refuses_another(demo_corpus, tmp_path):
    """build-cache --speech-tokenizer world-vq: the store keeps the tokenizer and its kind; a build asking for
    the other kind is refused by name; a store without the kind (older builds) reads as mel-vq."""
    import zarr

    from cache import schema
    from cache.writer import saved_codebook
    from tts_core.cachebuild.build import BuildConfig, build_cache
    from cache.store import StoreError, compressors

    def cfg(store, kind):
        return BuildConfig(metadata=demo_corpus.metadata, audio_root=demo_corpus.root, store=str(store), chunk_rows=16,
                           tokenizer_fit_clips=20, max_batches=1, models=FrozenModelsConfig(speech_tokenizer=kind))

    world_store, mel_store = tmp_path / "w.zarr", tmp_path / "m.zarr"
    build_cache(cfg(world_store, "world-vq"))
    saved = saved_codebook(str(world_store))
    g = zarr.open_group(str(world_store), mode="r")
    assert saved.kind == "world-vq" and g.attrs["extra"]["speech_tokenizer_kind"] == "world-vq"
    tok = embedded.restore(saved)
    assert tok.identity.sha256 == g.attrs["models"]["speech_tokenizer"]["sha256"]
    tokens = g["tokens/flat"][...]
    assert 0 <= tokens.min() and tokens.max() < tok.vocab_size == g.attrs["extra"]["tokenizer_vocab"]
    with pytest.raises(StoreError, match="holds world-vq speech tokens.*--speech-tokenizer world-vq"):
        build_cache(cfg(world_store, "mel-vq"))

    old = zarr.open_group(str(mel_store), mode="w")  # what a build before the kind existed left
    old.attrs.update({"schema_version": schema.SCHEMA_VERSION, "extra": {"tokenizer_vocab": 8}})
    mel = MelVQTokenizer.fit([vowel(1.0, 120.0)], vocab_size=8, seed=0)
    old.create_array(f"{schema.MEL_VQ_GROUP}/codebook", data=mel.codebook, compressors=compressors())
    old[schema.MEL_VQ_GROUP].attrs.update(mel.config_dict())
    assert embedded.restore(saved_codebook(str(mel_store))).identity.same_model(mel.identity)
