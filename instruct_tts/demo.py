"""`instruct-tts demo`: the whole pipeline on the embedded default, from nothing.

corpus (espeak-ng) → build-cache → train-stage1 (mapper) → train-stage2 (tiny T3), each through its
Prefect flow (or the same library call with --no-prefect), with settings sized for a CPU in minutes,
then wavs for contrasting instructions and an evaluation table (a 2-layer T3 after 1000 CPU steps:
voice-like, not yet intelligible). Every step resumes / is idempotent, so a second run only redoes what is missing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# CPU-sized settings, chosen on the 300-clip corpus (docs/benchmarks.md, "Stage 1").
DEMO_STAGE1 = dict(batch_size=64, lr_phase1=3e-3, lr_phase2=7.5e-4, epochs=1, min_phase_steps=400, eval_every=100,
                   patience=3, held_out_frac=0.2, warmup_steps=50)
# The demo's figures were made with the settings in force before the lab's recipe became the default
# (tts_core.recipe, issue #31): one mapper draw at T 0.3 and no prompt + instruction rows, pinned here so they stand.
DEMO_MAPPER = dict(hidden_dim=256, n_blocks=4, draws=1, temperature=0.3)
DEMO_STAGE2 = dict(batch_size=16, lr=2e-3, warmup_steps=30, epochs=1000, max_steps=1000, log_every=50, save_every=250,
                   prompt_instruction_prob=0.0)
DEMO_TEXT = "The quick brown fox jumps over the lazy dog."
DEMO_INSTRUCTIONS = {  # contrasting voices, phrased unlike any training instruction
    "deep_slow_male": "A deep, low-pitched man speaking slowly and calmly.",
    "high_fast_female": "A woman with a bright, high voice, talking fast.",
    "quiet_mid_female": "A soft-spoken woman at a moderate pitch and an ordinary pace, very quiet.",
}
DEMO_EVAL_N = 12
DEMO_MAX_TOKENS = 200  # 8 s at 25 tokens/s: the tiny CPU model rarely stops on its own yet


@dataclass
class DemoConfig:
    out: Path = Path("demo")
    n_clips: int = 300
    seed: int = 0
    device: str = "cpu"
    use_prefect: bool = True


def run_demo(cfg: DemoConfig) -> int:
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus

    n = 6
    print(f"[1/{n}] demo corpus: {cfg.n_clips} clips -> {cfg.out / 'corpus'}")
    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=cfg.out / "corpus", n_clips=cfg.n_clips, seed=cfg.seed))
    store = str(cfg.out / "cache" / "demo.zarr")
    mapper_dir, t3_dir = cfg.out / "runs" / "mapper", cfg.out / "runs" / "t3"

    print(f"[2/{n}] build-cache -> {store}")
    _build_cache(cfg, corpus, store)
    print(f"[3/{n}] train-stage1 -> {mapper_dir}")
    _stage1(cfg, store, mapper_dir)
    print(f"[4/{n}] train-stage2 (tiny T3) -> {t3_dir}")
    _stage2(cfg, store, mapper_dir, t3_dir)
    print(f"[5/{n}] synthesize {len(DEMO_INSTRUCTIONS)} contrasting instructions -> {cfg.out / 'wavs'}")
    wavs = _synthesize(cfg, t3_dir)
    print(f"[6/{n}] evaluate {DEMO_EVAL_N} held-out instructions -> {t3_dir / 'eval'}")
    evaluation = _evaluate(cfg, store, t3_dir)
    _summary(store, mapper_dir, t3_dir, wavs)
    from tts_core.evaluation.run import to_markdown

    print("\n" + to_markdown(evaluation))
    return 0


def _build_cache(cfg: DemoConfig, corpus, store: str) -> None:
    from instruct_tts.options import build_config, stage_options

    o = stage_options("build-cache", metadata=corpus.metadata, audio_root=corpus.root, store=store, device=cfg.device)
    if cfg.use_prefect:
        from flows.build_cache import build_cache_flow

        build_cache_flow(**o)
        return
    from tts_core.cachebuild.build import build_cache

    for line in build_cache(build_config(o)).lines():
        print(line)


def _stage1(cfg: DemoConfig, store: str, out: Path) -> None:
    from instruct_tts.options import stage1_configs, stage_options

    train = {("lr" if k == "lr_phase1" else k): v for k, v in DEMO_STAGE1.items()}  # --lr is phase 1's
    mapper = {("mapper_draws" if k == "draws" else k): v for k, v in DEMO_MAPPER.items()}  # --mapper-draws: `draws`
    o = stage_options("train-stage1", store=store, out=out, phase="both", **train, **mapper,
                      device=cfg.device, seed=cfg.seed)
    if cfg.use_prefect:
        from flows.train_stage1 import train_stage1_flow

        train_stage1_flow(**o)
        return
    from tts_core.stage1.from_store import train_stage1_from_store

    train_stage1_from_store(store, *stage1_configs(o))


def _stage2(cfg: DemoConfig, store: str, mapper_dir: Path, out: Path) -> None:
    from instruct_tts.options import stage2_config, stage_options

    o = stage_options("train-stage2", store=store, mapper=mapper_dir, t3="tiny", out=out, **DEMO_STAGE2,
                      device=cfg.device, seed=cfg.seed)
    if cfg.use_prefect:
        from flows.train_stage2 import train_stage2_flow

        train_stage2_flow(**o)
        return
    from tts_core.stage2.train import train_stage2

    train_stage2(stage2_config(o))


def _synthesize(cfg: DemoConfig, t3_dir: Path) -> dict[str, Path]:
    import soundfile as sf

    from tts_core.synthesis import SamplingConfig, Synthesizer

    synth = Synthesizer.from_run(t3_dir, device=cfg.device)
    out = {}
    for name, instruction in DEMO_INSTRUCTIONS.items():
        res = synth.synthesize(DEMO_TEXT, instruction=instruction, seed=cfg.seed,
                               sampling=SamplingConfig(max_new_tokens=DEMO_MAX_TOKENS))
        path = cfg.out / "wavs" / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), res.wav, res.sample_rate)
        out[instruction] = path
    return out


def _evaluate(cfg: DemoConfig, store: str, t3_dir: Path) -> dict:
    from instruct_tts.options import eval_config, stage_options
    from tts_core.evaluation.run import evaluate_run

    o = stage_options("evaluate", run=t3_dir, store=store, n=DEMO_EVAL_N, seed=cfg.seed, device=cfg.device,
                      max_new_tokens=DEMO_MAX_TOKENS)
    if cfg.use_prefect:
        from flows.evaluate import evaluate_flow

        return evaluate_flow(**o)
    return evaluate_run(eval_config(o))


def _summary(store: str, mapper_dir: Path, t3_dir: Path, wavs: dict[str, Path]) -> None:
    from cache.reader import CacheReader

    report = json.loads(Path(store, "norm_report.json").read_text())
    r = CacheReader(store)
    s1 = json.loads((mapper_dir / "metrics.json").read_text())
    best, b = s1["best"], s1["baselines"]
    hist = [json.loads(l) for l in (t3_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    print("\n== demo done ==")
    print(f"store:   {store}  ({len(r)} OK clips, {r.n_instructions} unique instructions); "
          f"norm verdict: {report['verdict']}  ({store}/norm_report.md)")
    print(f"stage 1: {mapper_dir}/report.md  held-out SpkCos {best['spk_cos']:.3f} XVecCos {best['xvec_cos']:.3f} "
          f"(train-set mean {b['mean_spk_cos']:.3f} / {b['mean_xvec_cos']:.3f}, nearest instruction "
          f"{b['nn_spk_cos']:.3f} / {b['nn_xvec_cos']:.3f})")
    if hist:
        print(f"stage 2: {t3_dir}/report.md  loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} "
              f"over {hist[-1]['step']} steps (speech: instruction-only rows "
              f"{hist[-1]['speech_instruction_only'] or 0:.3f}, rows with a prompt "
              f"{hist[-1]['speech_with_prompt'] or 0:.3f})")
    for instruction, path in wavs.items():
        print(f"wav:     {path}  <- \"{instruction}\"")
    print("TensorBoard: uv run tensorboard --logdir demo/runs")
