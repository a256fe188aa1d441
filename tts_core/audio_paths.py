"""Where a metadata line's audio is: its path joined to --audio-root, refused when `..` leaves the root.

The check is lexical (like `os.path.normpath`), not by resolving links: a symlink inside the root that
points elsewhere is a deliberate layout and stays allowed, while `../../other/x.wav` is almost always a
mistake that would silently read another tree. Absolute paths are taken as given (they say where they are).
"""
from __future__ import annotations

import os
from pathlib import Path

from cache.quarantine import Reason
from tts_core.audio import AudioRejected


def clip_path(audio_root: str | Path, audio_path: str, allow_outside_root: bool = False) -> Path:
    """The file to read for ``audio_path``; AudioRejected(Reason.OUTSIDE_ROOT) when it escapes the root."""
    if "\x00" in audio_path:
        raise AudioRejected(Reason.BAD_PATH, f"{audio_path!r} contains a NUL byte; fix the path")
    joined = Path(audio_root) / audio_path
    if allow_outside_root or Path(audio_path).is_absolute():
        return joined
    root = os.path.abspath(audio_root)
    if os.path.commonpath([root, os.path.abspath(joined)]) != root:
        raise AudioRejected(Reason.OUTSIDE_ROOT, f"{audio_path} leaves --audio-root {audio_root} (through '..'); "
                                                 "fix the path, or pass --allow-outside-root if that is intended")
    return joined
