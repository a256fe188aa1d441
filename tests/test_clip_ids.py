"""One clip, one id: `clip_id` is the audio path without its extension, disambiguated (`#2`, `#3`, ...) only
when an earlier clip has it, and never changes once written (resume, append)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from cache.reader import CacheReader
from tts_core.cachebuild.build import BuildConfig, build_cache
from tts_core.captions import ClipIds, group_captions
from tts_core.metadata import path_id, read_metadata


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_path_id_is_the_path_without_its_extension():
    assert path_id("wavs/0001.wav") == "wavs/0001" and path_id("./a//b.c.flac") == "a/b.c"
    assert path_id("a\\b.wav") == "a/b" and path_id("/data/x.wav") == "/data/x"
    assert path_id(".") == "." and path_id("/") == "/"  # no file name: its own id (it used to raise)


def test_collisions_get_the_first_free_suffix_and_ids_are_prefix_stable(tmp_path):
    meta = _write(tmp_path / "meta.txt", [
        "stem.wav|One.|A.",            # stem
        "stem.flac|Two.|B.",           # another recording, same path id: stem#2
        "./stem.flac|Two.|C.",         # a caption of line 2: its clip's id
        "stem.flac|Two.|B.",           # duplicate_clip of line 2: its clip's id
        "stem.wav|One.|D.|spk2",       # the same file under another speaker: another clip, stem#3
        "stem#2.wav|Three.|E.",        # its own path id is taken by line 2: stem#2#2
        "other.wav|Four.|F.",          # unique: unchanged
        "bad line",                    # quarantined for itself: its path id
    ])
    raw = read_metadata(meta)[0]
    lines = group_captions(raw, tmp_path, "meta.txt")
    assert [m.clip_id for m in lines] == ["stem", "stem#2", "stem#2", "stem#2", "stem#3", "stem#2#2", "other",
                                          "bad line"]
    assert [m.reason for m in lines][2:4] == ["", "duplicate_clip"] and lines[2].clip_of == 1
    for k in range(1, len(lines)):  # what an earlier (shorter) metadata file gave its lines, the longer one keeps
        assert [m.clip_id for m in group_captions(raw[:k], tmp_path, "meta.txt")] == [m.clip_id for m in lines[:k]]


def test_clip_ids_never_reuse_an_id_taken_before():
    ids = ClipIds()
    assert [ids.take(p) for p in ["a", "a", "a#2", "a", "a#3"]] == ["a", "a#2", "a#2#2", "a#3", "a#3#2"]


def _corpus(demo_corpus, tmp_path: Path, n: int) -> tuple[list[str], Path]:
    """``n`` demo lines with their audio under tmp_path/audio, plus stem.wav and stem.flac: two different
    recordings whose paths differ only in the extension."""
    good = [line for line in demo_corpus.metadata.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")][: n + 2]
    root = tmp_path / "audio"
    (root / "wavs").mkdir(parents=True)
    for line in good:
        p = line.split("|")[0]
        shutil.copy(demo_corpus.root / p, root / p)
    shutil.copy(demo_corpus.root / good[-2].split("|")[0], root / "stem.wav")
    wav, sr = sf.read(demo_corpus.root / good[-1].split("|")[0], dtype="float32")
    sf.write(root / "stem.flac", wav, sr, format="FLAC")
    return good[:n], root


def test_stem_wav_and_stem_flac_are_two_clips_with_two_ids_through_resume_and_append(demo_corpus, tmp_path):
    good, root = _corpus(demo_corpus, tmp_path, 5)
    lines = good[:3] + ["stem.wav|The first recording.|A calm voice.", "stem.flac|The second one.|A bright voice."]
    meta = _write(tmp_path / "meta.txt", lines)

    def build(store: Path, metadata: Path = meta, **kw):
        return build_cache(BuildConfig(metadata=metadata, audio_root=root, store=str(store), chunk_rows=4,
                                       tokenizer_fit_clips=5, **kw))

    build(tmp_path / "ref.zarr")
    assert not build(tmp_path / "c.zarr", max_batches=1).complete  # stem.wav's batch only
    assert build(tmp_path / "c.zarr").resumed_from == 4
    ref, r = CacheReader(str(tmp_path / "ref.zarr")), CacheReader(str(tmp_path / "c.zarr"))
    pd.testing.assert_frame_equal(ref.manifest, r.manifest)
    man = r.manifest
    assert man.clip_id.tolist()[3:] == ["stem", "stem#2"] and man.status.tolist() == ["ok"] * 5
    assert man.clip_id.tolist()[:3] == [line.split("|")[0].removesuffix(".wav") for line in good[:3]]  # unchanged
    spk = r.spk_emb()
    assert not np.allclose(spk[3], spk[4])  # two recordings, both encoded

    # appended later: another caption of stem.flac, stem.wav under a speaker label, and a clip whose path id
    # is the id stem.flac was given
    shutil.copy(root / "stem.wav", root / "stem#2.wav")
    more = _write(tmp_path / "more.txt", lines + good[3:] + [
        "./stem.flac|The second one.|A third wording.", "stem.wav|The first recording.|Low.|spk2",
        "stem#2.wav|A third recording.|Loud."])
    s = build(tmp_path / "c.zarr", metadata=more)
    assert s.complete and s.n_quarantined == 0
    grown = CacheReader(str(tmp_path / "c.zarr")).manifest
    pd.testing.assert_frame_equal(grown.iloc[:5], man)  # what was written stays as written
    assert grown.clip_id.tolist()[7:] == ["stem#2", "stem#3", "stem#2#2"]
    assert grown.status.tolist()[7:] == ["caption", "ok", "ok"]
    ok_ids = CacheReader(str(tmp_path / "c.zarr")).ok_manifest.clip_id
    assert ok_ids.is_unique and len(ok_ids) == 9
