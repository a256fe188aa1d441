"""Stage 1 on a real cache of the embedded default, through the command a user types.

The learning test is the product claim in miniature: from instruction text alone, the mapper predicts
held-out voices better than the best instruction-blind guess (the train-set mean vector)."""
from __future__ import annotations

import json

import pytest

from instruct_tts.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_train_stage1_beats_the_mean_vector_on_held_out_instructions(demo_store, tmp_path, capsys):
    store, _ = demo_store
    out = tmp_path / "mapper"
    rc = main(["train-stage1", "--store", store, "--out", str(out), "--phase", "1", "--no-prefect", "--device", "cpu",
               "--lr", "3e-3", "--batch-size", "64", "--hidden-dim", "256", "--n-blocks", "4", "--held-out-frac", "0.2",
               "--max-steps", "500", "--eval-every", "100", "--patience", "10"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    best, b = m["best"], m["baselines"]
    curve = [round(h["avg_cos"], 3) for h in m["history"]]
    print(f"\nheld-out SpkCos {best['spk_cos']:.4f} (mean {b['mean_spk_cos']:.4f}, NN {b['nn_spk_cos']:.4f}); "
          f"XVecCos {best['xvec_cos']:.4f} (mean {b['mean_xvec_cos']:.4f}, NN {b['nn_xvec_cos']:.4f}); curve {curve}")
    assert best["spk_cos"] > b["mean_spk_cos"] and best["xvec_cos"] > b["mean_xvec_cos"]
    assert best["spk_cos"] > b["nn_spk_cos"] and best["xvec_cos"] > b["nn_xvec_cos"]
    assert max(curve) > curve[0] + 0.02  # still improving after the first evaluation
    assert "train-set mean vector" in capsys.readouterr().out  # the report is printed


def test_cli_refuses_a_store_without_instruction_states(tmp_path, capsys):
    rc = main(["train-stage1", "--store", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o"),
               "--no-prefect"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.zarr" in err
