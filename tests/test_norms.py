import json

import numpy as np

from cache import norms


def test_report_numbers_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    spk = rng.normal(size=(500, 256)).astype(np.float32)
    spk /= np.linalg.norm(spk, axis=1, keepdims=True)
    xv = rng.normal(scale=1.0, size=(500, 192)).astype(np.float32)
    sn, xn = np.linalg.norm(spk, axis=1), np.linalg.norm(xv, axis=1)
    r = norms.norm_report(sn, xn, {"spk_emb": True, "xvec": True})
    assert r.spk.count == r.xvec.count == 500
    np.testing.assert_allclose([r.xvec.mean, r.xvec.std, r.xvec.min, r.xvec.max],
                               [xn.mean(), xn.std(), xn.min(), xn.max()], rtol=1e-6)
    np.testing.assert_allclose(r.ratio, xn.mean() / sn.mean(), rtol=1e-6)
    assert r.spk.verdict == "unit-norm" and r.xvec.verdict == "not unit-norm"
    assert r.verdict == "imbalance"  # ~13.8 vs 1, like raw CAM++ vs VoiceEncoder
    assert sum(r.xvec.hist_counts) == 500
    paths = norms.save_report(r, tmp_path)
    saved = json.loads(open(paths["json"]).read())
    assert saved["xvec"]["mean"] == r.xvec.mean
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    assert "imbalance" in open(paths["md"]).read()


def test_verdicts():
    ones = np.ones(10)
    assert norms.norm_report(ones, ones, {}).verdict == "already unit-norm"
    assert norms.norm_report(ones, ones * 1.5, {}).verdict == "normalise"
    assert norms.norm_report(ones, ones * 0.3, {}).verdict == "imbalance"


def test_sample_is_seeded_and_bounded():
    a, b = norms.sample_rows(1000, 100, seed=3), norms.sample_rows(1000, 100, seed=3)
    assert len(a) == 100 and (a == b).all() and len(set(a)) == 100
    assert norms.sample_rows(50, 100) is None
