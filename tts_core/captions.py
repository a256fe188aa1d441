"""Which metadata lines are one clip: identity by resolved audio file, the clip's id, captions, conflicts.

Real instruction data has several descriptions per recording (LibriTTS-P style prompts, LLM paraphrases).
A clip is its *resolved audio file* (`audio_root` joined, normalised, symlinks followed: ``./meta/x.wav``,
``meta//x.wav`` and the absolute path are one file) plus its speaker label where the line gives one (a
line without one joins the file's first clip). The
first usable line of a clip owns its audio (its row is encoded); a later line of the same clip is

* another **caption** when its transcript and language match and its instruction is new: no audio
  work, its row points at the first line's row (``clip_of``, stored as ``clips/clip_row``);
* ``duplicate_clip`` when its instruction was already given for that clip (the same line twice);
* ``transcript_conflict`` when it gives another transcript or language for the same audio — which
  one is right cannot be known, so the later line is quarantined, naming both lines.

Every line of a clip carries the clip's one id (`ClipIds`: the manifest's ``clip_id``), unique per clip.

Pure functions of the parsed lines: a resumed or appended build groups the earlier lines the same way.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from cache.quarantine import Reason
from tts_core.metadata import MetaLine

CAPTION_DETAIL = "another caption of the clip on line {line}"


class ClipIds:
    """Each clip's id, given in line order: its first line's audio path without the extension
    (`MetaLine.path_id`, as ids always were), or — when an earlier clip already has that id (``x.wav``
    and ``x.flac``; one file under two speaker labels) — that id with ``#2``, ``#3``, ... appended, the
    first no earlier clip has. An id depends only on the clips before it, so a resumed or appended build
    gives every earlier clip the id it was written with; and since every earlier clip's own path id is
    taken whatever id it got, a new clip never gets an id written before (even by a store built before
    this rule, whose colliding clips share their path id)."""

    SEPARATOR = "#"

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def take(self, path_id: str) -> str:
        cid, k = path_id, 2
        while cid in self.taken:
            cid, k = f"{path_id}{self.SEPARATOR}{k}", k + 1
        self.taken.add(cid)
        return cid


def resolved_audio(audio_root: str | Path, m: MetaLine) -> str:
    """The audio file a line names: joined to the audio root, normalised, symlinks followed."""
    path = os.path.join(os.path.abspath(os.fspath(audio_root)), m.audio_path.replace("\\", "/"))
    try:
        return os.path.realpath(path)
    except (ValueError, OSError):  # a NUL byte, a path the OS refuses: its own clip, quarantined when read
        return path


def group_captions(lines: list[MetaLine], audio_root: str | Path, where: str) -> list[MetaLine]:
    """The lines with later lines of an earlier clip marked as captions (``clip_of``) or quarantined
    (module doc), and every line of a clip given the clip's id (`ClipIds`; a line quarantined for itself
    keeps its `MetaLine.path_id`). ``where`` names the file in details ("meta.txt").

    Speaker: a line that names one belongs to the clip of that file with that speaker (another speaker
    label on the same file is another clip); a line that names none belongs to the file's first clip."""
    first: dict[tuple[str, str], MetaLine] = {}  # (file, speaker) → the clip's first line
    first_of_file: dict[str, tuple[str, str]] = {}
    said: dict[tuple[str, str], dict[str, int]] = {}  # clip → instruction → line that gave it
    ids = ClipIds()
    out = []
    for m in lines:
        if not m.ok:
            out.append(m)
            continue
        path = resolved_audio(audio_root, m)
        key = (path, m.speaker) if m.speaker else first_of_file.get(path, (path, ""))
        head = first.get(key)
        if head is None:
            m = replace(m, assigned_id=ids.take(m.path_id))
            first[key], said[key] = m, {m.instruction: m.line}
            first_of_file.setdefault(path, key)
            out.append(m)
            continue
        m = replace(m, assigned_id=head.assigned_id)
        if (m.transcript, m.language) != (head.transcript, head.language):
            what = "transcript" if m.transcript != head.transcript else "language"
            out.append(replace(m, reason=Reason.TRANSCRIPT_CONFLICT, detail=(
                f"{where}:{m.line}: {m.audio_path} is the audio of line {head.line} with another {what} "
                f"(line {head.line}: {getattr(head, what)!r}; line {m.line}: {getattr(m, what)!r}); "
                "fix one of the two lines")))
        elif m.instruction in said[key]:
            out.append(replace(m, reason=Reason.DUPLICATE_CLIP,
                               detail=f"{where}:{m.line}: {m.audio_path} already listed on line "
                                      f"{said[key][m.instruction]} with this instruction"))
        else:
            said[key][m.instruction] = m.line
            out.append(replace(m, clip_of=head.row, detail=CAPTION_DETAIL.format(line=head.line)))
    return out


def settle_captions(batch, status: np.ndarray, caption_status: int, ok_status: int, quarantined: int) -> None:
    """A caption row is usable only while its clip is: quarantine (reason ``clip_quarantined``) each
    caption row of ``batch`` (a `cache.writer.ClipBatch`, changed in place) whose clip's row is not OK.
    ``status``: every row's status so far ([N]; rows of this batch are read from the batch itself, and
    a clip's row always comes before its captions, so it is known)."""
    rows = batch.start + np.arange(batch.n)
    clip_row = batch.clip_rows()
    status[rows] = batch.status
    bad = np.flatnonzero((batch.status == caption_status) & (status[np.clip(clip_row, 0, None)] != ok_status))
    if not len(bad):
        return
    batch.status[bad] = quarantined
    batch.instruction_id[bad] = -1
    batch.clip_row = np.where(np.isin(np.arange(batch.n), bad), -1, clip_row).astype(np.int32)
    status[rows] = batch.status
    man = batch.manifest
    man.loc[bad, "status"] = "quarantined"
    man.loc[bad, "reason"] = Reason.CLIP_QUARANTINED
    man.loc[bad, "instruction_id"] = -1
    man.loc[bad, "detail"] = [f"{d}, whose audio was quarantined (see that line)" for d in man.detail.iloc[bad]]
