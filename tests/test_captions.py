"""Many captions per clip: one audio file on several metadata lines is one clip, encoded once."""
from pathlib import Path

import numpy as np
import pytest

import tts_core.cachebuild.build as build_mod
from cache import schema
from cache.captions import CaptionTable
from cache.reader import CacheReader
from tts_core.cachebuild.build import BuildConfig, build_cache
from tts_core.captions import group_captions
from tts_core.metadata import read_metadata


class _Counting:
    """Wraps a frozen model and records every waveform it is given."""

    def __init__(self, model, seen: list):
        self._m, self.seen = model, seen

    def __getattr__(self, name):
        return getattr(self._m, name)

    def embed_batch(self, wavs):
        self.seen.extend(len(w) for w in wavs)
        return self._m.embed_batch(wavs)

    def tokenize_batch(self, wavs):
        self.seen.extend(len(w) for w in wavs)
        return self._m.tokenize_batch(wavs)


def _meta(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "meta" / "meta.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_three_spellings_are_one_clip_and_conflicts_name_both_lines(tmp_path):
    root = tmp_path / "meta"
    (root / "x.wav").parent.mkdir(parents=True, exist_ok=True)
    meta = _meta(tmp_path, [
        "./x.wav|Hello there.|A deep voice.",                  # line 1: the clip
        "sub/../x.wav|Hello there.|A bright voice.",           # another caption
        f"{root / 'x.wav'}|Hello there.|A whispered voice.",   # absolute spelling: another caption
        "x.wav|Hello there.|A deep voice.",                    # the same line again
        ".//x.wav|Goodbye.|A calm voice.",                     # another transcript for the same audio
        "x.wav|Hello there.|A calm voice.|spk2",               # another speaker: another clip
        "y.wav|Hello there.|A calm voice.",
    ])
    lines = group_captions(read_metadata(meta)[0], root, "meta.txt")
    assert [m.clip_of for m in lines] == [-1, 0, 0, -1, -1, -1, -1]
    assert [m.reason for m in lines] == ["", "", "", "duplicate_clip", "transcript_conflict", "", ""]
    assert "line 1" in lines[3].detail
    conflict = lines[4].detail
    assert conflict.startswith("meta.txt:5") and "line 1" in conflict and "line 5" in conflict
    assert "'Hello there.'" in conflict and "'Goodbye.'" in conflict


def test_caption_table_groups_pairs_by_clip():
    ok, cap, q = schema.STATUS_OK, schema.STATUS_CAPTION, schema.STATUS_QUARANTINED
    status = np.array([ok, cap, q, ok, cap, cap, ok])
    clip_row = np.array([0, 0, -1, 3, 0, 3, 6])
    iid = np.array([0, 1, -1, 2, 3, 0, 4])
    t = CaptionTable.from_store_rows(status, clip_row, iid, ok, cap)
    assert t.offsets.tolist() == [0, 3, 5, 6]
    assert t.ids.tolist() == [0, 1, 3, 2, 0, 4]


@pytest.fixture
def counted(monkeypatch):
    """Every waveform the speaker models and the speech tokenizer see during a build."""
    seen = {"ve": [], "xv": [], "tok": []}
    load_spk, load_tok = build_mod.load_speaker_models, build_mod.load_speech_tokenizer

    def speaker_models(cfg):
        ve, xv = load_spk(cfg)
        return _Counting(ve, seen["ve"]), _Counting(xv, seen["xv"])

    def speech_tokenizer(*a, **kw):
        tok, fitted = load_tok(*a, **kw)
        return _Counting(tok, seen["tok"]), fitted

    monkeypatch.setattr(build_mod, "load_speaker_models", speaker_models)
    monkeypatch.setattr(build_mod, "load_speech_tokenizer", speech_tokenizer)
    return seen


def test_a_clip_with_three_instructions_is_encoded_once(demo_corpus, tmp_path, counted):
    good = [l for l in demo_corpus.metadata.read_text(encoding="utf-8").splitlines()
            if l.strip() and not l.startswith("#")][:6]
    path, text = good[0].split("|")[:2]
    root = demo_corpus.root
    extra = [f"./{path}|{text}|Another way to say it.",
             f"{(root / path).resolve()}|{text}|A third wording.",
             f"{path}|{text} Not the same.|A fourth wording."]
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(good[:3] + extra[:1] + good[3:] + extra[1:]) + "\n", encoding="utf-8")
    store = tmp_path / "c.zarr"
    s = build_cache(BuildConfig(metadata=meta, audio_root=root, store=str(store), chunk_rows=4,
                                tokenizer_fit_clips=6))
    assert s.complete and s.n_rows == 9 and s.n_ok == 6 and s.n_captions == 8
    assert s.reasons == {"transcript_conflict": 1}
    assert "clips: 6  captions (clip, instruction pairs): 8" in "\n".join(s.lines())
    # 6 clips: each model ran once per clip, never on a caption line (the first clip's wav is not repeated)
    assert len(counted["ve"]) == len(counted["xv"]) == 6
    r = CacheReader(str(store))
    assert len(r) == 6
    off, ids = r.captions.offsets, r.captions.ids
    texts = r.instruction_texts
    first = [texts[i] for i in ids[off[0]:off[1]]]
    assert first == [good[0].split("|")[2], "Another way to say it.", "A third wording."]
    assert (np.diff(off)[1:] == 1).all()
    man = r.manifest
    assert man.status.tolist().count("caption") == 2
    assert "line 1" in man.detail[man.reason == "transcript_conflict"].iloc[0]
    g = r.group
    assert g["clips/clip_row"][:].tolist() == [0, 1, 2, 0, 4, 5, 6, 0, -1]
    assert (g["clips/spk_emb"][3] == 0).all() and g["clips/duration"][3] == 0  # audio facts live at the clip's row


def _copy_with_empty_clip(demo_corpus, tmp_path, n: int):
    """The first ``n`` demo lines with their audio copied under tmp_path/audio, plus an empty (unreadable)
    `empty.wav` there: captions of a clip whose audio is quarantined."""
    good = [l for l in demo_corpus.metadata.read_text(encoding="utf-8").splitlines()
            if l.strip() and not l.startswith("#")][:n]
    root = tmp_path / "audio"
    (root / "wavs").mkdir(parents=True)
    for l in good:
        p = l.split("|")[0]
        (root / p).write_bytes((demo_corpus.root / p).read_bytes())
    (root / "empty.wav").write_bytes(b"")
    return good, root


def test_captions_of_a_quarantined_clip_are_quarantined(demo_corpus, tmp_path):
    good, root = _copy_with_empty_clip(demo_corpus, tmp_path, 3)
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(good + ["empty.wav|Hi.|A.", "empty.wav|Hi.|B."]) + "\n", encoding="utf-8")
    store = tmp_path / "c.zarr"
    s = build_cache(BuildConfig(metadata=meta, audio_root=root, store=str(store), chunk_rows=4,
                                tokenizer_fit_clips=3))
    man = CacheReader(str(store)).manifest
    assert man.reason.tolist()[3:] == ["empty_file", "clip_quarantined"]  # the caption sits in the next batch
    assert "line 4" in man.detail.iloc[4] and s.n_captions == 3
    assert CacheReader(str(store)).group["clips/clip_row"][:].tolist() == [0, 1, 2, -1, -1]


# ---- stage 1: the split over (clip, caption) pairs, one caption per clip per epoch ----------------------------
def _captioned_data(n_clips=300, extra=2, seed=1):
    """Synthetic stage-1 data where each clip also has ``extra`` other captions of its own cluster."""
    from tts_core.stage1.data import Stage1Data
    from tts_core.stage1.synthetic import make_synthetic_data

    d = make_synthetic_data(n_clips=n_clips, n_clusters=4, n_instructions=60, hidden_size=32, seed=seed)
    rng = np.random.default_rng(seed)
    iid = d.instruction_id.numpy()
    caps = [[int(i)] + [int(j) for j in rng.choice(np.setdiff1d(np.arange(60), [i]), extra, replace=False)]
            for i in iid]
    return Stage1Data(spk=d.spk, xvec=d.xvec, instruction_id=d.instruction_id, states=d.states,
                      clip_ids=d.clip_ids, instruction_texts=d.instruction_texts,
                      text_encoder_identity=d.text_encoder_identity, speakers=d.speakers,
                      cache_identity=d.cache_identity,
                      captions=CaptionTable.from_counts([len(c) for c in caps], np.concatenate(caps)))


def test_split_keeps_every_held_out_text_out_of_training_and_mixed_clips_train_their_other_captions():
    from tts_core.stage1.data import normalise_instruction

    data = _captioned_data()
    tr, va = data.split(0.2, "s")
    clip, cap = data.captions.clip_of, data.captions.ids
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == data.n_captions == 900
    norm = lambda ids: {normalise_instruction(data.instruction_texts[i]) for i in ids}
    assert not norm(cap[tr]) & norm(cap[va])
    rows, kept = data.train_captions(tr)
    off, ids = kept.offsets, kept.ids
    assert len(rows) == len(np.unique(clip[tr])) and off[-1] == len(tr)
    mixed = np.intersect1d(clip[tr], clip[va])
    assert len(mixed) > 0  # with 3 captions, many clips have captions on both sides
    r = int(mixed[0])
    k = int(np.flatnonzero(rows == r)[0])
    assert set(ids[off[k]:off[k + 1]].tolist()) == set(cap[tr][clip[tr] == r].tolist())
    assert not norm(ids[off[k]:off[k + 1]]) & norm(cap[va])


def test_stage1_batches_see_every_caption_over_epochs_and_replay():
    import torch

    from tts_core.stage1.batches import Stage1Batches, Stage1Tables

    data = _captioned_data()
    tr, va = data.split(0.2, "s")
    make = lambda: Stage1Batches(Stage1Tables.build(data, tr, va, torch.device("cpu")), batch_size=64, seed=3)
    batches = make()
    rows_tr, kept = data.train_captions(tr)
    off, ids = kept.offsets, kept.ids
    drawn: dict[int, list[int]] = {int(r): [] for r in rows_tr}
    for epoch in range(3):
        seen = []
        for b in range(batches.n_batches):
            bt = batches.get("1", epoch, b)
            want, lens = data.states.gather(bt.instruction_id.numpy())
            assert torch.equal(bt.states, want) and torch.equal(bt.lengths, lens)
            for r, i in zip(bt.rows.tolist(), bt.instruction_id.tolist()):
                drawn[r].append(i)
            seen.append(bt.rows)
        # each train clip once per epoch, whatever its number of captions
        assert torch.equal(torch.sort(torch.cat(seen)).values, torch.from_numpy(rows_tr))
    k_max = int(np.diff(off).max())
    assert k_max == 3
    for k, r in enumerate(rows_tr):  # 3 epochs: every training caption of every clip exactly once (k ≤ 3)
        mine = ids[off[k]:off[k + 1]].tolist()
        assert sorted(drawn[int(r)][:len(mine)]) == sorted(mine)
    again = make()
    b0 = again.get("1", 2, 1)
    ref = batches.get("1", 2, 1)
    assert torch.equal(b0.rows, ref.rows) and torch.equal(b0.instruction_id, ref.instruction_id)


def test_stage1_resume_with_captions_equals_the_uninterrupted_run(tmp_path, one_thread):
    import torch

    from tts_core.stage1 import train_stage1
    from tts_core.mapper.flow import MapperConfig
    from tts_core.stage1.train import Stage1TrainConfig

    def cfg(out, **kw):
        return Stage1TrainConfig(out_dir=str(out), phase="1", batch_size=32, lr_phase1=2e-3, epochs=3,
                                 eval_every=5, patience=10, warmup_steps=3, held_out_frac=0.2, eval_batch_size=256,
                                 device="cpu", min_phase_steps=0, **kw)

    small = MapperConfig(hidden_dim=64, n_blocks=2, draws=1, temperature=0.3)  # one draw: fast
    ref = train_stage1(_captioned_data(), cfg(tmp_path / "ref", max_steps=14), small)
    first = train_stage1(_captioned_data(), cfg(tmp_path / "run", max_steps=9), small)
    assert first.global_step == 9
    res = train_stage1(_captioned_data(), cfg(tmp_path / "run", max_steps=14), small)
    assert res.global_step == ref.global_step == 14
    a, b = res.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- stage 2: an instruction row draws one of its clip's captions ---------------------------------------------
def _stage2_data(caption_lists):
    import torch

    from cache.captions import CaptionTable
    from tts_core.stage2.data import Stage2Data

    n, U = len(caption_lists), 8
    ones = np.ones(n, np.int64)
    return Stage2Data(
        clip_ids=[f"c{i}" for i in range(n)], text_flat=torch.ones(n, dtype=torch.int16),
        text_start=np.arange(n), text_len=ones, speech_flat=torch.ones(n, dtype=torch.int16),
        speech_start=np.arange(n), speech_len=ones, prompt_flat=torch.ones(n, dtype=torch.int16),
        prompt_start=np.arange(n), prompt_len=ones, spk=torch.nn.functional.normalize(torch.randn(n, 256), dim=-1),
        instruction_id=np.array([c[0] if c else -1 for c in caption_lists]),
        style_emb=torch.arange(U, dtype=torch.float32)[:, None].repeat(1, 4), mapper_spk=torch.zeros(U, 1, 256),
        speaker_code=np.full(n, -1),
        captions=CaptionTable.from_counts([len(c) for c in caption_lists], [i for c in caption_lists for i in c]))


def test_stage2_rows_draw_every_caption_and_held_out_texts_are_dropped():
    from tts_core.stage2.mixing import batch_rng
    from tts_core.stage2.row_mix import SCORED_AS_INSTRUCTION_ONLY

    data = _stage2_data([[0, 1, 2], [3], [], [4, 5]])
    got = {r: set() for r in range(4)}
    for g in range(40):
        b = data.build_batch(np.arange(4), mix=SCORED_AS_INSTRUCTION_ONLY, rng=batch_rng(0, 0, g), prompt_len=4)
        style = b.batch.cond.instruction_emb[:, 0].long().tolist()
        for r in range(4):
            if b.instruction_only[r]:
                got[r].add(style[r])
    assert got == {0: {0, 1, 2}, 1: {3}, 2: set(), 3: {4, 5}}
    sub = data.subset(np.array([0, 3]))
    assert sub.captions.offsets.tolist() == [0, 3, 5] and sub.captions.ids.tolist() == [0, 1, 2, 4, 5]
    kept = data.without_instructions(np.array([0, 3]))
    assert kept.instruction_id.tolist() == [1, -1, -1, 4]  # clip 1 had only the held-out text: audio-only
    assert kept.captions.ids.tolist() == [1, 2, 4, 5]
    one = _stage2_data([[0], [3], [], [4]])  # one caption per clip: nothing drawn, so old batches are unchanged
    rng = batch_rng(0, 0, 1)
    state = rng.bit_generator.state
    assert one.draw_captions(np.arange(4), rng).tolist() == [0, 3, -1, 4]
    assert rng.bit_generator.state == state


def test_an_older_schema_store_is_refused_with_what_to_do(tmp_path):
    import zarr

    from cache.store import StoreError

    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    g.attrs.update({"schema_version": 3})
    with pytest.raises(StoreError, match="cache schema 3; this code reads schema 4.*new --store"):
        CacheReader(str(tmp_path / "old.zarr"))


# ---- the lab: more training-wording captions per training clip, and the comparison line ------------------------
def test_lab_gives_training_clips_more_captions_never_a_held_out_text():
    from instruct_tts.lab import LabConfig
    from instruct_tts.lab.split_files import extra_captions
    from tts_core.corpus.instructions import VoiceAttributes, make_instruction
    from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION, TRAIN
    from tts_core.stage1.data import normalise_instruction

    clips, roles = [], []
    for i in range(40):
        a = VoiceAttributes(("male", "female")[i % 2], ("low", "mid", "high")[i % 3], "normal", "quiet")
        instr = make_instruction(a, i, "train")
        clips.append({"clip_id": f"demo_{i}", "gender": a.gender, "pitch": a.pitch, "rate": a.rate,
                      "loudness": a.loudness, "instruction": instr, "line": f"wavs/demo_{i}.wav|Text {i}.|{instr}|v{i}"})
        roles.append(HELD_OUT_INSTRUCTION if i % 5 == 0 else TRAIN)
    extra = extra_captions(LabConfig(captions_per_clip=3), clips, roles)
    assert extra_captions(LabConfig(captions_per_clip=1), clips, roles) == []
    assert extra == extra_captions(LabConfig(captions_per_clip=3), clips, roles)  # deterministic
    held = {normalise_instruction(c["instruction"]) for c, r in zip(clips, roles) if r != TRAIN}
    by_path: dict[str, list[str]] = {}
    for line in extra:
        path, text, instr, speaker = line.split("|")
        by_path.setdefault(path, []).append(instr)
        assert normalise_instruction(instr) not in held
        assert text == f"Text {path.split('_')[1].split('.')[0]}." and speaker == f"v{path.split('_')[1].split('.')[0]}"
    train_paths = {c["line"].split("|")[0] for c, r in zip(clips, roles) if r == TRAIN}
    assert set(by_path) == train_paths
    own = {c["line"].split("|")[0]: c["instruction"] for c in clips}
    assert all(len(v) == 2 and len(set(v)) == 2 and own[p] not in v for p, v in by_path.items())


def test_lab_report_compares_held_out_instructions_against_one_caption_per_clip():
    from instruct_tts.lab.config import same_run_fields
    from tts_core.evaluation.lab_report import caption_comparison, caption_lines
    from tts_core.evaluation.lab_split import HELD_OUT_INSTRUCTION

    def report(k, cos, acc, steps=100):
        return {"config": {"n_clips": 96, "seed": 0, "stage1_steps": steps, "captions_per_clip": k, "out": f"lab{k}"},
                "stage1": {HELD_OUT_INSTRUCTION: {"model": {"value": cos}}},
                "tables": {"pitch": [{"split": HELD_OUT_INSTRUCTION, "rendering": "model", "accuracy": acc}]},
                "stage2": {"curve": [{HELD_OUT_INSTRUCTION: 5.0}]},
                "captions": {"per_clip": k, "train_pairs": 60 * k, "train_clips": 60, "train_instructions": 50 * k}}

    r = report(3, 0.61, 0.8)
    r["compare_to"] = caption_comparison(r, report(1, 0.55, 0.7), same_run_fields())
    assert r["compare_to"]["differs"] == [] and r["compare_to"]["other"]["stage1_avg_cos"] == 0.55
    md = "\n".join(caption_lines(r))
    assert "same clips, same steps" in md and "| stage1 avg cos | 0.610 | 0.550 |" in md
    assert "| pitch accuracy | 0.800 | 0.700 |" in md and "180 (clip, instruction) pairs over 60 clips" in md
    assert caption_comparison(r, report(1, 0.5, 0.5, steps=50), same_run_fields())["differs"] == ["stage1_steps"]


def test_a_resumed_build_with_captions_equals_the_uninterrupted_one(demo_corpus, tmp_path):
    """Captions settle against their clip's status read back from the store: a build stopped after its
    first batch and resumed writes what one uninterrupted build writes."""
    import pandas as pd
    import zarr

    good, root = _copy_with_empty_clip(demo_corpus, tmp_path, 5)
    path, text = good[0].split("|")[:2]
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(good[:2] + ["empty.wav|Hi.|A.", good[2]] + good[3:] +
                              [f"./{path}|{text}|Another wording.", "empty.wav|Hi.|B."]) + "\n", encoding="utf-8")

    def build(store, **kw):
        return build_cache(BuildConfig(metadata=meta, audio_root=root, store=str(store), chunk_rows=4,
                                       tokenizer_fit_clips=5, **kw))

    build(tmp_path / "ref.zarr")
    part = build(tmp_path / "resumed.zarr", max_batches=1)
    assert not part.complete
    done = build(tmp_path / "resumed.zarr")
    assert done.complete and done.resumed_from == 4 and done.n_captions == 6
    a, b = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r"), zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")
    for k in ("clips/spk_emb", "clips/status", "clips/clip_row", "clips/instruction_id", "tokens/flat"):
        np.testing.assert_array_equal(a[k][...], b[k][...], err_msg=k)
    ma, mb = CacheReader(str(tmp_path / "ref.zarr")).manifest, CacheReader(str(tmp_path / "resumed.zarr")).manifest
    pd.testing.assert_frame_equal(ma, mb)
    assert ma.status.tolist()[-2:] == ["caption", "quarantined"] and ma.reason.tolist()[-1] == "clip_quarantined"
