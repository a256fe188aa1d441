"""Parse the pipe-separated metadata file: `audio_path|transcript|instruction[|speaker[|language]]`.

`language` (a code such as ``fr``, lower-cased here) is what the multilingual T3 tags the transcript
with; stage 2 checks it against the model's languages (``tts_core.languages``).

Every data line becomes exactly one `MetaLine` (its row in the cache), good or bad, so that the
manifest accounts for every line and row numbers never shift. Problems are reasons (`cache.quarantine`), not crashes.
Which lines are one clip (captions, duplicates, conflicts), and so each clip's id, needs the audio root:
`tts_core.captions`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cache.quarantine import Reason

N_FIELDS = (3, 4, 5)


@dataclass(frozen=True)
class MetaLine:
    row: int  # 0-based data-line index: the row in the store
    line: int  # 1-based line number in the file, for error messages
    audio_path: str
    transcript: str
    instruction: str
    speaker: str
    reason: str = ""  # a `cache.quarantine.Reason` when the line itself is unusable; "" when usable
    detail: str = ""
    language: str = ""  # "" = not given (stage 2's --language default applies)
    clip_of: int = -1  # row of the earlier line whose audio this line captions (tts_core.captions); -1: its own
    assigned_id: str = ""  # its clip's id, unique per clip (`tts_core.captions.ClipIds`); "" before grouping

    @property
    def ok(self) -> bool:
        return not self.reason

    @property
    def path_id(self) -> str:
        """The line's audio path without its extension (`path_id`), ``line<N>`` when it has none."""
        return path_id(self.audio_path) if self.audio_path else f"line{self.line}"

    @property
    def clip_id(self) -> str:
        """The manifest's clip_id: the id grouping gave the line's clip, else (a line no clip owns) `path_id`."""
        return self.assigned_id or self.path_id


def path_id(audio_path: str) -> str:
    """A metadata audio path without its extension: the id of its clip unless an earlier clip has it
    (`tts_core.captions.ClipIds`), so ids stay the same across rebuilds, resumes and appends. A path with
    no file name (``.``, ``/``: quarantined when read) is its own id."""
    p = PurePosixPath(audio_path.replace("\\", "/"))
    return str(p.with_suffix("") if p.name else p)


class MetadataError(Exception):
    """The file as a whole cannot be read (missing, not UTF-8): nothing can be built from it."""


def read_metadata(path: str | Path) -> tuple[list[MetaLine], str]:
    """All data lines (blank lines and `#` comments skipped) and the sha256 of the file's bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MetadataError(f"cannot read metadata {path}: {exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise MetadataError(f"{path}:{line_no}: not valid UTF-8 ({exc.reason}); save the file as UTF-8") from None
    lines: list[MetaLine] = []
    for line_no, text_line in enumerate(split_lines(text), start=1):
        if not text_line.strip() or text_line.lstrip().startswith("#"):
            continue
        lines.append(_parse_line(len(lines), line_no, text_line, path))
    return lines, hashlib.sha256(raw).hexdigest()


def split_lines(text: str) -> list[str]:
    """Lines as `grep -n` and editors count them: only `\n` (or `\r\n`) ends one. Not `str.splitlines`,
    which also breaks at U+2028, NEL, form feed or a lone CR inside a transcript and shifts every line number."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _parse_line(row: int, line_no: int, text: str, path: Path) -> MetaLine:
    fields = text.split("|")
    where = f"{path.name}:{line_no}"
    if len(fields) not in N_FIELDS:
        return MetaLine(row, line_no, fields[0].strip(), "", "", "", Reason.BAD_FIELD_COUNT,
                        f"{where}: {len(fields)} fields; expected audio_path|transcript|instruction[|speaker[|language]]")
    audio, transcript, instruction = (f.strip() for f in fields[:3])
    speaker = fields[3].strip() if len(fields) >= 4 else ""
    language = fields[4].strip().lower() if len(fields) == 5 else ""
    empty = [name for name, v in (("audio_path", audio), ("transcript", transcript), ("instruction", instruction)) if not v]
    if empty:
        return MetaLine(row, line_no, audio, transcript, instruction, speaker, Reason.EMPTY_FIELD,
                        f"{where}: empty {', '.join(empty)}", language)
    return MetaLine(row, line_no, audio, transcript, instruction, speaker, language=language)


def lines_digest(lines: list[MetaLine]) -> str:
    """Digest of the parsed lines: what a store was built from, independent of comments/blank lines."""
    h = hashlib.sha256()
    for m in lines:
        fields = (m.audio_path, m.transcript, m.instruction, m.speaker) + ((m.language,) if m.language else ())
        h.update("\x1f".join(fields).encode())  # a line without a language digests as before
        h.update(b"\x1e")
    return h.hexdigest()
