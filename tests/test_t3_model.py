"""T3 model core: train/generate parity, padding, loss, adapters, checkpoint loading (tiny preset, CPU)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tts_core.t3 import (
    IGNORE_INDEX,
    SEG_PAD,
    T3,
    AdaRMSNorm,
    CheckpointMismatchError,
    T3Batch,
    T3Cond,
    T3Config,
    build_generation_layout,
    build_layout,
    is_adapter_key,
    load_t3_checkpoint,
    next_token_loss,
    pad_sequences,
    save_t3,
)

CFG = T3Config.preset("tiny")
TEXTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
SPEECH = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]


def _perturb_adapters(model: T3, scale: float = 0.5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in model.adapters:
            a.adapter.fc2.weight.copy_(torch.randn(a.adapter.fc2.weight.shape, generator=g) * scale)
            a.adapter.fc2.bias.copy_(torch.randn(a.adapter.fc2.bias.shape, generator=g) * scale)


def _model(adapters: bool = True, seed: int = 0) -> T3:
    torch.manual_seed(seed)
    return T3(CFG.replace(adapters=adapters)).eval()


def _cond(B: int = 3, seed: int = 0, instruction: bool = True) -> T3Cond:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([12, 5, 0, 9][:B])
    return T3Cond(
        speaker_emb=torch.randn(B, 256, generator=g),
        prompt_tokens=torch.randint(0, 6561, (B, 12), generator=g),
        prompt_lens=lens,
        emotion_adv=torch.tensor([0.3, 0.5, 0.9, 0.1][:B]),
        instruction_emb=torch.randn(B, CFG.instruction_dim, generator=g) if instruction else None,
        instruction_mask=torch.tensor([True, False, True, True][:B]) if instruction else None,
    )


def _batch(texts=TEXTS, speech=SPEECH, cond=None) -> T3Batch:
    t, tl = pad_sequences(texts)
    s, sl = pad_sequences(speech)
    return T3Batch(t, tl, s, sl, cond if cond is not None else _cond(len(texts)))


# ----------------------------------------------------------------------------------------
# checkpoint key names (the real 520M shape, built on the meta device: no memory, no download)
# ----------------------------------------------------------------------------------------
def test_official_key_names_and_shapes_at_520m():
    with torch.device("meta"):
        m = T3(T3Config.preset("520m", adapters=False))
    sd = m.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["tfmr.embed_tokens.weight"] == (8, 1024)
    assert shapes["text_emb.weight"] == (704, 1024)
    assert shapes["speech_emb.weight"] == (8194, 1024)
    assert shapes["text_pos_emb.emb.weight"] == (2050, 1024)
    assert shapes["speech_pos_emb.emb.weight"] == (4100, 1024)
    assert shapes["text_head.weight"] == (704, 1024) and "text_head.bias" not in sd
    assert shapes["speech_head.weight"] == (8194, 1024) and "speech_head.bias" not in sd
    assert shapes["cond_enc.spkr_enc.weight"] == (1024, 256) and "cond_enc.spkr_enc.bias" in sd
    assert shapes["cond_enc.emotion_adv_fc.weight"] == (1024, 1) and "cond_enc.emotion_adv_fc.bias" not in sd
    assert shapes["cond_enc.perceiver.pre_attention_query"] == (1, 32, 1024)
    for name in ("norm", "to_q", "to_k", "to_v", "proj_out"):
        assert f"cond_enc.perceiver.attn.{name}.weight" in sd and f"cond_enc.perceiver.attn.{name}.bias" in sd
    assert shapes["tfmr.layers.29.input_layernorm.weight"] == (1024,)
    assert "tfmr.layers.30.input_layernorm.weight" not in sd
    assert len(sd) == 9 * 30 + 2 + 20  # 9 per layer, embed_tokens + norm, 20 T3 tensors
    assert 5.2e8 < sum(v.numel() for v in sd.values()) < 5.4e8
    rope = m.llama_config.rope_parameters if hasattr(m.llama_config, "rope_parameters") else m.llama_config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0


def test_adapters_keep_official_norm_keys():
    base, ada = _model(adapters=False), _model(adapters=True)
    official = set(base.state_dict())
    keys = set(ada.state_dict())
    assert official <= keys
    extra = keys - official
    assert extra and all(is_adapter_key(k) for k in extra)
    assert len(extra) == CFG.num_layers * 2 * 4  # fc1/fc2 weight+bias per norm
    norm = ada.tfmr.layers[0].input_layernorm
    assert isinstance(norm, AdaRMSNorm)
    assert ada.state_dict()["tfmr.layers.0.input_layernorm.weight"].data_ptr() == norm.weight.data_ptr()
    assert not isinstance(ada.tfmr.norm, AdaRMSNorm)  # final norm left plain (2 adapters per layer)


# ----------------------------------------------------------------------------------------
# failure mode 5: teacher forcing == KV-cached generation, batched rows of different lengths
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_rows", [False, True])
def test_teacher_forced_logits_equal_kv_cached_generation(cfg_rows):
    model = _model()
    _perturb_adapters(model, scale=0.1)  # adapters active, so the instruction path is covered
    batch = _batch()
    cond = batch.cond
    train = build_layout(CFG, batch.text_tokens, batch.text_lens, batch.speech_tokens, batch.speech_lens)
    gen = build_generation_layout(CFG, batch.text_tokens, batch.text_lens)
    if cfg_rows:
        train, gen, cond = train.with_cfg(), gen.with_cfg(), cond.repeat(2)
    rows = train.batch_size
    with torch.no_grad():
        ccond = cond.to("cpu")
        tf = model.forward_embeds(model.embed_layout(train, ccond), train, ccond).speech_logits
        logits, cache = model.prefill(gen, cond)
        speech = [SPEECH[b % len(SPEECH)] for b in range(rows)]
        checked = 0
        for b in range(rows):  # logits at BOS predict the first speech token
            torch.testing.assert_close(logits[b], tf[b, int(train.speech_start[b])], atol=1e-4, rtol=1e-4)
        for t in range(max(len(s) for s in speech)):
            tokens = torch.tensor([s[t] if t < len(s) else 0 for s in speech])
            logits, cache = model.decode_step(gen, t, tokens, cache, cond)
            for b in range(rows):
                if t < len(speech[b]):
                    col = int(train.speech_start[b]) + 1 + t
                    torch.testing.assert_close(logits[b], tf[b, col], atol=1e-4, rtol=1e-4)
                    checked += 1
    assert checked == sum(len(s) for s in speech)


def test_generate_runs_batched_with_cfg_and_stops():
    model = _model()
    t, tl = pad_sequences(TEXTS)
    cond = _cond()
    out1 = model.generate(t, tl, cond, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    out2 = model.generate(t, tl, cond, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    assert len(out1) == 3 and all(o.dtype == torch.long and o.numel() <= 12 for o in out1)
    assert all((o < CFG.start_speech_token).all() for o in out1)
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    greedy = model.generate(t, tl, cond, max_new_tokens=5, do_sample=False, cfg_weight=0.0)
    assert len(greedy) == 3


# ----------------------------------------------------------------------------------------
# instruction guidance: W = 0 is today's path token for token; W > 0 moves the logits toward cond
# ----------------------------------------------------------------------------------------
def _reference_generate(model, t, tl, cond, n, cfg_weight, seed):
    """Today's sampling loop written out (Chatterbox CFG only), independent of `generate`'s guidance code."""
    from tts_core.t3 import sample_next_token
    from tts_core.t3.model import DEFAULT_SAMPLING

    B = t.shape[0]
    lay = build_generation_layout(CFG, t, tl, cond.prompt_lengths()).with_cfg()
    c2 = cond.repeat(2)
    g = torch.Generator().manual_seed(seed)
    hist = torch.full((B, 1), CFG.start_speech_token)
    with torch.no_grad():
        logits, cache = model.prefill(lay, c2)
        for step in range(n):
            c, u = logits[:B].float(), logits[B:].float()
            nxt = sample_next_token(c + cfg_weight * (c - u), hist, generator=g,
                                    **{k: v for k, v in DEFAULT_SAMPLING.items() if k != "cfg_weight"})
            hist = torch.cat([hist, nxt[:, None]], 1)
            logits, cache = model.decode_step(lay, step, torch.cat([nxt, nxt]), cache, c2)
    return hist[:, 1:]


def test_instruction_guidance_zero_reproduces_todays_tokens():
    model = _model()
    _perturb_adapters(model, scale=0.1)
    t, tl = pad_sequences(TEXTS)
    cond = _cond()
    n = 10
    want = _reference_generate(model, t, tl, cond, n, 0.5, seed=3)
    for w in (None, 0.0):  # the default, and W = 0 given
        kw = {} if w is None else {"instruction_guidance": w}
        got = model.generate(t, tl, cond, max_new_tokens=n, generator=torch.Generator().manual_seed(3), raw=True, **kw)
        for b in range(len(TEXTS)):
            hit = (want[b] == CFG.stop_speech_token).nonzero()
            ref = want[b, : int(hit[0]) + 1] if hit.numel() else want[b]
            assert got[b].tolist() == ref.tolist()


def test_combine_guidance_values():
    from tts_core.t3.layout import guidance_blocks
    from tts_core.t3.model import combine_guidance

    c, ut, ui = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    both = combine_guidance(torch.cat([c, ut, ui]), guidance_blocks(True, True), 0.5, 2.0)
    torch.testing.assert_close(both, c + 0.5 * (c - ut) + 2.0 * (c - ui))  # [-0.5, 6.5]
    assert both.tolist() == [[-0.5, 6.5]]
    only = combine_guidance(torch.cat([c, ui]), guidance_blocks(False, True), 0.0, 2.0)
    torch.testing.assert_close(only, ui + 3.0 * (c - ui))  # uncond + (1 + W)·(cond − uncond)
    assert torch.equal(combine_guidance(torch.cat([c, ut]), guidance_blocks(True, False), 0.5, 0.0),
                       c + 0.5 * (c - ut))  # today's expression, exactly


def test_instruction_guidance_moves_the_first_logits_toward_cond():
    """Greedy, one token, no text CFG: the token is argmax(u + (1 + W)(c − u)) with c from the rows' instruction
    and u from the null instruction (two separate unguided prefills); a large W follows the instruction's
    direction where W = 0 does not."""
    model = _model()
    _perturb_adapters(model, scale=0.5)
    t, tl = pad_sequences(TEXTS)
    cond = _cond()
    lay = build_generation_layout(CFG, t, tl, cond.prompt_lengths())
    with torch.no_grad():
        c = model.prefill(lay, cond)[0].float()
        u = model.prefill(lay, cond.with_null_instruction())[0].float()
    assert not torch.allclose(c[0], u[0]) and torch.equal(c[1], u[1])  # row 1 has its instruction masked
    for w in (0.0, 1.0, 8.0):
        got = model.generate(t, tl, cond, max_new_tokens=1, do_sample=False, cfg_weight=0.0, repetition_penalty=1.0,
                             instruction_guidance=w, raw=True)
        want = (u + (1 + w) * (c - u)).argmax(-1)
        assert [int(g[0]) for g in got] == want.tolist()
    far = (u + 9.0 * (c - u)).argmax(-1)
    assert int(far[0]) != int(c[0].argmax()) or int(far[2]) != int(c[2].argmax())  # W changes the choice
    with pytest.raises(ValueError, match="instruction_guidance"):
        model.generate(t, tl, cond, max_new_tokens=1, instruction_guidance=-1.0)


# ----------------------------------------------------------------------------------------
# padding can never be attended by a real position
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mask", [True, False])
def test_pad_embeddings_do_not_reach_real_positions(padding_mask):
    model = _model()
    batch = _batch()
    with torch.no_grad():
        ref = model(batch)  # with the explicit padding mask
        lay = ref.layout
        cond = batch.cond.to("cpu")
        embeds = model.embed_layout(lay, cond)
        pad = (lay.segment == SEG_PAD)[..., None]
        assert pad.any()
        noisy = torch.where(pad, torch.randn_like(embeds) * 100, embeds)
        out = model.forward_embeds(noisy, lay, cond, padding_mask=padding_mask)
    real = lay.attention_mask.bool()
    torch.testing.assert_close(out.speech_logits[real], ref.speech_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_logits[real], ref.text_logits[real], atol=1e-5, rtol=1e-5)
    if padding_mask:  # same kernel, same inputs at real positions: bit-identical
        assert torch.equal(out.speech_logits[real], ref.speech_logits[real])
    torch.testing.assert_close(out.loss, ref.loss)


def test_each_row_in_a_padded_batch_equals_the_row_alone():
    model = _model()
    _perturb_adapters(model, scale=0.1)
    batch = _batch()
    with torch.no_grad():
        full = model(batch)
        for b in range(len(TEXTS)):
            c = batch.cond
            one = T3Cond(
                speaker_emb=c.speaker_emb[b: b + 1],
                prompt_tokens=c.prompt_tokens[b: b + 1, : int(c.prompt_lens[b])],  # truncated, no mask
                emotion_adv=c.emotion_adv[b: b + 1],
                instruction_emb=c.instruction_emb[b: b + 1],
                instruction_mask=c.instruction_mask[b: b + 1],
            )
            alone = model(_batch([TEXTS[b]], [SPEECH[b]], one))
            n = int(alone.layout.seq_lens[0])
            torch.testing.assert_close(full.speech_logits[b, :n], alone.speech_logits[0], atol=1e-4, rtol=1e-4)


def test_empty_prompt_keeps_34_positions_and_matches_no_prompt():
    model = _model()
    c = _cond()
    with torch.no_grad():
        emb = model.encode_cond(c)
        assert emb.shape == (3, CFG.cond_len, CFG.hidden_size)
        none = model.encode_cond(T3Cond(speaker_emb=c.speaker_emb[2:3], emotion_adv=c.emotion_adv[2:3]))
        assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb[2], none[0])  # row 2 has prompt_lens 0


# ----------------------------------------------------------------------------------------
# loss: next-token with ignore index; all-ignored → graph-keeping zero (failure mode 3)
# ----------------------------------------------------------------------------------------
def test_loss_is_next_token_cross_entropy():
    model = _model().train()
    torch.manual_seed(0)
    out = model(_batch())
    lay = out.layout
    # by hand: logits at column c score the token at column c+1, within the speech segment
    terms = []
    for b in range(lay.batch_size):
        s0, n = int(lay.speech_start[b]), int(lay.seq_lens[b])
        terms.append(F.cross_entropy(out.speech_logits[b, s0: n - 1], lay.token_ids[b, s0 + 1: n], reduction="none"))
    manual = torch.cat(terms).mean()
    torch.testing.assert_close(out.loss_speech, manual)
    # without the shift the loss would differ (BOS would be its own target)
    unshifted = torch.cat([
        F.cross_entropy(out.speech_logits[b, int(lay.speech_start[b]): int(lay.seq_lens[b]) - 1],
                        lay.token_ids[b, int(lay.speech_start[b]): int(lay.seq_lens[b]) - 1], reduction="none")
        for b in range(lay.batch_size)
    ]).mean()
    assert not torch.allclose(unshifted, manual)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_all_ignored_labels_give_zero_loss_with_graph():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = next_token_loss(logits, labels)
    assert loss.item() == 0.0 and loss.grad_fn is not None and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # partially ignored == plain mean CE over the kept positions
    labels[0, 1], labels[1, 3] = 4, 7
    ref = F.cross_entropy(logits[[0, 1], [1, 3]], torch.tensor([4, 7]))
    torch.testing.assert_close(next_token_loss(logits, labels), ref)


# ----------------------------------------------------------------------------------------
# adapters: identity at init, per-row masking, fp32 path, DDP-safe graph
# ----------------------------------------------------------------------------------------
def test_fresh_adapters_reproduce_the_pretrained_model_exactly(tmp_path):
    base = _model(adapters=False, seed=3)
    path = save_t3(base, tmp_path / "t3_cfg.safetensors")
    ada = _model(adapters=True, seed=99)
    load_t3_checkpoint(ada, path)
    batch = _batch()
    no_instr = _batch(cond=_cond(instruction=False))
    with torch.no_grad():
        ref = base(no_instr).speech_logits
        with_instr = ada(batch).speech_logits  # fresh adapters + an instruction on rows 0, 2
        assert torch.equal(with_instr, ref)
        _perturb_adapters(ada)
        changed = ada(batch).speech_logits
    mask = batch.cond.instruction_mask
    real = ada(batch).layout.attention_mask.bool()
    for b in range(len(TEXTS)):
        if mask[b]:
            assert not torch.allclose(changed[b][real[b]], ref[b][real[b]])
        else:
            assert torch.equal(changed[b], ref[b])  # masked row: exactly the pretrained model


def test_instruction_context_is_cleared_and_modulation_is_fp32_under_autocast():
    model = _model()
    _perturb_adapters(model)
    seen = []
    hook = model.tfmr.layers[0].input_layernorm.register_forward_hook(
        lambda mod, inp, out: seen.append(mod._modulation[0].dtype)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch())
    hook.remove()
    assert seen == [torch.float32]
    assert torch.isfinite(out.speech_logits.float()).all()
    assert all(not a.has_instruction for a in model.adapters)


def test_adapter_params_get_gradients_even_without_instructions():
    model = _model().train()
    model(_batch(cond=_cond(instruction=False))).loss.backward()
    for a in model.adapters:
        assert a.adapter.fc1.weight.grad is not None and a.adapter.fc2.weight.grad is not None


def test_gradient_checkpointing_with_adapters_is_refused():
    model = _model().train()
    enable = getattr(model.tfmr, "activation_checkpointing_enable", None) or model.tfmr.gradient_checkpointing_enable
    enable()
    with pytest.raises(NotImplementedError):
        model(_batch())


# ----------------------------------------------------------------------------------------
# failure mode 4: inputs of other dtypes / devices are moved and cast by the model
# ----------------------------------------------------------------------------------------
def test_forward_casts_and_moves_inputs():
    model = _model()
    ref_batch = _batch()
    c = ref_batch.cond
    odd = T3Batch(
        text_tokens=ref_batch.text_tokens.to(torch.int32),
        text_lens=ref_batch.text_lens.tolist(),
        speech_tokens=ref_batch.speech_tokens.to(torch.int16),
        speech_lens=ref_batch.speech_lens.to(torch.int32),
        cond=T3Cond(
            speaker_emb=c.speaker_emb.double(),
            prompt_tokens=c.prompt_tokens.to(torch.int32),
            prompt_lens=c.prompt_lens.tolist(),
            emotion_adv=c.emotion_adv.double(),
            instruction_emb=c.instruction_emb.half().float(),
            instruction_mask=c.instruction_mask.to(torch.uint8),
        ),
    )
    ref_batch.cond.instruction_emb = c.instruction_emb.half().float()
    with torch.no_grad():
        a = model(odd).speech_logits
        b = model(ref_batch).speech_logits
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------
# checkpoints: strict official loading, adapters the only missing keys, atomic save with ties
# ----------------------------------------------------------------------------------------
def _official_file(tmp_path, base: T3):
    """A file exactly like Chatterbox's: plain safetensors, official key names, no metadata."""
    path = tmp_path / "t3_cfg.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return path


def test_strict_loading_of_an_official_checkpoint(tmp_path):
    base = _model(adapters=False, seed=5)
    path = _official_file(tmp_path, base)
    ada = _model(adapters=True, seed=6)
    report = load_t3_checkpoint(ada, path)
    assert len(report.missing_adapter) == CFG.num_layers * 2 * 4
    assert set(report.loaded) == set(base.state_dict())
    assert "extra: 16 adapter params" in report.summary
    for k, v in base.state_dict().items():
        assert torch.equal(ada.state_dict()[k], v), k


def test_loading_refuses_renamed_missing_and_misshapen_keys(tmp_path):
    base = _model(adapters=False)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}

    renamed = dict(state)
    renamed["cond_enc.perceiver.attn.to_query.weight"] = renamed.pop("cond_enc.perceiver.attn.to_q.weight")
    p = tmp_path / "renamed.safetensors"
    save_file(renamed, str(p))
    with pytest.raises(CheckpointMismatchError, match="renamed.safetensors.*\n.*to_query.*to_q"):
        load_t3_checkpoint(_model(), p)

    missing = dict(state)
    del missing["speech_head.weight"]
    p = tmp_path / "missing.safetensors"
    save_file(missing, str(p))
    with pytest.raises(CheckpointMismatchError, match="missing.safetensors.*speech_head.weight"):
        load_t3_checkpoint(_model(), p)

    wrong = dict(state)
    wrong["text_pos_emb.emb.weight"] = torch.zeros(7, CFG.hidden_size)
    p = tmp_path / "wrong.safetensors"
    save_file(wrong, str(p))
    with pytest.raises(CheckpointMismatchError, match="wrong.safetensors.*shape"):
        load_t3_checkpoint(_model(), p)


def test_save_is_atomic_handles_ties_and_round_trips(tmp_path):
    model = _model()
    _perturb_adapters(model)
    model.text_head.weight = model.text_emb.weight  # a tie safetensors alone would refuse
    path = save_t3(model, tmp_path / "ckpt" / "t3.safetensors")
    assert not (tmp_path / "ckpt" / "t3.safetensors.tmp").exists()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert "text_head.weight" not in set(f.keys())
    assert json.loads(meta["tied_weights"]) == {"text_head.weight": "text_emb.weight"}
    assert T3Config.from_dict(json.loads(meta["t3_config"])) == CFG

    other = _model(seed=7)
    other.text_head.weight = other.text_emb.weight
    report = load_t3_checkpoint(other, path)
    assert report.missing_adapter == []
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert other.text_head.weight is other.text_emb.weight
