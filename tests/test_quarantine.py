"""The quarantine reasons have one home (`cache.quarantine`): every producer takes its code from there, and
docs/cache.md's table is that table, row for row."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from cache.quarantine import REASONS, Reason, ReasonInfo
from tts_core.audio import AudioPolicy

REPO = Path(__file__).resolve().parents[1]


def doc_table() -> dict[str, ReasonInfo]:
    """docs/cache.md's "Quarantine reasons" table: code → (meaning, what to do), every row of it."""
    text = (REPO / "docs" / "cache.md").read_text(encoding="utf-8")
    section = text.split("\n## Quarantine reasons\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 3 and cells[0].count("`") == 2, f"one code, its meaning, what to do: {row}"
        code = cells[0].strip("`")
        assert code not in rows, f"{code} listed twice"
        rows[code] = ReasonInfo(cells[1], cells[2])
    return rows


def test_every_reason_has_its_row():
    assert set(REASONS) == set(Reason)


def test_docs_list_exactly_the_reasons_of_the_table():
    doc = doc_table()
    assert sorted(set(Reason) - set(doc)) == [], "reasons missing from docs/cache.md"
    assert sorted(set(doc) - set(Reason)) == [], "docs/cache.md lists reasons the code never gives"
    for reason, info in REASONS.items():
        assert doc[reason] == info, reason
    assert list(doc) == list(REASONS)  # in the table's order


def test_codes_are_the_strings_stores_were_written_with():
    """Manifests already written say these; a renamed code would read as an unknown reason."""
    assert [r.value for r in Reason] == [
        "bad_field_count", "empty_field", "duplicate_clip", "transcript_conflict", "clip_quarantined",
        "outside_root", "path_too_long", "bad_path", "missing_file", "empty_file", "unreadable", "empty_audio",
        "nan_audio", "out_of_range", "bad_sample_rate", "bad_channels", "too_short", "too_long", "silent",
        "model_error", "model_nonfinite"]
    assert all(isinstance(r, str) and str(r) == r.value and f"{r}" == r.value for r in Reason)


def test_meanings_quote_the_audio_policy_it_applies():
    p = AudioPolicy()
    said = {Reason.TOO_SHORT: f"{p.min_seconds:g} s", Reason.TOO_LONG: f"{p.max_seconds:g} s",
            Reason.BAD_SAMPLE_RATE: f"{p.min_sample_rate // 1000:g} kHz", Reason.BAD_CHANNELS: str(p.max_channels),
            Reason.OUT_OF_RANGE: f"±{p.max_peak:g}"}
    assert f"{p.max_sample_rate // 1000:g} kHz" in REASONS[Reason.BAD_SAMPLE_RATE].meaning
    assert float(re.search(r"peak below (\S+)", REASONS[Reason.SILENT].meaning).group(1)) == p.silence_peak
    for reason, text in said.items():
        assert text in REASONS[reason].meaning, (reason, text)


def test_no_module_spells_a_code_itself():
    """Producers name `Reason` members: a code typed as a string anywhere else is a second home."""
    codes = {r.value for r in Reason}
    found = []
    for top in ("cache", "tts_core", "flows", "instruct_tts", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path == REPO / "cache" / "quarantine.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in codes:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert found == [], "use cache.quarantine.Reason:\n" + "\n".join(found)
