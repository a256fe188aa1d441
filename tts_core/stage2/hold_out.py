"""Stage 2's held-out rows: the stage-1 mapper run's split, reproduced on the store (``hold_out="mapper"``).

The mapper run records how it split (``train_config``: ``held_out_frac``, ``split_salt``, ``split_by``,
in ``mapper.json``); the split is a pure function of the store's rows and those settings
(`tts_core.stage1.data.split_rows`), so stage 2 recomputes it instead of trusting a saved list. Stage 2
then trains on the mapper's training clips (and on rows stage 1 could not use: no instruction) and
scores teacher-forced loss on the mapper's held-out clips — instructions neither model was trained on.
Clips the speaker rule leaves out of both sides (a held-out instruction text spoken by a training
speaker) are left out of stage-2 training too.

Captions: the split is over (clip, caption) pairs (`tts_core.stage1.data`, "Captions"). Stage 2 trains
on the clips with at least one training caption and never on a held-out text (``held_ids``: drop them
from the training clips' captions, `Stage2Data.without_instructions`); its held-out rows are the clips
with no training caption, scored on their held-out captions.
"""
from __future__ import annotations

import numpy as np

HOLD_OUT_MODES = ("none", "mapper")


class HoldOutError(ValueError):
    """The mapper run's split cannot be reproduced on this store."""


def mapper_split(reader, mapper_meta: dict, clip_ids: list[str], mapper_dir: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ (train rows, held-out rows) of stage 2's ``clip_ids`` (sorted indices) under the mapper's split,
    and the held-out instruction ids (every id whose normalised text is held out)."""
    from tts_core.stage1.data import Stage1Data, normalise_instruction

    tc = mapper_meta.get("train_config")
    if not tc:
        raise HoldOutError(f"hold_out='mapper': {mapper_dir} records no train_config (held_out_frac, split_salt, "
                           "split_by), so its held-out split cannot be reproduced; train the mapper with "
                           "train_stage1, or use hold_out='none'")
    s1 = Stage1Data.from_reader(reader, with_states=False)
    train_caps, val1 = s1.split_of_run(tc)  # caption indices
    clip = s1.captions.clip_of
    train1 = np.unique(clip[train_caps])
    recorded = mapper_meta.get("data") or {}
    if "n_val" in recorded and (recorded.get("n_train"), recorded.get("n_val")) != (len(train1), len(val1)):
        raise HoldOutError(
            f"hold_out='mapper': the split of this store gives {len(train1)} train / {len(val1)} held-out clips, "
            f"but {mapper_dir} was trained on {recorded.get('n_train')} / {recorded.get('n_val')}: that mapper "
            "was trained on another store; use its store, or hold_out='none'")
    if len(val1) == 0:
        raise HoldOutError(f"hold_out='mapper': {mapper_dir}'s split ({tc}) holds out no clip")
    ids = np.asarray(clip_ids, dtype=object)
    s1_ids = np.asarray(s1.clip_ids, dtype=object)
    trained = np.isin(ids, s1_ids[train1])
    held = np.isin(ids, s1_ids[clip[val1]]) & ~trained
    unused = np.isin(ids, s1_ids) & ~trained & ~held  # neither side in stage 1
    held_texts = {normalise_instruction(s1.instruction_texts[int(i)]) for i in s1.captions.ids[val1]}
    held_ids = np.array([i for i, t in enumerate(s1.instruction_texts) if normalise_instruction(t) in held_texts],
                        dtype=np.int64)
    return np.flatnonzero(~held & ~unused), np.flatnonzero(held), held_ids
