"""Stage 2 with ``hold_out="mapper"``: the stage-1 run's held-out clips never reach a training batch (neither as
rows nor as prompt clips), and their teacher-forced loss is scored every ``eval_every`` steps and at the end.
Tiny store and stage-1 checkpoint of tests/test_stage2_train.py, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.reader import CacheReader
from test_stage2_train import TE, _cfg as _base_cfg, _save_stage1, env  # noqa: F401 (env: the tiny store)
from tts_core.stage1.data import Stage1Data
from tts_core.stage2 import Stage2Data, Stage2Model, train_stage2
from tts_core.stage2.hold_out import HoldOutError
from tts_core.stage2.row_mix import SCORED_AS_INSTRUCTION_ONLY
from tts_core.stage2.train import Stage2Recipe

# salt "d" holds out 2 of the store's 6 instruction texts (10 of 37 clips with an instruction)
SPLIT = {"held_out_frac": 0.4, "split_salt": "d", "split_by": "instruction"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(env):
    """The tiny store, and a stage-1 run whose mapper.json records SPLIT (as train_stage1 writes it)."""
    s1 = Stage1Data.from_reader(CacheReader(env["store"]), with_states=False)
    train, val = s1.split(SPLIT["held_out_frac"], SPLIT["split_salt"], SPLIT["split_by"])
    assert len(val) == 10 and len(train) == 27  # the premise: something is held out
    mapper = _save_stage1(env["root"] / "stage1_split", TE, train_config=SPLIT,
                          data={"n_train": len(train), "n_val": len(val)})
    return {**env, "stage1": str(mapper), "val_ids": {s1.clip_ids[i] for i in val}}


def _cfg(runs, out, **kw):
    return _base_cfg(runs, out, hold_out="mapper", eval_every=3, **kw)


def test_held_out_rows_never_train_and_their_loss_is_recorded(runs, tmp_path, monkeypatch):
    seen = {"train": set(), "prompt": set(), "val": set()}
    recipe = {}
    build, evaluate = Stage2Data.build_batch, Stage2Recipe.evaluate

    def spy_build(self, rows, **kw):
        b = build(self, rows, **kw)
        if recipe.get("evaluating"):
            seen["val"] |= {self.clip_ids[i] for i in rows}
        else:
            seen["train"] |= {self.clip_ids[i] for i in rows}
            seen["prompt"] |= {self.clip_ids[i] for i in b.prompt_src if i >= 0}
        return b

    def spy_evaluate(self):
        recipe.update(evaluating=True, it=self)
        try:
            return evaluate(self)
        finally:
            recipe["evaluating"] = False

    monkeypatch.setattr(Stage2Data, "build_batch", spy_build)
    monkeypatch.setattr(Stage2Recipe, "evaluate", spy_evaluate)
    res = train_stage2(_cfg(runs, tmp_path / "run"))

    val_ids = runs["val_ids"]
    ok_ids = {f"c{i:03d}" for i in range(40)} - {"c010"}  # the store's OK clips (row 10 is quarantined)
    assert seen["train"] == ok_ids - val_ids  # 6 steps of 8 rows: more than an epoch of the 29 training rows
    assert seen["prompt"] and not seen["prompt"] & val_ids
    assert seen["val"] == val_ids  # every held-out row is scored, nothing else
    assert res.data_stats["held_out_rows"] == 10 and res.data_stats["rows"] == 29
    assert res.data_stats["excluded_rows"] == 0  # the instruction rule leaves no clip out of both sides

    # rows at steps 3 and 6 carry the held-out losses; the end-of-run value is step 6's
    with_val = [r for r in res.history if "val_speech_loss" in r]
    assert [r["step"] for r in with_val] == [3, 6]
    assert res.val == {k: with_val[-1][k] for k in ("val_speech_loss", "val_text_loss", "val_loss")}
    assert with_val[0]["val_speech_loss"] != with_val[1]["val_speech_loss"]  # the weights moved in between

    # the value: mean CE per token over exactly the held-out rows, recomputed in one batch of all of them
    val = recipe["it"].val_data
    b = build(val, np.arange(len(val)), mix=SCORED_AS_INSTRUCTION_ONLY, rng=np.random.default_rng(0),
              cond_len=recipe["it"].cond_bound)
    assert bool(b.instruction_only.all())  # every held-out row is scored as an instruction-only row
    with torch.no_grad():
        _, stats = Stage2Model(res.t3.eval())(b.batch, b.instruction_only)
    speech, text = float((stats[7] + stats[9]) / (stats[8] + stats[10])), float((stats[3] + stats[5]) / (stats[4] + stats[6]))
    assert res.val["val_speech_loss"] == pytest.approx(speech, rel=1e-5)
    assert res.val["val_text_loss"] == pytest.approx(text, rel=1e-5)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "held-out (the stage-1 mapper's split): 10 rows" in report and "held-out speech" in report


def test_a_mapper_without_its_split_settings_is_refused(runs, tmp_path):
    bare = _save_stage1(tmp_path / "stage1_bare", TE)
    with pytest.raises(HoldOutError, match="records no train_config"):
        train_stage2(_cfg({**runs, "stage1": str(bare)}, tmp_path / "run"))
