"""Stage-1 models: instruction encoder (pooling) and flow-matching mapper, in isolation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tts_core.identity import ModelIdentity
from tts_core.mapper import (
    InstructionEncoder, InstructionMapper, MapperConfig, TextEncoderMismatchError, make_target,
)
from tts_core.mapper.pooling import pad_states
from tts_core.stage1.synthetic import HashingTextEncoder


pytestmark = pytest.mark.usefixtures("one_thread")


def _states(B=5, L=9, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, L, H, generator=g)
    lengths = torch.tensor([L, 3, 1, 7, 5][:B])
    for i, n in enumerate(lengths):
        states[i, n:] = 0
    return states, lengths


# ---- pooling ---------------------------------------------------------------------------------------------
def test_factored_pooling_equals_nn_multiheadattention():
    torch.manual_seed(0)
    enc = InstructionEncoder(32, n_heads=8)
    with torch.no_grad():
        enc.attn.in_proj_bias.normal_()  # non-zero biases exercise the folded key bias
        enc.query.normal_()
    states, lengths = _states()
    fast, ref = enc(states, lengths), enc.reference_forward(states, lengths)
    assert fast.shape == (5, 32) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # padding content is ignored
    noisy = states.clone()
    for i, n in enumerate(lengths):
        noisy[i, n:] = 1e4
    torch.testing.assert_close(enc(noisy, lengths), fast, rtol=0, atol=0)


def test_all_padding_rows_are_zero_and_finite_with_finite_grads():
    torch.manual_seed(0)
    enc = InstructionEncoder(32, n_heads=8)
    states, lengths = _states()
    lengths[1] = 0
    out = enc(states, lengths)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(32))
    assert out[0].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    # a batch of only empty instructions, and a zero-length time axis
    assert torch.equal(enc(torch.zeros(2, 0, 32), torch.zeros(2, dtype=torch.long)), torch.zeros(2, 32))
    assert torch.equal(enc.reference_forward(states, lengths)[1], torch.zeros(32))


def test_pooling_is_fp32_under_bf16_autocast_and_refuses_half_weights():
    torch.manual_seed(0)
    enc = InstructionEncoder(32, n_heads=8)
    states, lengths = _states()
    plain = enc(states, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = enc(states.bfloat16(), lengths)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, enc(states.bfloat16().float(), lengths), rtol=0, atol=0)
    assert (auto - plain).abs().max() < 0.05  # only the bf16 *input* rounding differs
    with pytest.raises(TypeError, match="float32"):
        enc.to(torch.bfloat16)(states, lengths)


def test_pooling_moves_inputs_to_its_device():
    torch.manual_seed(0)
    enc = InstructionEncoder(32, n_heads=8)
    states, lengths = _states()
    ref = enc(states, lengths)
    # numpy float16 + python list lengths are accepted and land on the module's device
    out = enc(states.numpy().astype(np.float16), lengths.tolist())
    assert out.device == enc.device
    torch.testing.assert_close(out, enc(states.half(), lengths))
    assert (out - ref).abs().max() < 1e-2
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        enc.cuda()
        assert enc(states, lengths).device.type == "cuda"


def _text_encoder():
    try:
        from tts_core.encoders.text_encoder import HFTextEncoder

        return HFTextEncoder.embedded_default()
    except Exception:  # pragma: no cover - the embedded MiniLM is a declared dependency
        return HashingTextEncoder(48)


def test_pooling_from_cached_states_equals_pooling_from_raw_text():
    te = _text_encoder()
    torch.manual_seed(0)
    enc = InstructionEncoder(te.hidden_size)  # hidden size read from the encoder (384 for MiniLM)
    texts = ["A deep, calm male voice.", "bright", "An elderly woman speaking slowly with a warm British accent.",
             "Whispering, breathy and quiet, like telling a secret in a library."]
    # the cache path: states computed once, stored as float16, padded to the table's Lmax
    arrays = te.encode(texts)
    padded, lengths = pad_states(arrays, te.hidden_size)
    table = np.zeros((len(texts), padded.shape[1] + 4, te.hidden_size), np.float16)  # extra padding like a table
    table[:, : padded.shape[1]] = padded
    from_cache = enc(torch.from_numpy(table), torch.from_numpy(lengths))
    from_text = enc.encode_text(texts, te)
    torch.testing.assert_close(from_text, from_cache, rtol=0, atol=1e-6)
    # one text at a time (other batch composition in the encoder): the same up to float16 rounding
    single = torch.cat([enc.encode_text([t], te) for t in texts])
    torch.testing.assert_close(single, from_cache, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(from_text).all() and from_text.shape == (4, te.hidden_size)


def test_encode_text_refuses_another_text_encoder():
    te = HashingTextEncoder(32)
    enc = InstructionEncoder(32)
    enc.expected_text_encoder = ModelIdentity("some-other-encoder", "f" * 64)
    with pytest.raises(TextEncoderMismatchError, match="some-other-encoder"):
        enc.encode_text(["a voice"], te)
    enc.expected_text_encoder = te.identity
    assert enc.encode_text(["a voice"], te).shape == (1, 32)
    with pytest.raises(TextEncoderMismatchError, match="hidden size"):
        InstructionEncoder(64).encode_text(["a voice"], te)


# ---- flow mapper ---------------------------------------------------------------------------------------------
def test_make_target_layout_and_normalisation():
    g = torch.Generator().manual_seed(0)
    spk, xvec = torch.randn(4, 256, generator=g), 14 * torch.randn(4, 192, generator=g)
    x1 = make_target(spk, xvec)
    assert x1.shape == (4, 512) and x1.dtype == torch.float32
    torch.testing.assert_close(x1[:, :256].norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(x1[:, 256:448].norm(dim=-1), torch.ones(4))
    assert torch.equal(x1[:, 448:], torch.zeros(4, 64))
    torch.testing.assert_close(x1[:, :256], spk / spk.norm(dim=-1, keepdim=True))
    # pure and fixed: same input, same output, no parameters involved
    assert torch.equal(make_target(spk, xvec), x1)


def _mapper(seed=0, **kw):
    torch.manual_seed(seed)
    # one draw at T 0.3 unless told (the draws test below compares against one draw)
    kw = {"draws": 1, "temperature": 0.3, **kw}
    m = InstructionMapper(MapperConfig(cond_dim=32, hidden_dim=64, n_blocks=6, **kw))
    with torch.no_grad():  # give the zero-initialised layers weights so the output depends on everything
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_heads_start_as_exact_slices_of_x1():
    m = InstructionMapper(MapperConfig(cond_dim=32))
    spk, xvec = torch.randn(3, 256), torch.randn(3, 192)
    s, x = m.decode(make_target(spk, xvec))
    torch.testing.assert_close(s, spk / spk.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(x, xvec / xvec.norm(dim=-1, keepdim=True))


def test_euler_inference_is_deterministic_under_a_seed():
    m = _mapper()
    style = torch.randn(6, 32)
    a = m.inference(style, n_steps=10, seed=7)
    b = m.inference(style, n_steps=10, seed=7)
    c = m.inference(style, n_steps=10, seed=8)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    d = m.inference(style, generator=g1)
    e = m.inference(style, noise=m.initial_noise(6, generator=g2))
    assert a[0].shape == (6, 256) and a[1].shape == (6, 192)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], d[0]) and torch.equal(a[0], e[0])
    assert not torch.allclose(a[0], c[0])
    torch.testing.assert_close(a[0].norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(a[1].norm(dim=-1), torch.ones(6))
    # autocast of the caller does not change what inference returns
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = m.inference(style, seed=7)
    assert torch.equal(f[0], a[0]) and f[0].dtype == torch.float32


def test_draws_average_decoded_samples_and_draw_zero_is_the_one_draw_vector():
    m = _mapper()
    style = torch.randn(5, 32)
    one = m.inference(style, seed=3)
    four = m.inference(style, seed=3, draws=4)
    # by hand: four draws from one seeded generator, decoded, averaged, re-normalised
    g = torch.Generator().manual_seed(3)
    noise = torch.stack([m.initial_noise(5, generator=g) for _ in range(4)])
    assert torch.equal(noise[0], m.initial_noise(5, seed=3))
    decoded = [m.inference(style, noise=noise[i]) for i in range(4)]
    assert torch.equal(decoded[0][0], one[0])
    for v in range(2):
        expect = torch.nn.functional.normalize(torch.stack([d[v] for d in decoded]).mean(0), dim=-1)
        torch.testing.assert_close(four[v], expect)
        torch.testing.assert_close(four[v].norm(dim=-1), torch.ones(5))
    assert not torch.allclose(four[0], one[0])
    # explicit noise of K draws equals the seeded K-draw path; the config's draws is the default
    torch.testing.assert_close(m.inference(style, noise=noise, draws=4)[0], four[0])
    m.config.draws = 4
    torch.testing.assert_close(m.inference(style, seed=3)[0], four[0])
    with pytest.raises(ValueError, match="2 draws"):
        m.inference(style, noise=noise[:2])


def test_phase1_recon_reads_ground_truth_phase2_reads_prediction():
    """Phase 1: the reconstruction term never reaches the velocity net; phase 2: it does."""
    style, spk, xvec = torch.randn(8, 32), torch.randn(8, 256), torch.randn(8, 192)

    def grads(use_pred: bool, recon_weight: float):
        m = _mapper(recon_weight=recon_weight)
        loss, parts = m.loss(style, spk, xvec, use_predicted_recon=use_pred,
                             generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and set(parts) == {"fm", "recon"}
        return m.out_proj.weight.grad.clone(), m.spk_head.weight.grad

    v1_with, h1 = grads(False, 1.0)
    v1_without, _ = grads(False, 0.0)
    torch.testing.assert_close(v1_with, v1_without, rtol=0, atol=0)
    assert h1.abs().sum() > 0
    v2_with, _ = grads(True, 1.0)
    v2_without, _ = grads(True, 0.0)
    assert (v2_with - v2_without).abs().max() > 1e-6
