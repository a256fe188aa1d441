"""The single T3 layout builder: one BOS, contiguous rows, next-token labels, decode-step parity."""
import pytest
import torch

from tts_core.t3 import (
    IGNORE_INDEX,
    SEG_COND,
    SEG_PAD,
    SEG_SPEECH,
    SEG_TEXT,
    T3Config,
    build_generation_layout,
    build_layout,
    pad_sequences,
)

CFG = T3Config.preset("tiny")
C = CFG.cond_len
SOT, EOT, BOS, EOS = CFG.start_text_token, CFG.stop_text_token, CFG.start_speech_token, CFG.stop_speech_token

TEXTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [], [20]]
SPEECH = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], []]


def _train_layout():
    text, tl = pad_sequences(TEXTS)
    speech, sl = pad_sequences(SPEECH)
    return build_layout(CFG, text, tl, speech, sl, append_eos=True)


def _gen_layout():
    text, tl = pad_sequences(TEXTS)
    return build_generation_layout(CFG, text, tl)


def test_cond_len_is_34_for_chatterbox_shape():
    assert T3Config.preset("520m").cond_len == 34
    assert CFG.cond_len == 34  # the tiny preset keeps the same layout


@pytest.mark.parametrize("which", ["train", "generate"])
def test_rows_are_contiguous_with_one_bos_and_padding_only_after(which):
    lay = _train_layout() if which == "train" else _gen_layout()
    for b in range(lay.batch_size):
        n_text = len(TEXTS[b]) + 2
        n_speech = (len(SPEECH[b]) + 2) if which == "train" else 1
        n = C + n_text + n_speech
        expected_seg = [SEG_COND] * C + [SEG_TEXT] * n_text + [SEG_SPEECH] * n_speech
        expected_seg += [SEG_PAD] * (lay.length - n)
        assert lay.segment[b].tolist() == expected_seg  # no pad between text and speech
        assert lay.attention_mask[b].tolist() == [1] * n + [0] * (lay.length - n)
        assert int(lay.seq_lens[b]) == n
        toks = lay.token_ids[b, :n].tolist()
        assert toks.count(BOS) == 1 and toks[C + n_text] == BOS  # exactly one BOS, right after EOT
        assert toks[C] == SOT and toks[C + n_text - 1] == EOT
        assert toks[C + 1: C + n_text - 1] == TEXTS[b]
        if which == "train":
            assert toks[C + n_text + 1: n - 1] == SPEECH[b] and toks[n - 1] == EOS
        else:
            assert toks[-1] == BOS and int(lay.last_index[b]) == C + n_text
        # RoPE positions contiguous over the real tokens; learned positions restart per segment
        assert lay.position_ids[b, :n].tolist() == list(range(n))
        assert lay.seg_pos[b, C: C + n_text].tolist() == list(range(n_text))
        assert lay.seg_pos[b, C + n_text: n].tolist() == list(range(n_speech))


def test_labels_are_next_token_and_shifted_once():
    lay = _train_layout()
    for b in range(lay.batch_size):
        text = [SOT] + TEXTS[b] + [EOT]
        speech = [BOS] + SPEECH[b] + [EOS]
        t0, s0 = C, C + len(text)
        # text column j predicts text token j+1; EOT predicts nothing
        assert lay.text_labels[b, t0: t0 + len(text)].tolist() == text[1:] + [IGNORE_INDEX]
        assert lay.speech_labels[b, s0: s0 + len(speech)].tolist() == speech[1:] + [IGNORE_INDEX]
        # nothing else is labelled: cond, pads, and text↔speech never mix
        tl = lay.text_labels[b].clone()
        tl[t0: t0 + len(text)] = IGNORE_INDEX
        sl = lay.speech_labels[b].clone()
        sl[s0: s0 + len(speech)] = IGNORE_INDEX
        assert (tl == IGNORE_INDEX).all() and (sl == IGNORE_INDEX).all()
    # the shift matters: the first speech label is the first real token, not BOS
    assert int(lay.speech_labels[0, int(lay.speech_start[0])]) == SPEECH[0][0]


def test_decode_steps_reproduce_training_positions():
    train, gen = _train_layout(), _gen_layout()
    assert torch.equal(gen.speech_start, train.speech_start)
    for t in range(max(len(s) for s in SPEECH)):
        tokens = torch.tensor([s[t] if t < len(s) else 0 for s in SPEECH])
        st = gen.decode_step(t, tokens)
        assert st.attention_mask.shape == (gen.batch_size, gen.length + t + 1)
        for b in range(gen.batch_size):
            if t >= len(SPEECH[b]):
                continue
            col = int(train.speech_start[b]) + 1 + t  # column of speech token t in training
            assert int(st.token_ids[b, 0]) == int(train.token_ids[b, col])
            assert int(st.seg_pos[b, 0]) == int(train.seg_pos[b, col])
            assert int(st.position_ids[b, 0]) == int(train.position_ids[b, col])
            assert int(st.segment[b, 0]) == SEG_SPEECH
            # the cache's real entries are exactly the real tokens before it
            assert int(st.attention_mask[b].sum()) == col + 1


def test_cfg_doubles_rows_and_marks_uncond():
    lay = _gen_layout().with_cfg()
    B = len(TEXTS)
    assert lay.batch_size == 2 * B
    assert lay.uncond.tolist() == [False] * B + [True] * B
    assert torch.equal(lay.token_ids[:B], lay.token_ids[B:])
    with pytest.raises(ValueError):
        lay.with_cfg()


@pytest.mark.parametrize(
    "text,speech",
    [([[SOT, 5]], [[1]]), ([[5, EOT]], [[1]]), ([[5]], [[BOS]]), ([[5]], [[EOS]]), ([[5]], [[7000]]), ([[704]], [[1]])],
)
def test_raw_tokens_with_special_or_out_of_range_ids_are_refused(text, speech):
    t, tl = pad_sequences(text)
    s, sl = pad_sequences(speech)
    with pytest.raises(ValueError):
        build_layout(CFG, t, tl, s, sl)


def test_padding_values_beyond_lengths_are_ignored():
    text = torch.tensor([[5, 6, SOT, SOT]])  # junk after the length is never read
    speech = torch.tensor([[1, BOS, EOS]])
    lay = build_layout(CFG, text, torch.tensor([2]), speech, torch.tensor([1]))
    assert lay.token_ids[0, C:].tolist() == [SOT, 5, 6, EOT, BOS, 1, EOS]


# ---- instruction guidance and the stage-2 row kinds --------------------------------------------------------
def test_guidance_blocks_tile_rows_in_order():
    from tts_core.t3.layout import COND, INSTRUCTION_UNCOND, TEXT_UNCOND, guidance_blocks

    assert guidance_blocks(True, True) == (COND, TEXT_UNCOND, INSTRUCTION_UNCOND)
    assert guidance_blocks(False, True) == (COND, INSTRUCTION_UNCOND)
    base = _gen_layout()
    lay = base.with_guidance(text_cfg=True, instruction_cfg=True)
    B = len(TEXTS)
    assert lay.batch_size == 3 * B
    assert lay.uncond.tolist() == [False] * B + [True] * B + [False] * B  # only the text-uncond block zeroes text
    for blk in range(3):
        assert torch.equal(lay.token_ids[blk * B:(blk + 1) * B], base.token_ids)
    assert torch.equal(base.with_cfg().uncond, base.with_guidance(text_cfg=True, instruction_cfg=False).uncond)


def _stage2_data(n_rows: int = 6):
    """An in-memory `Stage2Data`: 2 speakers, every row with an instruction, prompts of its own."""
    import numpy as np

    from tts_core.stage2.data import Stage2Data

    g = torch.Generator().manual_seed(0)
    text = [[5 + r, 6, 7 + r][: 2 + r % 2] for r in range(n_rows)]
    speech = [[(r * 7 + 3 * j) % 6000 for j in range(3 + r % 3)] for r in range(n_rows)]
    prompt = [[(r * 11 + 5 * j) % 6000 for j in range(2 + r % 2)] for r in range(n_rows)]

    def flat(seqs):
        lens = np.array([len(s) for s in seqs])
        return torch.tensor([t for s in seqs for t in s], dtype=torch.int16), np.r_[0, np.cumsum(lens)[:-1]], lens

    (tf, ts, tl), (sf, ss, sl), (pf, ps, pl) = flat(text), flat(speech), flat(prompt)
    return Stage2Data(clip_ids=[f"c{r}" for r in range(n_rows)], text_flat=tf, text_start=ts, text_len=tl,
                      speech_flat=sf, speech_start=ss, speech_len=sl, prompt_flat=pf, prompt_start=ps, prompt_len=pl,
                      spk=torch.nn.functional.normalize(torch.randn(n_rows, 256, generator=g), dim=-1),
                      instruction_id=np.arange(n_rows) % 3, style_emb=torch.randn(3, CFG.instruction_dim, generator=g),
                      mapper_spk=torch.randn(3, 1, 256, generator=g), speaker_code=np.arange(n_rows) % 2)


def test_null_instruction_and_prompt_instruction_rows_teacher_forced_equal_guided_generation():
    """Train/infer parity for the stage-2 row kinds (failure mode 5, docs/architecture.md): rows built by `Stage2Data.build_batch`
    (instruction-only, audio-only, prompt + instruction) and laid out by the one layout module give, teacher-forced,
    the logits that KV-cached generation gives for the same tokens — in a guided batch
    [cond | text-uncond | instruction-uncond]. The instruction-uncond block equals the *training* rows that
    instruction dropout gave the null instruction: the unconditional branch is a row stage 2 trains."""
    import numpy as np

    from tts_core.stage2.mixing import batch_rng
    from tts_core.stage2.row_mix import AUDIO_ONLY, INSTRUCTION_ONLY, PROMPT_INSTRUCTION, RowMix
    from tts_core.t3 import T3

    torch.manual_seed(0)
    model = T3(CFG).eval()
    with torch.no_grad():  # adapters that do something, so a dropped instruction changes the logits
        gen_ = torch.Generator().manual_seed(1)
        for a in model.adapters:
            a.adapter.fc2.weight.copy_(torch.randn(a.adapter.fc2.weight.shape, generator=gen_) * 0.1)
    data = _stage2_data()
    rows = np.arange(len(data))
    mix = RowMix(instruction_prob=0.5, prompt_instruction_prob=0.4, instruction_dropout=0.0)
    gidx = next(i for i in range(100) if set(data.build_batch(rows, mix=mix, rng=batch_rng(0, 0, i), prompt_len=150)
                                             .kind.tolist()) == {AUDIO_ONLY, INSTRUCTION_ONLY, PROMPT_INSTRUCTION})
    kept = data.build_batch(rows, mix=mix, rng=batch_rng(0, 0, gidx), prompt_len=150)
    dropped = data.build_batch(rows, mix=RowMix(0.5, 0.4, instruction_dropout=1.0), rng=batch_rng(0, 0, gidx),
                               prompt_len=150)
    on = kept.kind != AUDIO_ONLY
    assert dropped.null_instruction.tolist() == on.tolist() and (dropped.kind == kept.kind).all()
    with torch.no_grad():
        tf_kept = model(kept.batch).speech_logits
        tf_null = model(dropped.batch).speech_logits
        b = kept.batch
        text_lay, text_cond = model(b).layout.with_cfg(), b.cond.repeat(2).to("cpu")  # Chatterbox's text CFG rows
        tf_text = model.forward_embeds(model.embed_layout(text_lay, text_cond), text_lay, text_cond)
        tf_text = tf_text.speech_logits[len(rows):]
        # the dropped instruction changes instruction rows only
        for i in range(len(rows)):
            differs = not torch.allclose(tf_kept[i], tf_null[i])
            assert differs == bool(on[i])

        train = model(b).layout
        gen = build_generation_layout(CFG, b.text_tokens, b.text_lens, b.cond.prompt_lengths())
        gen = gen.with_guidance(text_cfg=True, instruction_cfg=True)
        cond = b.cond.guidance_rows(True, True)
        B = len(rows)
        want = torch.cat([tf_kept, tf_text, tf_null])  # [cond | text-uncond | instruction-uncond]
        speech = [data.speech_tokens_of(r).tolist() for r in rows]
        logits, cache = model.prefill(gen, cond)
        checked = 0
        for r in range(3 * B):
            torch.testing.assert_close(logits[r], want[r, int(train.speech_start[r % B])], atol=1e-4, rtol=1e-4)
        for t in range(max(map(len, speech))):
            tokens = torch.tensor([s[t] if t < len(s) else 0 for s in speech] * 3)
            logits, cache = model.decode_step(gen, t, tokens, cache, cond)
            for r in range(3 * B):
                if t < len(speech[r % B]):
                    col = int(train.speech_start[r % B]) + 1 + t
                    torch.testing.assert_close(logits[r], want[r, col], atol=1e-4, rtol=1e-4)
                    checked += 1
    assert checked == 3 * sum(map(len, speech))
