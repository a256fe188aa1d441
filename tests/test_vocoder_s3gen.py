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


@pytest.fixture(scope="module")
def s3gen_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _s3gen_class()()
    path = tmp_path_factory.mktemp("chatterbox") / "s3gen.safetensors"
    # Chatterbox's key names, fp16 to halve the test's disk use (loading casts to the module's fp32)
    save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, str(path))
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
