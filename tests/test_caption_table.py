"""The caption table (cache/captions.py): construction from store rows, validation, and the operations the
stages use, checked against values worked by hand."""
import numpy as np
import pytest

from cache import schema
from cache.captions import CaptionTable

OK, CAP, BAD = schema.STATUS_OK, schema.STATUS_CAPTION, schema.STATUS_QUARANTINED


def table(*clips):
    return CaptionTable.from_counts([len(c) for c in clips], [i for c in clips for i in c])


def test_from_store_rows_groups_captions_under_their_clip_in_line_order():
    # rows: clip A (id 0), clip B (id 1), caption of A (id 2), quarantined, caption of B (id 3),
    # clip C without instruction, caption of A (id 4)
    status = np.array([OK, OK, CAP, BAD, CAP, OK, CAP])
    clip_row = np.array([-1, -1, 0, -1, 1, -1, 0])
    iid = np.array([0, 1, 2, 7, 3, -1, 4])
    t = CaptionTable.from_store_rows(status, clip_row, iid, OK, CAP)
    assert t.offsets.tolist() == [0, 3, 5, 5]
    assert t.ids.tolist() == [0, 2, 4, 1, 3]
    assert t.first.tolist() == [0, 1, -1]
    assert t.clip_of.tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("offsets,ids", [([1, 2], [0]), ([0, 2], [0]), ([0, 2, 1], [0, 1]), ([0, 1], [-1]), ([], [])])
def test_malformed_tables_are_refused(offsets, ids):
    with pytest.raises(ValueError):
        CaptionTable(np.array(offsets, np.int64), np.array(ids, np.int64))


def test_one_per_clip_and_check_first():
    t = CaptionTable.one_per_clip(np.array([3, -1, 5]))
    assert t.offsets.tolist() == [0, 1, 1, 2] and t.ids.tolist() == [3, 5]
    t.check_first(np.array([3, -1, 5]))
    with pytest.raises(ValueError):
        t.check_first(np.array([3, 4, 5]))


def test_subset_keep_and_without():
    t = table([0, 2, 4], [1], [], [5, 6])
    s = t.subset(np.array([3, 0]))
    assert s.offsets.tolist() == [0, 2, 5] and s.ids.tolist() == [5, 6, 0, 2, 4]
    k = t.keep(np.array([0, 4]))
    assert k.offsets.tolist() == [0, 1, 1, 1, 2] and k.ids.tolist() == [0, 5]
    w = t.without(np.array([0, 1, 6]))
    assert w.offsets.tolist() == [0, 2, 2, 2, 3] and w.ids.tolist() == [2, 4, 5]
    assert w.first.tolist() == [2, -1, -1, 5]


def test_draw_is_uniform_over_a_clips_captions_and_leaves_the_rng_alone_without_a_choice():
    single = table([3], [], [4])
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert single.draw(np.array([0, 1, 2]), rng).tolist() == [3, -1, 4]
    assert rng.bit_generator.state == state
    t = table([0, 1, 2], [], [9])
    draws = np.stack([t.draw(np.array([0, 1, 2]), rng) for _ in range(3000)])
    assert set(draws[:, 1]) == {-1} and set(draws[:, 2]) == {9}
    freq = np.bincount(draws[:, 0], minlength=3) / len(draws)
    assert np.allclose(freq, 1 / 3, atol=0.04)
