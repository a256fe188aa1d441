from pathlib import Path

import numpy as np
import pytest

from bad_audio import tone, write_bad_clips
from tts_core.audio import AudioRejected, load_clip
from tts_core.captions import group_captions
from tts_core.metadata import MetadataError, lines_digest, read_metadata


def test_every_bad_clip_gets_its_reason(tmp_path):
    expected = write_bad_clips(tmp_path)
    for name, reason in expected.items():
        if reason:
            with pytest.raises(AudioRejected) as info:
                load_clip(tmp_path / name)
            assert info.value.reason == reason, name
            assert name in info.value.detail  # the message names the file
        else:
            a = load_clip(tmp_path / name)
            assert a.wav.dtype == np.float32 and a.wav.ndim == 1
            assert abs(a.duration - 1.0) < 1e-3


def test_conversions_are_notes_and_correct(tmp_path):
    write_bad_clips(tmp_path)
    stereo = load_clip(tmp_path / "stereo.wav")
    assert stereo.notes == ["2ch->mono"]
    np.testing.assert_allclose(stereo.wav, (tone(1.0) + tone(1.0, f0=330)) / 2, atol=2e-4)  # PCM_16 rounding
    resampled = load_clip(tmp_path / "rate44k.wav")
    assert resampled.notes == ["44100->16000Hz"] and resampled.wav.shape == (16_000,)
    spec = np.abs(np.fft.rfft(resampled.wav))
    assert abs(np.argmax(spec) - 220) <= 1  # 1 s at 16 kHz: bin index == Hz


def test_metadata_lines_and_reasons(tmp_path):
    meta = tmp_path / "meta.txt"
    meta.write_text(
        "# comment\n"
        "a.wav|Xin chào, tôi là giọng nữ.|Giọng nữ trầm, nói chậm.\n"
        "\n"
        "b.wav|only two fields\n"
        "c.wav||an instruction\n"
        "a.wav|dup|dup instruction\n"
        "d/e.flac|text|instr|spk7\n"
        "f.wav|a|b|c|d|e\n"
        "g.wav|Ça va ?|instr|spk7| FR \n", encoding="utf-8")
    lines, sha = read_metadata(meta)
    assert [m.row for m in lines] == [0, 1, 2, 3, 4, 5, 6]
    assert [m.line for m in lines] == [2, 4, 5, 6, 7, 8, 9]
    assert [m.reason for m in lines] == ["", "bad_field_count", "empty_field", "", "", "bad_field_count", ""]
    lines = group_captions(lines, meta.parent, "meta.txt")  # which lines are one clip (tts_core.captions)
    assert [m.reason for m in lines] == ["", "bad_field_count", "empty_field", "transcript_conflict", "",
                                         "bad_field_count", ""]
    assert lines[6].language == "fr" and lines[4].language == ""  # 5th column: the multilingual T3's language
    assert lines[0].transcript.encode() == "Xin chào, tôi là giọng nữ.".encode()  # byte-exact
    assert lines[2].detail.startswith("meta.txt:5") and "transcript" in lines[2].detail
    assert "line 2" in lines[3].detail
    assert lines[4].speaker == "spk7" and lines[4].clip_id == "d/e"
    assert len(sha) == 64
    assert lines_digest(lines[:2]) != lines_digest(lines[:3])
    no_lang = lines[6].__class__(**{**lines[6].__dict__, "language": ""})
    assert lines_digest([no_lang]) != lines_digest(lines[6:])


def test_metadata_not_utf8_names_the_line(tmp_path):
    meta = tmp_path / "meta.txt"
    meta.write_bytes("a.wav|ok|ok\n".encode() + "b.wav|caf\xe9|x\n".encode("latin-1"))
    with pytest.raises(MetadataError, match=r"meta.txt:2.*UTF-8"):
        read_metadata(meta)
