"""The lab's settings: one typed `LabConfig`, its size presets, the ablations docs/lab.md runs, and which fields
define a run (the same-run check of ``--compare-to``).

Every value the lab uses is a field here; `instruct-tts lab` has flags for the common ones and ``--set FIELD=VALUE``
for the rest (`instruct_tts.options.lab_config`, typed against this dataclass), and its --help reads every default
from here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from tts_core.recipe import INSTRUCTION_DROPOUT, MAPPER_DRAWS, MAPPER_TEMPERATURE, PROMPT_INSTRUCTION_PROB

PRESETS = {
    # CI: the whole pipeline in a couple of minutes on 2 cores (tests/test_lab.py)
    "tiny": dict(t3="tiny", n_clips=96, stage1_steps=20, stage1_batch_size=32, stage2_steps=12, curve_points=2, eval_clips=12,
                 loss_clips=12, max_new_tokens=40, n_boot=200,
                 mapper_draws=1, mapper_temperature=0.3,  # one draw at T 0.3: what its 20-step mapper was checked with
                 instruction_guidance=0.0, repetition_sweep=(1.0, 1.2), guidance_sweep=(0.0, 2.0),
                 reference_guidance_sweep=(0.0, 2.0), sweep_clips=4,
                 cache_workers=1),  # 96 clips: two processes would spend more loading the models than encoding
    # a check that the lab works, ~10 minutes on 2 cores
    "medium": dict(n_clips=1200, stage1_steps=1000, stage2_steps=800, curve_points=4, eval_clips=60, loss_clips=60,
                   max_new_tokens=150),
    # the lab: issue #29's run, sized for <= 45 minutes on 2 cores (docs/benchmarks.md has the measured wall time)
    "default": dict(),
}

# docs/lab.md "Running it": runs that take one ingredient out, applied over a size preset (``--ablation``)
ABLATIONS = {
    "no-sweeps": dict(repetition_sweep=(), guidance_sweep=(), reference_guidance_sweep=()),  # main tables only
    "one-caption": dict(captions_per_clip=1, repetition_sweep=(), guidance_sweep=(),
                        reference_guidance_sweep=()),  # the --compare-to baseline
    "no-prompt-rows": dict(prompt_instruction_prob=0.0),  # stage 2 without "clone this voice, but slower" rows
    # stage 2 without the null instruction: nothing to guide against, so unguided and no W sweep
    "no-null-instruction": dict(instruction_dropout=0.0, guidance_sweep=(), reference_guidance_sweep=()),
}


@dataclass
class LabConfig:
    out: Path = Path("lab")
    n_clips: int = 8000  # lab corpus size (6 clips per voice: 640 voices from 3840 clips on, 12.5 each at 8000)
    seed: int = 0
    device: str = "cpu"
    held_out_wording: float = 0.1  # share of instructions in the held-out wording (all of them are held out)
    held_out_voice_frac: float = 0.1  # share of espeak voices held out (with both pitch-factor twins)
    held_out_instruction_frac: float = 0.05  # share of training-wording instruction texts held out
    # training-wording captions per *training* clip (its own + more, `corpus.instructions.paraphrases`): more
    # metadata lines of one audio file, encoded once (tts_core.captions). 1 = one caption per clip, the run to
    # compare against (same clips, same steps: `--compare-to`)
    captions_per_clip: int = 3
    compare_to: str | None = None  # another lab run's directory: the report puts its held-out results beside these
    cache_workers: int = 2  # processes encoding the caches' clips (`tts_core.cachebuild.shards.process_shard_map`)
    speech_tokenizer: str = "world-vq"  # FrozenModelsConfig.speech_tokenizer: the one whose tokens keep F0
    # a local HF encoder directory (flan-t5-large in production); None: the embedded MiniLM. The report's
    # instruction-embedding probe says how much of the unseen wording a text encoder carries (docs/lab.md).
    text_encoder: str | None = None

    # stage 1 (mapper)
    stage1_steps: int = 3000  # both phases together; each phase also early-stops on its held-out AvgCos
    stage1_batch_size: int = 64
    mapper_hidden_dim: int = 256
    mapper_blocks: int = 4
    # what stage 2 and synthesis get from the mapper (MapperConfig.draws / .temperature, recorded in mapper.json):
    # the recipe measured on the stage-1 sampling curve (tts_core.recipe: the mean of 64 draws at T 0.8)
    mapper_draws: int = MAPPER_DRAWS
    mapper_temperature: float = MAPPER_TEMPERATURE
    # stage 2 (T3)
    t3: str = "small"  # T3 preset (tts_core.t3.config.PRESET_SHAPES); "small" beat "tiny" (docs/benchmarks.md)
    # 1200 annealed steps: the held-out speech loss of a 3000-step run was lowest near step 1000 and rose after it
    # while the training loss kept falling (docs/benchmarks.md "The default lab", the stage-2 schedule)
    stage2_steps: int = 1200
    stage2_batch_size: int = 16
    stage2_lr: float = 2e-3
    curve_points: int = 6  # checkpoints kept (and scored for held-out speech loss) along stage 2
    # evaluation
    eval_clips: int = 150  # per held-out split: clips synthesized by the model and rendered from tokens
    loss_clips: int = 150  # per split (and training): clips scored for teacher-forced speech loss
    max_new_tokens: int = 200  # 8 s at 25 tokens/s
    n_boot: int = 1000
    # sampling of every model rendering: None = the T3 family's official value (repetition penalty 1.2: the sweep
    # below found no value better on every attribute, docs/benchmarks.md "Lab"); instruction guidance None = the
    # run's default (`tts_core.sampling_defaults.default_instruction_guidance`: W 3 with stage 2's null instruction)
    repetition_penalty: float | None = None
    instruction_guidance: float | None = None
    # sampling sweeps (report sections "accuracy vs ..."): the model re-rendered on the first ``sweep_clips`` evaluation
    # clips of each held-out split at each value, everything else as above; () = not run. The repetition penalty's
    # sweep chose the official 1.2 (docs/benchmarks.md) and is no longer run by default.
    repetition_sweep: tuple[float, ...] = ()
    guidance_sweep: tuple[float, ...] = (0.0, 1.5, 3.0)  # instruction guidance W
    # instruction guidance W with a reference clip as well (held-out voices, "reference clip + instruction"): its
    # voice cosine to the reference beside rate and loudness; what `tts_core.recipe.REFERENCE_INSTRUCTION_GUIDANCE`
    # is chosen from
    reference_guidance_sweep: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)
    sweep_clips: int = 40
    # stage-2 row mix (Stage2Config's defaults, i.e. the recipe, tts_core.recipe; None = Stage2Config's). A fifth of
    # the rows are prompt + instruction, so the "reference clip + instruction" path is trained; the rest keep the
    # cards' 50/50 instruction-only / audio-only; a tenth of instruction rows get the null instruction.
    instruction_dropout: float | None = INSTRUCTION_DROPOUT
    prompt_instruction_prob: float | None = PROMPT_INSTRUCTION_PROB


    @classmethod
    def preset(cls, name: str, ablations: tuple[str, ...] | list[str] = (), settings: dict | None = None,
               **overrides) -> "LabConfig":
        """The size preset ``name``, then each of ``ablations`` (`ABLATIONS`), then ``overrides`` (fields; None =
        not given), then ``settings`` (typed field values, None included: ``--set``)."""
        if name not in PRESETS:
            raise ValueError(f"lab preset {name!r}: one of {sorted(PRESETS)}")
        unknown = sorted(set(ablations) - set(ABLATIONS))
        if unknown:
            raise ValueError(f"lab ablation {', '.join(map(repr, unknown))}: one of {sorted(ABLATIONS)}")
        known = {f.name for f in fields(cls)}
        values = {**PRESETS[name]}
        for a in ablations:
            values.update(ABLATIONS[a])
        return cls(**{**values, **{k: v for k, v in overrides.items() if k in known and v is not None},
                      **(settings or {})})

    def stage1_train(self) -> dict:
        n = self.stage1_steps
        return dict(batch_size=self.stage1_batch_size, lr_phase1=3e-3, lr_phase2=7.5e-4, epochs=100_000,
                    min_phase_steps=n // 2, max_steps=n, eval_every=max(10, n // 20), patience=4, held_out_frac=0.1,
                    warmup_steps=min(50, n // 5), device=self.device, seed=self.seed)

    def stage2_train(self) -> dict:
        n = self.stage2_steps
        every = max(1, -(-n // max(self.curve_points, 1)))  # ceil: the last point is the final step
        mix = {k: getattr(self, k) for k in ("instruction_dropout", "prompt_instruction_prob")
               if getattr(self, k) is not None}
        return dict(batch_size=self.stage2_batch_size, lr=self.stage2_lr, warmup_steps=min(30, n // 5),
                    epochs=100_000, max_steps=n, log_every=max(1, n // 50), save_every=every,
                    keep_checkpoints=self.curve_points + 1, device=self.device, seed=self.seed, **mix)

    def sampling(self, reference: bool = False, **overrides):
        """The `SamplingConfig` of the lab's model renderings (with a ``reference`` clip: its own default W;
        ``overrides``: a sweep's value)."""
        from tts_core.sampling_defaults import default_instruction_guidance
        from tts_core.stage2 import Stage2Config
        from tts_core.synthesis import SamplingConfig
        from tts_core.t3.config import T3Config

        w = self.instruction_guidance
        if w is None:  # what `Synthesizer.guidance` gives this run: resolved here so the report names the W used
            w = default_instruction_guidance(Stage2Config.from_dict(self.stage2_train()).run_record(),
                                             T3Config.preset(self.t3).family, reference=reference)
        return SamplingConfig(**{"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                                 "instruction_guidance": w, **overrides})


# Fields that do not define the run: where it writes and runs, what it is compared with, and what it adds beside the
# held-out results (the sweeps, the intervals' bootstrap). Every other field must match for two runs to be "the same
# clips, the same steps" (`same_run_fields`); captions_per_clip is what a --compare-to run varies.
NOT_RUN_IDENTITY = frozenset({"out", "device", "compare_to", "captions_per_clip", "repetition_sweep",
                              "guidance_sweep", "reference_guidance_sweep", "sweep_clips", "n_boot", "cache_workers"})


def same_run_fields() -> tuple[str, ...]:
    """The LabConfig fields that define a run (all but `NOT_RUN_IDENTITY`), in field order."""
    return tuple(f.name for f in fields(LabConfig) if f.name not in NOT_RUN_IDENTITY)
