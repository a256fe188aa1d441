"""The lab's measurements: stage-1 cosines against references, held-out speech loss, per-clip attributes.

Each function answers one question about trained artifacts on held-out clips; `instruct_tts.lab.measurements` runs them and
`lab_report` turns the numbers into tables. Statistics (intervals, chance) live in `stats`.

* `stage1_cosines`: per held-out clip, AvgCos = (SpkCos + XVecCos) / 2 of three predictions of its voice vectors —
  the train-set *mean* vector (knows nothing), the gender+pitch *oracle* (the mean vector of the training clips
  with the clip's true gender and pitch level: what an instruction can at best say about a voice in this corpus,
  up to rate/loudness), and the stage-1 *model* (what the mapper hands stage 2 and synthesis: its recorded
  temperature and draw count, fixed noise) — each as SpkCos, XVecCos and their mean; beside them one draw, the mean
  of 16 draws, a (temperature, draws) sampling curve and an oracle keyed by the undescribed timbre (diagnostics);
* `speech_losses`: teacher-forced speech-token cross-entropy of a T3 checkpoint on instruction-only rows (mapper
  speaker embedding, no audio prompt, dropout off) — on held-out clips and, for a like-for-like comparison, on
  as many training clips: the gap between the two is memorisation;
* `instruction_probe_rows`: what the frozen instruction embedding says about each held-out instruction's levels
  (`instruction_probe`), in the shape of `attribute_row` so the same direction accuracy scores it;
* `attribute_row`: what `directions` scores for one rendered clip.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tts_core.corpus.reading import parse_instruction
from tts_core.evaluation.measures import measure

POOL_CHUNK = 256


VECTORS = ("spk", "xvec")  # SpkCos, XVecCos; "avg" is their mean
# the stage-1 sampling curve the lab measures: (temperature, draws averaged) per point (docs/lab.md)
CURVE_PREFIX = "curve "
SAMPLING_CURVE = ((1.0, 1), (0.3, 1), (0.1, 1), (0.3, 16), (0.8, 16), (0.3, 64), (0.8, 64), (1.0, 64))


@torch.no_grad()
def stage1_cosines(data, model, train_rows: np.ndarray, eval_rows: np.ndarray, oracle_keys: Sequence[str],
                   n_steps: int | None = None, seed: int = 1234, timbre_keys: Sequence[str] | None = None,
                   n_draws: int = 16, curve: Sequence[tuple[float, int]] = ()) -> dict[str, np.ndarray]:
    """Per eval row, cosines of each prediction of its voice vectors: ``{name: AvgCos}`` and ``{name.spk: SpkCos,
    name.xvec: XVecCos}`` for name in "mean", "oracle", "model", "model_one_draw", "model_mean",
    ["timbre_oracle"], and "curve T=<t> K=<k>" per ``curve`` point. ``data``: `Stage1Data` holding both row sets;
    ``model``: `Stage1Model`; ``oracle_keys``: one key per data row (e.g. "male/low").

    "model" is what stage 2 and synthesis get: the mapper's recorded temperature and ``draws``. Diagnostics
    beside it: "model_one_draw" (one draw at that temperature: the voice-variety setting), "model_mean", the
    mean of ``n_draws`` draws (its estimate of the conditional mean: one draw scores below it by the spread it
    samples), the sampling curve and, with ``timbre_keys`` (e.g. the espeak variant), the same oracle keyed by
    what no instruction describes — how much of the voice vectors' variance the instructions could never explain.
    Every mapper point draws its noise from a generator seeded with ``seed``, so the points differ only by
    their setting."""
    spk, xv = data.spk, data.xvec
    tr, ev = torch.as_tensor(train_rows, dtype=torch.long), torch.as_tensor(eval_rows, dtype=torch.long)
    n = len(ev)
    out: dict[str, np.ndarray] = {}

    def put(name: str, p_spk: torch.Tensor, p_xv: torch.Tensor) -> None:
        out[f"{name}.spk"] = F.cosine_similarity(p_spk.float(), spk[ev], dim=-1).numpy()
        out[f"{name}.xvec"] = F.cosine_similarity(p_xv.float(), xv[ev], dim=-1).numpy()
        out[name] = (out[f"{name}.spk"] + out[f"{name}.xvec"]) / 2

    def oracle(name: str, row_keys: Sequence[str]) -> None:
        keys = np.asarray(row_keys, dtype=object)
        o_spk, o_xv = spk[tr].mean(0).repeat(n, 1), xv[tr].mean(0).repeat(n, 1)
        for key in np.unique(keys[eval_rows]):
            same = torch.from_numpy(np.flatnonzero(keys[train_rows] == key))
            at = torch.from_numpy(np.flatnonzero(keys[eval_rows] == key))
            if len(same):  # a key no training clip has keeps the mean vector
                o_spk[at], o_xv[at] = spk[tr[same]].mean(0), xv[tr[same]].mean(0)
        put(name, o_spk, o_xv)

    put("mean", spk[tr].mean(0).expand(n, -1), xv[tr].mean(0).expand(n, -1))
    oracle("oracle", oracle_keys)
    if timbre_keys is not None:
        oracle("timbre_oracle", timbre_keys)

    was_training = model.training
    model.eval()
    uniq, inv = np.unique(data.instruction_id[ev].numpy(), return_inverse=True)
    style = torch.cat([model.encoder(*data.states.gather(torch.from_numpy(uniq[i:i + POOL_CHUNK])))
                       for i in range(0, len(uniq), POOL_CHUNK)])[torch.from_numpy(inv)]
    mcfg = model.mapper.config
    points = {"model": (mcfg.temperature, mcfg.draws), "model_one_draw": (mcfg.temperature, 1),
              "model_mean": (mcfg.temperature, max(n_draws, 1)),
              **{f"{CURVE_PREFIX}T={t:g} K={k}": (t, k) for t, k in curve}}
    for name, (temperature, draws) in points.items():
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((draws, n, mcfg.dim), generator=gen)
        put(name, *model.mapper.inference(style, n_steps=n_steps or mcfg.n_steps, noise=noise,
                                          temperature=temperature, draws=draws))
    model.train(was_training)
    return out


@torch.no_grad()
def instruction_probe_rows(store: str, mapper_dir: str | Path, train_texts: Sequence[str],
                           rows_by_split: dict[str, list[dict]], seed: int = 0) -> dict[str, list[dict]]:
    """Probe rows for each split: a copy of each row (levels, gender, wording, ``instruction``) whose
    measurement columns hold the probe's P(more) − P(less) for its instruction, fitted on ``train_texts``.
    Embeddings are the stage-1 pooling over the store's cached states (what stage 2 was trained on)."""
    from cache.reader import CacheReader
    from tts_core.evaluation.directions import ATTRIBUTES
    from tts_core.evaluation.instruction_probe import fit_level_probes, probe_scores
    from tts_core.stage1.artifacts import load_mapper

    reader = CacheReader(store)
    encoder, _, _ = load_mapper(mapper_dir)
    index = {t: i for i, t in enumerate(reader.instruction_texts)}

    def embed(texts: Sequence[str]) -> np.ndarray:
        ids = [index[t] for t in texts]
        out = [encoder(*map(torch.from_numpy, reader.instruction_states_batch(ids[i:i + POOL_CHUNK])))
               for i in range(0, len(ids), POOL_CHUNK)]
        return torch.cat(out).numpy() if out else np.zeros((0, encoder.hidden_size), np.float32)

    train_texts = sorted(set(train_texts) & set(index))
    probes = fit_level_probes(embed(train_texts), [asked_levels(t) for t in train_texts], seed=seed)
    out = {}
    for split, rows in rows_by_split.items():
        scores = probe_scores(probes, embed([r["instruction"] for r in rows]))
        out[split] = [{**r, **{col: float(scores[a][k]) for a, (col, _, _) in ATTRIBUTES.items()}}
                      for k, r in enumerate(rows)]
    return out


class SpeechLossProbe:
    """Teacher-forced speech loss of T3 checkpoints on fixed instruction-only rows of one store (module doc).
    The rows' text ids and their instructions' mapper embeddings are prepared once (only the instructions the
    chosen rows can draw: a big store's full tables would cost more than the losses); each checkpoint then costs
    forward passes only."""

    def __init__(self, store: str, mapper_dir: str | Path, run_dir: str | Path, batch_size: int = 16):
        from cache.reader import CacheReader
        from tts_core.stage1.artifacts import load_mapper
        from tts_core.stage2.prepare import compute_prepared, prepare_stage2_data
        from tts_core.stage2.text_tokenizer import load_text_tokenizer

        import json

        self.meta = json.loads((Path(run_dir) / "stage2.json").read_text())
        self.encoder, self.mapper, mapper_meta = load_mapper(mapper_dir)
        self.instruction_dim = self.encoder.hidden_size
        self.reader = CacheReader(store)
        self.mapper_seed = int(self.meta.get("mapper_seed", 0))
        tokenizer = load_text_tokenizer(None, t3_dir=Path(run_dir))
        n_steps = int(self.mapper.config.n_steps)
        prepared = compute_prepared(self.reader, tokenizer, self.encoder, self.mapper, mapper_seed=self.mapper_seed,
                                    mapper_samples=1, n_steps=n_steps, instruction_ids=np.zeros(0, np.int64))
        self.data = prepare_stage2_data(self.reader, tokenizer, prepared=prepared, mapper_meta=mapper_meta,
                                        mapper_seed=self.mapper_seed, n_steps=n_steps)
        self.tabled = np.zeros(self.data.style_emb.shape[0], bool)  # instructions whose tables are computed
        self.row_of = {c: i for i, c in enumerate(self.data.clip_ids)}
        self.batch_size = batch_size

    def rows(self, clip_ids: Sequence[str]) -> np.ndarray:
        """Data rows of these clips that have an instruction (others cannot be instruction-only rows); the
        tables of every caption they can draw are computed here."""
        from tts_core.stage2.prepare import compute_instruction_tables

        rows = np.array([self.row_of[c] for c in clip_ids if c in self.row_of], np.int64)
        rows = rows[self.data.instruction_id[rows] >= 0] if len(rows) else rows
        need = np.unique(self.data.captions.subset(rows).ids)  # a row's first caption is its instruction_id
        need = need[~self.tabled[need]]
        if len(need):
            style, spk = compute_instruction_tables(self.reader, self.encoder, self.mapper,
                                                    mapper_seed=self.mapper_seed, ids=need)
            sel = torch.from_numpy(need)
            self.data.style_emb[sel] = style[sel].to(self.data.style_emb)
            self.data.mapper_spk[sel] = spk[sel].to(self.data.mapper_spk)
            self.tabled[need] = True
        return rows

    @torch.no_grad()
    def loss(self, checkpoint: str | Path, rows: np.ndarray) -> float:
        """Mean speech CE per token over ``rows`` for the T3 in ``checkpoint`` (a stage-2 run or step dir)."""
        from tts_core.stage2.row_mix import SCORED_AS_INSTRUCTION_ONLY
        from tts_core.stage2.model import Stage2Model, build_t3

        t3, _, _ = build_t3(str(checkpoint), self.instruction_dim, label=f"checkpoint {checkpoint}")
        t3.eval()
        model = Stage2Model(t3)
        total = count = 0.0
        for i in range(0, len(rows), self.batch_size):
            b = self.data.build_batch(rows[i:i + self.batch_size], mix=SCORED_AS_INSTRUCTION_ONLY,
                                      rng=np.random.default_rng(i), prompt_len=0,
                                      emotion_adv=float(self.meta.get("emotion_adv", 0.5)))
            _, stats = model(b.batch, b.instruction_only)
            total += float(stats[7])  # CE sum over speech tokens of instruction-only rows (Stage2Model.forward order)
            count += float(stats[8])
        return total / count if count else math.nan


def asked_levels(instruction: str) -> dict[str, str | None]:
    """The levels an instruction asks for, read from its text (what every rendering is scored against)."""
    return parse_instruction(instruction)


def attribute_row(wav: np.ndarray | None, sr: int, transcript: str, levels: dict) -> dict:
    """Levels + measurements of one rendering (NaN measurements for a missing or empty one)."""
    if wav is None or not len(wav):
        return {**levels, "f0_hz": math.nan, "rate_lps": math.nan, "loudness_lufs": math.nan}
    return {**levels, **measure(np.asarray(wav, np.float32), sr, transcript)}
