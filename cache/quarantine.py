"""Why a metadata line is quarantined: the one table of reason codes, what each means, what to do.

The codes are the store's contract: a quarantined row's `reason` in manifest.parquet (and the counts in the
build summary and the `<store>-quarantine` artifact) is one of them, spelled as here, so stores already
written read the same. Every producer — the metadata parser (`tts_core.metadata`), the caption grouping
(`tts_core.captions`), the audio checks (`tts_core.audio`, `tts_core.audio_paths`) and the encoder
(`tts_core.cachebuild.shards`) — names its reason through `Reason`. docs/cache.md's "Quarantine reasons"
table is `REASONS`, row for row (tests/test_quarantine.py keeps the two equal).

No project imports: the parser and the audio checks below every other module use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """A stable reason code (a `str`: written to the manifest as its value). In the order a build decides them."""

    # the line itself (tts_core.metadata)
    BAD_FIELD_COUNT = "bad_field_count"
    EMPTY_FIELD = "empty_field"
    # the line against earlier lines of its clip (tts_core.captions)
    DUPLICATE_CLIP = "duplicate_clip"
    TRANSCRIPT_CONFLICT = "transcript_conflict"
    CLIP_QUARANTINED = "clip_quarantined"
    # the path and the file (tts_core.audio_paths, tts_core.audio)
    OUTSIDE_ROOT = "outside_root"
    PATH_TOO_LONG = "path_too_long"
    BAD_PATH = "bad_path"
    MISSING_FILE = "missing_file"
    EMPTY_FILE = "empty_file"
    # the audio (tts_core.audio)
    UNREADABLE = "unreadable"
    EMPTY_AUDIO = "empty_audio"
    NAN_AUDIO = "nan_audio"
    OUT_OF_RANGE = "out_of_range"
    BAD_SAMPLE_RATE = "bad_sample_rate"
    BAD_CHANNELS = "bad_channels"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    SILENT = "silent"
    # the frozen models (tts_core.cachebuild.shards)
    MODEL_ERROR = "model_error"
    MODEL_NONFINITE = "model_nonfinite"


@dataclass(frozen=True)
class ReasonInfo:
    """One row of docs/cache.md's table (markdown): what the reason means, and what the user should do."""

    meaning: str
    action: str


REASONS: dict[Reason, ReasonInfo] = {
    Reason.BAD_FIELD_COUNT: ReasonInfo("not 3, 4 or 5 pipe-separated fields",
                                       "fix the line (the detail names `file:line`)"),
    Reason.EMPTY_FIELD: ReasonInfo("audio path, transcript or instruction is empty", "fill it in"),
    Reason.DUPLICATE_CLIP: ReasonInfo("the same clip with the same instruction is listed twice",
                                      "remove one (the detail names the first line)"),
    Reason.TRANSCRIPT_CONFLICT: ReasonInfo("the same audio with another transcript (or language)",
                                           "fix one of the two lines (both are named)"),
    Reason.CLIP_QUARANTINED: ReasonInfo("a caption whose clip's audio was quarantined", "see the clip's line"),
    Reason.OUTSIDE_ROOT: ReasonInfo("a relative path whose `..` leaves `--audio-root`",
                                    "fix the path, or pass `--allow-outside-root`"),
    Reason.PATH_TOO_LONG: ReasonInfo("the path is longer than the file system allows (`ENAMETOOLONG`)", "shorten it"),
    Reason.BAD_PATH: ReasonInfo("the path holds a NUL byte", "fix the path"),
    Reason.MISSING_FILE: ReasonInfo("the audio file does not exist, or is a directory, device or pipe",
                                    "fix the path or `--audio-root`"),
    Reason.EMPTY_FILE: ReasonInfo("the file has 0 bytes", "re-export it"),
    Reason.UNREADABLE: ReasonInfo("libsndfile cannot decode it (corrupt, truncated, unknown format), the OS refuses "
                                  "to open it, or loading failed in a way no check foresaw (the detail names the "
                                  "error)", "re-encode as WAV/FLAC"),
    Reason.EMPTY_AUDIO: ReasonInfo("decodes to 0 samples", "re-export it"),
    Reason.NAN_AUDIO: ReasonInfo("contains NaN/inf samples", "re-export it"),
    Reason.OUT_OF_RANGE: ReasonInfo("float samples beyond ±100 (+40 dBFS; a broken writer's, e.g. 3e29): they "
                                    "would overflow every fit", "re-export it"),
    Reason.BAD_SAMPLE_RATE: ReasonInfo("below 8 kHz or above 384 kHz (from the header)", "use a sane-rate source"),
    Reason.BAD_CHANNELS: ReasonInfo("more than 32 channels (from the header)", "export the speech channel"),
    Reason.TOO_SHORT: ReasonInfo("shorter than 0.5 s", "remove it, or record a longer take"),
    Reason.TOO_LONG: ReasonInfo("longer than 30 s (judged from the header, before decoding)", "trim or split it"),
    Reason.SILENT: ReasonInfo("peak below 1e-3 (about −60 dBFS) after removing the mean (a DC offset alone is "
                              "silence)", "remove it"),
    Reason.MODEL_ERROR: ReasonInfo("a frozen model failed on this clip (the detail names the error)",
                                   "inspect the clip"),
    Reason.MODEL_NONFINITE: ReasonInfo("a frozen model returned NaN/inf on this clip", "inspect the clip"),
}
assert set(REASONS) == set(Reason), "every Reason has its row"
