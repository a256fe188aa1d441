"""Issue #22: no single metadata line or clip can stop, or silently skew, a build.

Unit tests per case here; the end-to-end build of every case and the fuzz test are in
tests/test_bad_input_build.py, the store cases (symlinked store, another --audio-root) in
tests/test_store_faults.py.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bad_audio import tone
from tts_core.audio import AudioPolicy, AudioRejected, load_clip
from tts_core.audio_paths import clip_path
from tts_core.cachebuild.build import BuildConfig
from tts_core.cachebuild.shards import load_line
from tts_core.metadata import MetaLine, read_metadata
from cache.store import StoreError


def _line(audio: str, line: int = 7) -> MetaLine:
    return MetaLine(0, line, audio, "t", "i", "")


def test_path_longer_than_the_file_system_allows_is_quarantined(tmp_path):
    for audio in ("a" * 300 + ".wav", "/".join(["d" * 200] * 30) + ".wav"):  # one name > 255 bytes; path > 4096
        r = load_line(tmp_path, "meta.txt", AudioPolicy(), _line(audio))
        assert isinstance(r, AudioRejected) and r.reason == "path_too_long", audio
        assert r.detail.startswith("meta.txt:7: ") and "shorten the path" in r.detail and len(r.detail) < 400


def test_nul_byte_in_a_path_is_quarantined(tmp_path):
    r = load_line(tmp_path, "meta.txt", AudioPolicy(), _line("a\x00b.wav"))
    assert isinstance(r, AudioRejected) and r.reason == "bad_path" and r.detail.startswith("meta.txt:7: ")


def test_huge_finite_samples_are_out_of_range(tmp_path):
    wav = tone(1.0)
    wav[100:200] = 3e29  # what a broken float WAV writer leaves
    sf.write(tmp_path / "huge.wav", wav, 16_000, subtype="FLOAT")
    with pytest.raises(AudioRejected) as info:
        load_clip(tmp_path / "huge.wav")
    assert info.value.reason == "out_of_range" and "3.00e+29" in info.value.detail
    loud = tone(1.0) * 3  # a clipped-but-sane float file (+10 dBFS) is still speech
    sf.write(tmp_path / "loud.wav", loud, 16_000, subtype="FLOAT")
    assert load_clip(tmp_path / "loud.wav").duration == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["mel-vq", "world-vq"])
def test_a_fit_that_meets_a_non_finite_clip_names_it(kind):
    from tts_core.encoders import embedded

    good = [tone(1.0, f0=150 + 20 * i) for i in range(3)]
    bad = tone(1.0)
    bad[:4000] = np.inf  # what no clip check let through: the fit must name it, never a library message
    with pytest.raises(embedded.FitInputError) as info:
        embedded.fit(kind, good[:2] + [bad] + good[2:])
    assert info.value.clip == 2


def test_zero_or_negative_chunk_rows_is_refused_in_one_line(capsys):
    from instruct_tts.cli import main as cli_main

    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as info:
            cli_main(["build-cache", "--no-prefect", "--metadata", "m.txt", "--audio-root", ".", "--store", "s.zarr",
                      "--chunk-rows", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "--chunk-rows: must be a positive integer" in err and "Traceback" not in err
    with pytest.raises(StoreError, match="--chunk-rows must be a positive integer, got 0"):
        BuildConfig(metadata=Path("m.txt"), audio_root=Path("."), store="s.zarr", chunk_rows=0)


def _sparse_wav(path: Path, seconds: int, sr: int, channels: int) -> None:
    """A PCM-16 WAV whose header says ``seconds`` long, written sparse (costs no disk, reads as zeros)."""
    data = seconds * sr * channels * 2
    header = (b"RIFF" + (36 + data).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (1).to_bytes(2, "little") + channels.to_bytes(2, "little") + sr.to_bytes(4, "little")
              + (sr * channels * 2).to_bytes(4, "little") + (channels * 2).to_bytes(2, "little")
              + (16).to_bytes(2, "little") + b"data" + data.to_bytes(4, "little"))
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)


def test_one_hour_file_is_too_long_without_decoding_it(tmp_path, monkeypatch):
    import tts_core.audio as audio

    _sparse_wav(tmp_path / "hour.wav", 3600, 48_000, 2)  # 691 MB of PCM; decoded as float32: 1.4 GB

    def no_decoding(*a, **kw):
        raise AssertionError("the samples were read")

    monkeypatch.setattr(audio.sf, "read", no_decoding)
    with pytest.raises(AudioRejected) as info:
        load_clip(tmp_path / "hour.wav")
    assert info.value.reason == "too_long" and "3600.0 s" in info.value.detail


def test_header_that_understates_its_length_costs_no_more_than_the_limit(tmp_path, monkeypatch):
    import tts_core.audio as audio

    sf.write(tmp_path / "long.wav", tone(40.0, sr=8_000), 8_000, subtype="PCM_16")
    real_info = audio.sf.info

    def lying_info(path):
        i = real_info(path)
        i.frames = 8_000  # says 1 s
        return i

    asked = []
    real_read = audio.sf.read
    monkeypatch.setattr(audio.sf, "info", lying_info)
    monkeypatch.setattr(audio.sf, "read", lambda *a, **kw: asked.append(kw["frames"]) or real_read(*a, **kw))
    with pytest.raises(AudioRejected, match="too_long"):
        load_clip(tmp_path / "long.wav")
    assert asked == [30 * 8_000 + 1]


def _grep_n(path: Path, needle: str) -> int:
    out = subprocess.run(["grep", "-a", "-n", "-F", needle, str(path)], capture_output=True, check=True).stdout
    (hit,) = out.decode().rstrip("\n").split("\n")  # grep -n's lines: only \n ends one
    return int(hit.split(":", 1)[0])


def test_only_newline_ends_a_metadata_line(tmp_path):
    meta = tmp_path / "meta.txt"
    odd = {"ls": "\u2028", "nel": "\x85", "ff": "\x0c", "cr": "\r", "ps": "\u2029", "vt": "\x0b", "fs": "\x1c"}
    body = "".join(f"{k}.wav|before{c}after {k}|calm voice\n" for k, c in odd.items())
    meta.write_bytes(("# head\r\n" + body + "last.wav|x|y|z|w|v\r\n").encode())
    lines, _ = read_metadata(meta)
    assert [m.audio_path for m in lines] == [f"{k}.wav" for k in odd] + ["last.wav"]
    for m, (k, c) in zip(lines, odd.items()):
        assert m.ok and m.transcript == f"before{c}after {k}"  # kept byte-exact
        assert m.line == _grep_n(meta, f"{k}.wav|")
    assert lines[-1].reason == "bad_field_count" and lines[-1].detail.startswith(f"meta.txt:{_grep_n(meta, 'last.wav')}:")
    assert lines[-1].line == 9


def test_dotdot_leaving_the_audio_root_is_quarantined(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    sf.write(tmp_path / "outside.wav", tone(1.0), 16_000)
    sf.write(root / "sub" / "in.wav", tone(1.0), 16_000)
    for bad in ("../outside.wav", "sub/../../outside.wav"):
        r = load_line(root, "meta.txt", AudioPolicy(), _line(bad, 4))
        assert isinstance(r, AudioRejected) and r.reason == "outside_root"
        assert r.detail.startswith("meta.txt:4: ") and str(root) in r.detail and "--allow-outside-root" in r.detail
    allowed = load_line(root, "meta.txt", AudioPolicy(allow_outside_root=True), _line("../outside.wav"))
    assert allowed.duration == pytest.approx(1.0)
    assert clip_path(root, "sub/../sub/in.wav") == root / "sub/../sub/in.wav"  # `..` that stays inside: fine
    (root / "link").symlink_to(tmp_path, target_is_directory=True)  # symlinks stay allowed
    assert load_line(root, "meta.txt", AudioPolicy(), _line("link/outside.wav")).duration == pytest.approx(1.0)
    assert clip_path(root, str(tmp_path / "outside.wav")) == tmp_path / "outside.wav"  # absolute: as given


def test_dc_offset_alone_is_silent(tmp_path):
    sf.write(tmp_path / "dc.wav", np.full(16_000, 0.5, np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(AudioRejected) as info:
        load_clip(tmp_path / "dc.wav")
    assert info.value.reason == "silent"
    sf.write(tmp_path / "speech_on_dc.wav", 0.5 + tone(1.0, amp=0.1), 16_000, subtype="FLOAT")
    assert load_clip(tmp_path / "speech_on_dc.wav").duration == pytest.approx(1.0)


def test_odd_sample_rate_resamples_cheaply(tmp_path):
    sf.write(tmp_path / "odd.wav", tone(1.0, sr=44_101), 44_101, subtype="PCM_16")
    a = load_clip(tmp_path / "odd.wav")  # torchaudio's kernel for 44101 -> 16000 Hz needed 12 GB and 47 s
    assert a.notes == ["44101->16000Hz"] and abs(len(a.wav) - 16_000) <= 1
    assert abs(np.argmax(np.abs(np.fft.rfft(a.wav[:16_000]))) - 220) <= 1


def test_absurd_channel_count_and_rate_are_refused_from_the_header(tmp_path):
    sf.write(tmp_path / "many.wav", np.zeros((16_000, 40), np.float32) + tone(1.0)[:, None], 16_000, subtype="PCM_16")
    with pytest.raises(AudioRejected, match="bad_channels"):
        load_clip(tmp_path / "many.wav")
    with pytest.raises(AudioRejected, match="bad_sample_rate"):
        load_clip(tmp_path / "many.wav", AudioPolicy(max_sample_rate=8_000))
