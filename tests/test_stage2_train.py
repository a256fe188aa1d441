"""Stage 2 as a library: tokenizers, data preparation + mixing, bucketing/sharding, freezing, loss,
resume after a kill, identity refusal. Tiny real store + tiny stage-1 checkpoint + tiny T3, CPU only."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cache import schema
from chatterbox_files import write_en_tokenizer
from cache.reader import CacheReader
from cache.writer import CacheWriter, ClipBatch
from tts_core.identity import ModelIdentity
from tts_core.mapper import InstructionEncoder, InstructionMapper, MapperConfig, TextEncoderMismatchError
from tts_core.stage1.artifacts import Stage1Model, load_mapper, save_checkpoint
from tts_core.stage2 import (
    BucketBatchSampler, ByteTextTokenizer, ChatterboxTextTokenizer, Stage2Config, Stage2Model,
    Stage2NonFiniteError, TextTokenizerError, batch_rng, build_t3, load_text_tokenizer, prepare_stage2_data,
    train_stage2,
)
from tts_core.seeds import mix_seed
from tts_core.stage2.row_mix import RowMix
from tts_core.t3 import T3, T3Config, save_t3

H = 16  # text-encoder hidden size of the tiny store
N_ROWS = 40
QUARANTINED = 10
NO_INSTRUCTION = (33, 34)
TE = ModelIdentity("tiny-text-encoder (test)", "a" * 64)
MODELS = {"voice_encoder": ModelIdentity("ve", "1" * 64), "xvector": ModelIdentity("xv", "2" * 64),
          "speech_tokenizer": ModelIdentity("s3", "3" * 64), "text_encoder": TE}
VIET = "Xin chào thế giới, tiếng Việt có dấu: ệ ở ữ"


def _speaker(i: int) -> str:
    return f"s{i % 5}" if i < 35 else ""


def _prompt(tokens: np.ndarray) -> np.ndarray:
    """The store's prompt tokens of a clip: unlike its first speech tokens, as tokens of a 6 s cut of a
    longer clip are (cache.schema PROMPT_TOKENS); stage 2 must read these, not crop the speech tokens."""
    return ((tokens[::-1] + 7) % 6561)[:6]


def _build_store(url: str) -> None:
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(5, 256)).astype(np.float32)
    status = np.full(N_ROWS, schema.STATUS_OK, np.int8)
    status[QUARANTINED] = schema.STATUS_QUARANTINED
    ok = status == schema.STATUS_OK
    spk = np.stack([centroids[i % 5] + 0.3 * rng.normal(size=256) for i in range(N_ROWS)]).astype(np.float32)
    spk *= ok[:, None]
    xv = (10 * rng.normal(size=(N_ROWS, 192))).astype(np.float32) * ok[:, None]
    iid = np.array([-1 if (i in NO_INSTRUCTION or not ok[i]) else i % 6 for i in range(N_ROWS)], np.int32)
    # structured speech: a speaker-specific arithmetic pattern (learnable), 8..14 tokens
    toks = [((i % 5) * 100 + 3 * np.arange(8 + i % 7)) % 6561 if ok[i] else np.zeros(0, int) for i in range(N_ROWS)]
    texts = [VIET if i == 7 else f"hello number {i % 4} world" for i in range(N_ROWS)]
    man = pd.DataFrame({
        "row": np.arange(N_ROWS), "clip_id": [f"c{i:03d}" for i in range(N_ROWS)],
        "audio_path": [f"c{i}.wav" for i in range(N_ROWS)], "transcript": texts,
        "instruction": [f"instruction {int(k)}" if k >= 0 else "" for k in iid],
        "speaker": [_speaker(i) for i in range(N_ROWS)], "instruction_id": iid,
        "status": [schema.STATUS_NAMES[int(s)] for s in status], "reason": ["" if o else "too_short" for o in ok],
        "detail": "", "duration": 1.0, "line": np.arange(N_ROWS) + 1})
    w = CacheWriter.open_for_build(url, n_rows=N_ROWS, n_instructions=6, lines_digest="d", prefix_digest=None,
                                   models=MODELS, normalisation=schema.Normalisation(), text_hidden_size=H)
    w.append_instruction_states(0, [rng.normal(size=(3 + k % 4, H)).astype(np.float32) for k in range(6)])
    w.write_clip_batch(ClipBatch(0, spk, xv, np.ones(N_ROWS, np.float32), iid, status, toks, man,
                                 [_prompt(t) for t in toks]))
    w.finalize()


def _save_stage1(path, identity: ModelIdentity, seed: int = 0, **meta):
    torch.manual_seed(seed)
    enc = InstructionEncoder(H, n_heads=4)
    mapper = InstructionMapper(MapperConfig(cond_dim=H, hidden_dim=32, n_blocks=2, n_steps=4, draws=1, temperature=0.3))
    with torch.no_grad():  # give the zero-initialised layers weights, so the output depends on the instruction
        for p in mapper.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(Stage1Model(enc, mapper), path, {"text_encoder": identity.to_dict(), **meta})
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    url = str(root / "store.zarr")
    _build_store(url)
    s1 = _save_stage1(root / "stage1", TE)
    return {"root": root, "store": url, "stage1": str(s1)}


def _cfg(env, out, **kw) -> Stage2Config:
    base = dict(store=env["store"], mapper_dir=env["stage1"], t3="tiny", out_dir=str(out), batch_size=8, lr=3e-3,
                warmup_steps=2, epochs=100, max_steps=6, save_every=0, log_every=1, seed=0, device="cpu")
    base.update(kw)
    return Stage2Config.from_dict(base)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- tokenizers ---------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_vietnamese():
    tok = ByteTextTokenizer()
    ids = tok.encode(VIET)
    assert all(256 <= i < 512 for i in ids) and tok.vocab_size == 512 <= 704
    assert tok.decode(ids) == VIET
    assert tok.encode(unicodedata.normalize("NFD", VIET)) == ids  # same visible text, same ids
    assert len(ids) > len(VIET)  # multi-byte characters
    tok.check_fits(704, 255, 0)
    assert load_text_tokenizer("bytes").identity == tok.identity
    assert load_text_tokenizer(None).identity == tok.identity  # the embedded default


def test_chatterbox_tokenizer_json_loads_and_matches_en_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    p = write_en_tokenizer(tmp_path / "tokenizer.json")
    tok = ChatterboxTextTokenizer.from_file(p, punc_norm=False)
    text = "hello world 42"
    ids = tok.encode(text)
    # EnTokenizer.encode: spaces → "[SPACE]", then the HF tokenizer
    assert ids == Tokenizer.from_file(str(p)).encode(text.replace(" ", "[SPACE]")).ids
    assert tok.space_id in ids and 0 not in ids and 255 not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "he"]) == [ids, tok.encode("he")]
    tok.check_fits(704, 255, 0)
    normed = ChatterboxTextTokenizer.from_file(p)  # default: Chatterbox's punc_norm first
    assert normed.decode(normed.encode("hello world")) == "Hello world."
    assert isinstance(load_text_tokenizer(None, t3_dir=tmp_path), ChatterboxTextTokenizer)
    bad = write_en_tokenizer(tmp_path / "other.json", start_id=100)
    with pytest.raises(TextTokenizerError, match="does not belong to this T3"):
        ChatterboxTextTokenizer.from_file(bad).check_fits(704, 255, 0)


# ---- sampler --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [0, 400])
def test_sampler_covers_each_row_once_per_epoch_on_any_world_size(max_tokens):
    rng = np.random.default_rng(1)
    lengths = rng.integers(40, 200, size=203)
    s = BucketBatchSampler(lengths, batch_size=8, max_tokens=max_tokens, pool_batches=4, seed=3)
    assert [b.tolist() for b in s.batches(0)] == [b.tolist() for b in
                                                 BucketBatchSampler(lengths, batch_size=8, max_tokens=max_tokens,
                                                                    pool_batches=4, seed=3).batches(0)]
    assert [b.tolist() for b in s.batches(0)] != [b.tolist() for b in s.batches(1)]
    if max_tokens:
        assert all(len(b) * lengths[b].max() <= max_tokens or len(b) == 1 for b in s.batches(0))
    for world in (1, 2, 3):
        seen, pos, steps = [], 0, 0
        while pos < len(s.batches(0)):
            for r in range(world):
                _, rows, w = s.rank_batch(0, pos, r, world)
                if w:
                    seen.extend(rows.tolist())
            pos += world
            steps += 1
        assert sorted(seen) == list(range(len(lengths)))  # each row exactly once
        assert steps == s.steps_in_epoch(0, world)
    # bucketing pays far less padding than random batches
    rand_pad = 1 - lengths.sum() / sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(203), 26))
    assert s.padding_stats(0)["pad_frac"] < rand_pad / 2


# ---- data + mixing -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(env):
    reader = CacheReader(env["store"])
    encoder, mapper, meta = load_mapper(env["stage1"])
    data = prepare_stage2_data(reader, ByteTextTokenizer(), encoder, mapper, mapper_meta=meta, mapper_samples=2)
    return reader, encoder, mapper, data


def test_precomputed_tables_are_exact(prepared):
    reader, encoder, mapper, data = prepared
    assert len(data) == N_ROWS - 1 and data.dropped["no_speech_tokens"] == 0
    for u in range(6):
        (states,) = reader.instruction_states([u])
        states16 = torch.from_numpy(states).to(torch.float16)[None]
        style = encoder.reference_forward(states16, torch.tensor([len(states)]))
        torch.testing.assert_close(data.style_emb[u], style[0], rtol=1e-5, atol=1e-6)
    # all instructions at once vs one at a time: same noise per instruction, same vectors
    g = torch.Generator().manual_seed(mix_seed(0, "mapper-sample", 1))
    noise = torch.randn((6, mapper.config.dim), generator=g)
    spk3, _ = mapper.inference(data.style_emb[3:4], n_steps=4, noise=noise[3:4])
    torch.testing.assert_close(data.mapper_spk[3, 1], spk3[0])
    assert not torch.allclose(data.mapper_spk[0, 0], data.mapper_spk[1, 0])
    tok = ByteTextTokenizer()
    man = reader.ok_manifest
    for r in (0, 6):
        assert data.text_tokens_of(r).tolist() == tok.encode(man.transcript[r])
        np.testing.assert_array_equal(data.speech_tokens_of(r), reader.speech_tokens(r))
        np.testing.assert_array_equal(data.prompt_tokens_of(r), _prompt(reader.speech_tokens(r)))
        assert data.prompt_tokens_of(r).tolist() != data.speech_tokens_of(r)[:6].tolist()


def test_tables_of_some_instructions_equal_the_full_tables_there(prepared):
    """An evaluation that needs a few instructions of a big store computes only theirs (`ids`): the same vectors
    as the full tables (same per-instruction noise), zeros elsewhere."""
    from tts_core.stage2.prepare import compute_instruction_tables

    reader, encoder, mapper, data = prepared
    ids = np.array([4, 1, 4])
    style, spk = compute_instruction_tables(reader, encoder, mapper, mapper_samples=2, ids=ids)
    torch.testing.assert_close(style[[1, 4]], data.style_emb[[1, 4]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(spk[[1, 4]], data.mapper_spk[[1, 4]], rtol=1e-5, atol=1e-6)
    others = [u for u in range(data.style_emb.shape[0]) if u not in (1, 4)]
    assert not style[others].any() and not spk[others].any() and data.mapper_spk[others].abs().sum() > 0


def test_turbo_rows_read_the_15_second_prompts(env, prepared):
    """A Turbo T3 (prompt = the reference's first 15 s, ≤ 375 tokens) reads the store's second prompt array,
    not the 6 s one: here the test store's 15 s prompts are the clips' own tokens (they are shorter than
    15 s), its 6 s prompts something else (`_prompt`)."""
    reader, encoder, mapper, data6 = prepared
    meta = load_mapper(env["stage1"])[2]
    data15 = prepare_stage2_data(reader, ByteTextTokenizer(), encoder, mapper, mapper_meta=meta, mapper_samples=2,
                                 prompt_seconds=15.0)
    assert (data6.meta["prompt_seconds"], data15.meta["prompt_seconds"]) == (6.0, 15.0)
    for r in (0, 6):
        np.testing.assert_array_equal(data15.prompt_tokens_of(r, 375), reader.speech_tokens(r))
        np.testing.assert_array_equal(data6.prompt_tokens_of(r, 375), _prompt(reader.speech_tokens(r)))
    with pytest.raises(ValueError, match="prompts of the first"):
        prepare_stage2_data(reader, ByteTextTokenizer(), encoder, mapper, mapper_meta=meta, prompt_seconds=10.0)


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_mixing_ratio_and_per_row_contents(prepared, p):
    reader, _, _, data = prepared
    gt = F.normalize(torch.from_numpy(reader.spk_emb(raw=True)), dim=-1)
    speakers = reader.ok_manifest.speaker.tolist()
    rows = np.arange(len(data))
    n_inst = n_elig = 0
    for step in range(150):
        b = data.build_batch(rows, mix=RowMix.core(p), rng=batch_rng(0, 0, step), prompt_len=5)
        inst = b.instruction_only.numpy()
        elig = data.instruction_id >= 0
        assert not inst[~elig].any()  # rows without an instruction are always audio-only
        n_inst += int(inst[elig].sum())
        n_elig += int(elig.sum())
        if step >= 3:
            continue
        c = b.batch.cond
        for i, r in enumerate(rows):
            if inst[i]:
                u, k = data.instruction_id[r], b.mapper_k[i]
                assert int(c.prompt_lens[i]) == 0 and bool(c.instruction_mask[i])
                torch.testing.assert_close(c.speaker_emb[i], data.mapper_spk[u, k])
                torch.testing.assert_close(c.instruction_emb[i], data.style_emb[u])
            else:
                assert not bool(c.instruction_mask[i]) and not c.instruction_emb[i].any()
                torch.testing.assert_close(c.speaker_emb[i], gt[r])
                src = b.prompt_src[i]
                if speakers[r]:
                    assert src != r and speakers[src] == speakers[r]  # another clip of the same speaker
                else:
                    assert src == r  # no speaker label: the clip's own first tokens
                want = data.prompt_tokens_of(src, 5)
                assert want.tolist() == _prompt(data.speech_tokens_of(src))[:5].tolist()  # the stored 6 s prompt
                assert int(c.prompt_lens[i]) == len(want) == 5
                assert c.prompt_tokens[i, :5].tolist() == want.tolist()
            assert b.batch.speech_tokens[i, : data.speech_len[r]].tolist() == data.speech_tokens_of(r).tolist()
    frac = n_inst / n_elig
    assert abs(frac - p) < 0.03, frac
    again = data.build_batch(rows, mix=RowMix.core(p), rng=batch_rng(0, 0, 1), prompt_len=5)
    first = data.build_batch(rows, mix=RowMix.core(p), rng=batch_rng(0, 0, 1), prompt_len=5)
    assert torch.equal(again.batch.cond.speaker_emb, first.batch.cond.speaker_emb)  # seeded per batch


def test_prompt_instruction_rows_and_null_instruction_rows(prepared):
    """The row-kind refinements: prompt + instruction rows take prompt *and* speaker embedding from another clip of
    the same speaker with the instruction on; dropped rows keep everything but get the null instruction; the older
    draws are unchanged (with both shares at 0 a batch is what it was before them); shares match `RowMix.shares`."""
    from tts_core.stage2.row_mix import AUDIO_ONLY, INSTRUCTION_ONLY, PROMPT_INSTRUCTION

    reader, _, _, data = prepared
    gt = F.normalize(torch.from_numpy(reader.spk_emb(raw=True)), dim=-1)
    speakers = reader.ok_manifest.speaker.tolist()
    rows = np.arange(len(data))
    elig = data.instruction_id >= 0
    counts = np.zeros(3)
    n_on = n_null = 0
    for step in range(150):
        base = data.build_batch(rows, mix=RowMix.core(0.5), rng=batch_rng(0, 0, step), prompt_len=5)
        b = data.build_batch(rows, mix=RowMix(0.5, prompt_instruction_prob=0.3, instruction_dropout=0.25),
                             rng=batch_rng(0, 0, step), prompt_len=5)
        kind, c = b.kind, b.batch.cond
        assert (kind[~elig] == AUDIO_ONLY).all() and not b.null_instruction[~elig].any()
        same = kind != PROMPT_INSTRUCTION  # every other row is the row it was without the refinements
        assert (base.kind[same] == kind[same]).all()
        torch.testing.assert_close(c.speaker_emb[torch.from_numpy(same)], base.batch.cond.speaker_emb[torch.from_numpy(same)])
        counts += np.bincount(kind[elig], minlength=3)
        on = kind != AUDIO_ONLY
        n_on += int(on.sum())
        n_null += int(b.null_instruction.sum())
        assert (c.instruction_mask.numpy() == (on & ~b.null_instruction)).all()
        assert b.instruction_only.numpy().tolist() == (kind == INSTRUCTION_ONLY).tolist()
        if step >= 3:
            continue
        for i, r in enumerate(rows):
            if kind[i] == PROMPT_INSTRUCTION:
                src = b.prompt_src[i]
                if speakers[r]:
                    assert src != r and speakers[src] == speakers[r]
                torch.testing.assert_close(c.speaker_emb[i], gt[src])  # the reference clip's own embedding
                assert c.prompt_tokens[i, :5].tolist() == data.prompt_tokens_of(src, 5).tolist()
                torch.testing.assert_close(c.instruction_emb[i], data.style_emb[data.instruction_id[r]])
            if b.null_instruction[i]:  # null instruction: the embedding stays, the mask turns the adapters off
                assert kind[i] != AUDIO_ONLY and not bool(c.instruction_mask[i]) and c.instruction_emb[i].any()
    shares = counts / counts.sum()
    want = RowMix(0.5, 0.3, 0.25).shares()
    assert abs(shares[PROMPT_INSTRUCTION] - want["prompt + instruction"]) < 0.03, shares
    assert abs(shares[INSTRUCTION_ONLY] - want["instruction-only"]) < 0.03, shares
    assert abs(n_null / n_on - 0.25) < 0.03
    core = RowMix.core(0.5).shares()
    assert core["instruction-only"] == core["audio-only"] == 0.5  # the design card's 50/50 core


def test_each_row_kind_is_logged_under_its_own_name(prepared):
    """A batch of each row kind: its rows are named as that kind (the null instruction as such), and its loss lands
    in that kind's segment of the logged statistics — instruction-only rows under ``*_instruction_only``, audio-only
    and prompt + instruction rows (both with a reference prompt) under ``*_with_prompt``."""
    from tts_core.stage2.metrics import STAT_NAMES
    from tts_core.stage2.row_mix import (
        AUDIO_ONLY, INSTRUCTION_ONLY, PROMPT_INSTRUCTION, SEGMENTS, segment_key, segment_of,
    )

    _, _, _, data = prepared
    rows = np.flatnonzero(data.instruction_id >= 0)[:8]
    t3, _, _ = build_t3("tiny", instruction_dim=H)
    model = Stage2Model(t3.eval())
    cases = {("audio-only", AUDIO_ONLY): RowMix.core(0.0), ("instruction-only", INSTRUCTION_ONLY): RowMix.core(1.0),
             ("prompt + instruction", PROMPT_INSTRUCTION): RowMix(0.5, 1.0, instruction_dropout=0.0),
             ("instruction-only (null instruction)", INSTRUCTION_ONLY): RowMix(1.0, 0.0, instruction_dropout=1.0),
             ("prompt + instruction (null instruction)", PROMPT_INSTRUCTION): RowMix(0.5, 1.0, 1.0)}
    for (name, kind), mix in cases.items():
        b = data.build_batch(rows, mix=mix, rng=batch_rng(0, 0, 0), prompt_len=5)
        assert (b.kind == kind).all() and b.row_names == [name] * len(rows), (name, b.row_names)
        with torch.no_grad():
            stats = dict(zip(STAT_NAMES, model(b.batch, b.instruction_only)[1].tolist()))
        for head in ("text", "speech"):
            for seg in SEGMENTS:
                counted = stats[f"n_{segment_key(head, seg)}"] > 0
                assert counted == (seg == segment_of(kind)), (name, head, seg)
        assert stats["n_instruction_only_rows"] == (len(rows) if kind == INSTRUCTION_ONLY else 0)


def test_row_mix_validates_and_keeps_its_flat_names():
    from tts_core.stage2.row_mix import RowMix

    with pytest.raises(ValueError, match="instruction_dropout must lie in"):
        RowMix(instruction_dropout=1.5)
    cfg = Stage2Config.from_dict({"instruction_prob": 0.3, "instruction_dropout": 0.0})
    assert cfg.row_mix == RowMix(0.3, RowMix().prompt_instruction_prob, 0.0) and not cfg.row_mix.null_instruction
    d = cfg.to_dict()
    assert "row_mix" not in d and {k: d[k] for k in RowMix.KEYS} == cfg.row_mix.to_dict()
    assert Stage2Config.from_dict(d) == cfg
    assert list(RowMix(0.5, 0.2, 0.1).shares()) == [
        "instruction-only", "audio-only", "prompt + instruction", "null instruction (of instruction-on rows)",
        "null instruction (of rows with an instruction)"]


def test_stage2_model_loss_equals_t3_forward(prepared):
    _, encoder, _, data = prepared
    t3, _, _ = build_t3("tiny", instruction_dim=H)
    t3.eval()  # no perceiver dropout: the two forwards must see the same network
    b = data.build_batch(np.arange(12), mix=RowMix.core(0.5), rng=batch_rng(0, 0, 0))
    ref = t3(b.batch)
    loss, stats = Stage2Model(t3)(b.batch, b.instruction_only)
    torch.testing.assert_close(loss, ref.loss)
    torch.testing.assert_close(stats[1:3], torch.stack([ref.loss_text, ref.loss_speech]))
    # the per-segment sums add up to the totals
    n_text = stats[4] + stats[6]
    torch.testing.assert_close((stats[3] + stats[5]) / n_text, ref.loss_text)


# ---- training -----------------------------------------------------------------------------------------------------
def test_training_freezes_stage1_trains_t3_and_loss_decreases(env, tmp_path):
    fresh = _state(build_t3("tiny", instruction_dim=H, seed=0)[0])
    enc0, map0, _ = load_mapper(env["stage1"])
    res = train_stage2(_cfg(env, tmp_path / "run", max_steps=40, instruction_prob=0.5, log_every=2))
    assert res.global_step == 40 and res.stopped_reason == "max_steps" and res.nonfinite_steps == 0
    # frozen: stage-1 modules untouched, not trainable
    for mod, ref in ((res.encoder, enc0), (res.mapper, map0)):
        assert not any(p.requires_grad for p in mod.parameters())
        for (k, v), (_, w) in zip(mod.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(v.cpu(), w), k
    # trainable: every group moved; the unused tfmr.embed_tokens is frozen
    assert set(res.trainable) == {"backbone", "adapters", "embeddings", "heads", "cond_enc"}
    assert all(n > 0 for n in res.trainable.values())
    assert res.frozen["instruction_encoder"] > 0 and res.frozen["mapper"] > 0
    after = res.t3.state_dict()
    changed = {k for k in fresh if not torch.equal(fresh[k], after[k].cpu())}
    for prefix in ("tfmr.layers.0.self_attn", "tfmr.layers.1.input_layernorm.adapter.fc1",
                   "tfmr.layers.0.post_attention_layernorm.adapter.fc2", "speech_emb", "text_emb", "speech_head",
                   "text_head", "cond_enc.spkr_enc", "cond_enc.perceiver"):
        assert any(k.startswith(prefix) for k in changed), prefix
    assert "tfmr.embed_tokens.weight" not in changed
    # loss goes down on this tiny, structured data, for both kinds of rows
    h = res.history
    assert len(h) == 20 and all(r["text_instruction_only"] is not None and r["speech_with_prompt"] is not None
                                for r in h[-5:])
    first, last = np.mean([r["loss"] for r in h[:2]]), np.mean([r["loss"] for r in h[-2:]])
    # last / first measured 0.25…0.28 for seeds 0-4 at 1 thread and seeds 0-1 at 2 threads: 0.6 holds with room
    assert last < 0.6 * first, (first, last)
    assert 0.2 < np.mean([r["instruction_only_frac"] for r in h]) < 0.8
    # outputs: published checkpoint is a valid --t3 source (adapters included: nothing extra)
    out = tmp_path / "run"
    assert (out / "report.md").read_text().count("| adapters |") == 1 and (out / "loss_curves.png").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 20
    meta = json.loads((out / "stage2.json").read_text())
    assert meta["tokenizer"]["kind"] == "bytes" and meta["instruction_dim"] == H and meta["prompt_len"] == 150
    # S3 tokens (no embedded tokenizer in this store): the preset keeps Chatterbox's speech table
    assert meta["speech_vocab"] == {"size": 8194, "start": 6561, "stop": 6562, "sized_to": None}
    assert "speech vocabulary: 8194 rows (codes 0–6560, BOS 6561, EOS 6562); Chatterbox's speech table" in \
        (out / "report.md").read_text()
    t3b, rep, _ = build_t3(str(out), instruction_dim=H)
    assert rep.missing_adapter == []
    for k, v in t3b.state_dict().items():
        assert torch.equal(v, after[k].cpu()), k
    assert load_text_tokenizer(None, t3_dir=out).identity == ByteTextTokenizer().identity


# every row kind in the resumed runs: the refinements' draws must resume bit-identically too
_MIX = dict(prompt_instruction_prob=0.25, instruction_dropout=0.3)


@pytest.fixture(scope="module")
def straight_run(env, tmp_path_factory):
    """6 steps uninterrupted, checkpoints at 2, 4, 6: what every interrupted run below must end with."""
    torch.set_num_threads(1)
    return train_stage2(_cfg(env, tmp_path_factory.mktemp("straight"), max_steps=6, save_every=2, **_MIX))


class Killed(BaseException):
    """A kill, as far as the loop can tell: not an Exception, so nothing in the loop handles it."""


def _interrupt_at(monkeypatch, what: str, n: int) -> None:
    """At the n-th training forward (mid-step), the n-th resume-state write (half-written) or the n-th
    ``latest.json`` update (checkpoint directory renamed into place, pointer not yet moved): raise Killed —
    or, for "ctrl-c", deliver SIGINT and let the loop stop at the step boundary."""
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    if what in ("step", "ctrl-c"):
        orig = Stage2Model.forward

        def forward(self, *a, **kw):
            out = orig(self, *a, **kw)
            if hit():
                if what == "ctrl-c":
                    signal.raise_signal(signal.SIGINT)
                else:
                    raise Killed
            return out

        monkeypatch.setattr(Stage2Model, "forward", forward)
    elif what == "save":
        orig_save = torch.save

        def save(obj, f, *a, **kw):
            if hit():
                Path(f).write_bytes(b"half a checkpoint")
                raise Killed
            orig_save(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", save)
    elif what == "latest":
        import tts_core.training.runs as runs  # where the checkpoint pointer is moved

        orig_json = runs.atomic_write_json

        def write_json(path, obj):
            if Path(path).name == "latest.json" and hit():
                raise Killed
            orig_json(path, obj)

        monkeypatch.setattr(runs, "atomic_write_json", write_json)


@pytest.mark.parametrize("what,n", [("step", 3), ("save", 2), ("latest", 2), ("ctrl-c", 3)],
                         ids=["step3-between-checkpoints", "checkpoint-write", "before-latest-moves", "ctrl-c"])
def test_interrupted_anywhere_resumes_to_the_uninterrupted_weights(env, tmp_path, straight_run, monkeypatch, what, n):
    """Interrupted at any point and rerun: every tensor equals the uninterrupted run's (CPU, one thread)."""
    from tts_core.interrupt import TrainingInterrupted, stop_after_step

    cfg = _cfg(env, tmp_path / "run", max_steps=6, save_every=2, **_MIX)
    with monkeypatch.context() as m, stop_after_step():
        _interrupt_at(m, what, n)
        with pytest.raises(TrainingInterrupted if what == "ctrl-c" else Killed) as exc:
            train_stage2(cfg)
    if what == "ctrl-c":  # a checkpoint at the step where Ctrl-C arrived, named in the message
        assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 3
        assert "stopped at step 3" in str(exc.value) and "step_00000003" in str(exc.value)
    res = train_stage2(cfg)
    assert res.global_step == 6
    sa, sb = straight_run.t3.state_dict(), res.t3.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in res.history] == [r["loss"] for r in straight_run.history]  # re-logged, not doubled
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_resume_after_an_error_in_a_callback_is_bit_identical(env, tmp_path, straight_run):
    class Stop(RuntimeError):
        pass

    def fail_at_5(row):
        if row["step"] == 5:
            raise Stop

    cfg_b = _cfg(env, tmp_path / "b", max_steps=6, save_every=2, **_MIX)
    with pytest.raises(Stop):
        train_stage2(cfg_b, on_log=fail_at_5)
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 4
    b = train_stage2(cfg_b)
    assert b.global_step == 6
    sa, sb = straight_run.t3.state_dict(), b.t3.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in straight_run.history] == [r["loss"] for r in b.history]
    with pytest.raises(ValueError, match="another run"):
        train_stage2(_cfg(env, tmp_path / "b", max_steps=8, save_every=2, seed=1, **_MIX))
    with pytest.raises(ValueError, match="prompt_instruction_prob"):  # the mix defines the run
        train_stage2(_cfg(env, tmp_path / "b", max_steps=8, save_every=2, **{**_MIX, "prompt_instruction_prob": 0.5}))


def test_mapper_trained_on_another_text_encoder_is_refused(env, tmp_path):
    other = _save_stage1(tmp_path / "stage1_other", ModelIdentity("another-text-encoder", "b" * 64))
    with pytest.raises(TextEncoderMismatchError, match="stage 2 refuses"):
        train_stage2(_cfg(env, tmp_path / "run", mapper_dir=str(other)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_only_a_fresh_preset_is_sized_to_the_speech_codes_and_a_resume_keeps_its_record(env, tmp_path):
    """`build_t3` sizes a preset's speech table to ``speech_codes`` (V + 2 rows, BOS V, EOS V + 1) and nothing else;
    the recipe asks for the store's codes on a fresh start, and for what the checkpoint records on a resume."""
    from types import SimpleNamespace

    from tts_core.stage2.artifacts import LATEST, T3_WEIGHTS, TRAIN_STATE
    from tts_core.stage2.recipe import Stage2Recipe
    from tts_core.training import CheckpointDir, DistEnv

    sized, _, _ = build_t3("tiny", instruction_dim=H, speech_codes=1000)
    assert (sized.cfg.speech_vocab_size, sized.cfg.start_speech_token, sized.cfg.stop_speech_token) == (1002, 1000, 1001)
    assert sized.speech_head.weight.shape[0] == sized.speech_emb.weight.shape[0] == 1002
    assert sized.cfg.speech_codes == 1000 and T3Config.preset("tiny").speech_codes is None
    plain, _, _ = build_t3("tiny", instruction_dim=H)
    assert plain.speech_head.weight.shape[0] == 8194 and plain.cfg.start_speech_token == 6561
    # an official file keeps its shape whatever the store's tokenizer
    src = tmp_path / "chatterbox"
    save_t3(T3(T3Config.preset("tiny", adapters=False)), src / "t3_cfg.safetensors")
    official, _, _ = build_t3(str(src), instruction_dim=H, speech_codes=1000)
    assert official.speech_head.weight.shape[0] == 8194 and official.cfg.stop_speech_token == 6562
    # our own checkpoint keeps the shape it recorded, sized or not
    save_t3(sized, tmp_path / "own" / T3_WEIGHTS, config=sized.cfg)
    own, _, _ = build_t3(str(tmp_path / "own"), instruction_dim=H, speech_codes=None)
    assert own.speech_head.weight.shape[0] == 1002 and own.cfg.start_speech_token == 1000

    def recipe(out, resume=True):
        r = Stage2Recipe(_cfg(env, out, resume=resume), None, DistEnv(), torch.device("cpu"))
        r.speech_tokenizer = SimpleNamespace(vocab_size=1000, kind="mel-vq")  # as if the store were embedded
        return r

    def checkpoint(out, t3):
        def fill(d):
            save_t3(t3, d / T3_WEIGHTS, config=t3.cfg)
            (d / TRAIN_STATE).write_bytes(b"")
        CheckpointDir(out, LATEST, complete=(TRAIN_STATE, T3_WEIGHTS)).write(2, fill, 1)

    assert recipe(tmp_path / "fresh").preset_speech_codes() == 1000
    checkpoint(tmp_path / "old", plain)  # a run started before presets were sized: 8194 rows
    assert recipe(tmp_path / "old").preset_speech_codes() is None
    assert recipe(tmp_path / "old", resume=False).preset_speech_codes() == 1000  # a fresh start clears it
    checkpoint(tmp_path / "sized", build_t3("tiny", instruction_dim=H, speech_codes=512)[0])
    assert recipe(tmp_path / "sized").preset_speech_codes() == 512


def test_t3_directory_loads_strictly_adapters_only_extra_with_its_tokenizer(env, tmp_path):
    src = tmp_path / "chatterbox"
    torch.manual_seed(0)
    plain = T3(T3Config.preset("tiny", adapters=False))
    save_t3(plain, src / "t3_cfg.safetensors")
    write_en_tokenizer(src / "tokenizer.json")
    t3, rep, _ = build_t3(str(src), instruction_dim=H)
    assert len(rep.missing_adapter) == 2 * 2 * 4 and "extra: 16 adapter params" in rep.summary
    assert set(rep.loaded) == set(plain.state_dict())
    res = train_stage2(_cfg(env, tmp_path / "run", t3=str(src), max_steps=2))
    assert isinstance(res.tokenizer, ChatterboxTextTokenizer) and "extra: 16 adapter params" in res.load_report
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_multilingual_t3_dir_trains_with_row_languages_and_is_recognised_after(env, tmp_path):
    """An official-format multilingual directory (t3_mtl23ls_v2.safetensors + its vocabulary; 14 layers so the
    alignment heads exist): loaded by name and shape, rows tokenized with the --language default, and the run
    directory is itself a multilingual T3 source."""
    from safetensors.torch import save_file

    from chatterbox_files import write_mtl_vocab
    from tts_core.stage2 import MultilingualTextTokenizer
    from tts_core.t3.families import detect_t3

    src = tmp_path / "mtl"
    src.mkdir()
    torch.manual_seed(0)
    shape = dict(text_vocab_size=2454, hidden_size=64, num_layers=14, num_heads=16, num_kv_heads=16, head_dim=4,
                 intermediate_size=128, adapters=False, max_text_tokens=510, max_speech_tokens=1020)
    plain = T3(T3Config(**shape))
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(src / "t3_mtl23ls_v2.safetensors"))
    write_mtl_vocab(src / "grapheme_mtl_merged_expanded_v1.json")
    with pytest.raises(TextTokenizerError, match="no language given.*--language"):
        train_stage2(_cfg(env, tmp_path / "nolang", t3=str(src), max_steps=1))
    res = train_stage2(_cfg(env, tmp_path / "run", t3=str(src), max_steps=2, language="fr"))
    assert isinstance(res.tokenizer, MultilingualTextTokenizer) and res.t3.cfg.family == "multilingual"
    meta = json.loads((tmp_path / "run" / "stage2.json").read_text())
    assert meta["language"] == "fr" and meta["family"] == "multilingual"
    again = detect_t3(tmp_path / "run")
    assert again.own_checkpoint and again.family.name == "multilingual" and again.config.alignment_heads
    assert again.text_tokenizer.name == "grapheme_mtl_merged_expanded_v1.json"


def test_non_finite_steps_are_skipped_then_refused(env, tmp_path, monkeypatch):
    orig = Stage2Model.forward
    calls = {"n": 0, "bad": {2}}

    def poisoned(self, batch, is_instruction, weight=1.0):
        loss, stats = orig(self, batch, is_instruction, weight)
        calls["n"] += 1
        if calls["bad"] == "all" or calls["n"] in calls["bad"]:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(Stage2Model, "forward", poisoned)
    res = train_stage2(_cfg(env, tmp_path / "one", max_steps=4))
    assert res.nonfinite_steps == 1 and all(torch.isfinite(v).all() for v in res.t3.state_dict().values())
    calls.update(n=0, bad="all")
    with pytest.raises(Stage2NonFiniteError, match="consecutive non-finite"):
        train_stage2(_cfg(env, tmp_path / "all", max_steps=10, max_nonfinite=2))


DDP_SCRIPT = """
import os, sys, json, torch
from tts_core.stage2 import Stage2Config, train_stage2
cfg = Stage2Config.from_dict(json.loads(sys.argv[1]))
res = train_stage2(cfg)
torch.save(res.t3.state_dict(), sys.argv[2] + f".{res.world_size}.{os.environ['RANK']}.pt")
"""


def test_ddp_two_ranks_equal_one_process_with_the_same_global_batch(env, tmp_path):
    """2 gloo ranks × 1 batch per step and 1 process × 2 accumulated batches per step see the same rows,
    seeds and averaged gradients: the weights after 4 steps are equal, and both ranks hold the same replica."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cfg = _cfg(env, tmp_path / "run", max_steps=4, save_every=2).to_dict()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), json.dumps(cfg), str(tmp_path / "w")]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    s0, s1 = torch.load(tmp_path / "w.2.0.pt", weights_only=True), torch.load(tmp_path / "w.2.1.pt", weights_only=True)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    torch.set_num_threads(1)  # the ranks ran with OMP_NUM_THREADS=1: same kernels, same reduction order
    one = train_stage2(_cfg(env, tmp_path / "one", max_steps=4, save_every=2, grad_accum=2)).t3.state_dict()
    init = _state(build_t3("tiny", 16)[0])  # sanity: the steps moved the weights
    moved = [k for k in s0 if k in init and not torch.equal(s0[k], init[k])]
    assert moved
    diff = {k: float((s0[k].float() - one[k].float()).abs().max()) for k in s0 if s0[k].is_floating_point()}
    print(f"\nmax |2-rank − 1-process| = {max(diff.values()):.3g}")
    assert max(diff.values()) == 0.0, sorted(diff.items(), key=lambda kv: -kv[1])[:5]  # bit-identical
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 4
    # resume the 2-rank run on 1 rank: global step kept, the epoch continues where it stopped
    res = train_stage2(_cfg(env, tmp_path / "run", max_steps=6, save_every=2))
    assert res.global_step == 6 and res.world_size == 1
    assert [r["step"] for r in res.history] == [1, 2, 3, 4, 5, 6]


def test_activation_checkpointing_trains_the_same_weights_and_is_recorded(env, tmp_path):
    """`--activation-checkpointing` changes memory, not the run: the same weights after 3 steps (to float
    tolerance), and the run config says it was on."""
    plain = train_stage2(_cfg(env, tmp_path / "plain", max_steps=3))
    ckpt = train_stage2(_cfg(env, tmp_path / "ckpt", max_steps=3, activation_checkpointing=True))
    a, b = plain.t3.state_dict(), ckpt.t3.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], v) for k, v in _state(build_t3("tiny", H)[0]).items())  # the steps moved it
    meta = json.loads((tmp_path / "ckpt" / "stage2.json").read_text())
    assert meta["train_config"]["activation_checkpointing"] is True
    assert json.loads((tmp_path / "plain" / "stage2.json").read_text())["train_config"]["activation_checkpointing"] is False
