"""Each stage command's options, shared by the command line and the Prefect deployment of the same name.

A deployment takes what its command takes, under the flag's own name (the argparse dest: ``--audio-root`` is
``audio_root``), with the same default. Most defaults are ``None``: "the config dataclass's default", read from the
dataclass when the config is built here and shown by ``--help`` from the same field (`DefaultsHelpFormatter`), so no
default is typed twice. The CLI passes `command_options` to the stage's flow (``flow(**options)``) or, without
Prefect, to the same converter below that the flow calls; ``tests/test_deployments.py`` holds the two to the parser.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import typing
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

# argparse dests that are not options of the work: the subcommand's bookkeeping, and switches of the CLI process
NOT_OPTIONS = ("cmd", "func", "ctrl_c_saves", "use_prefect")
# --no-prefect says whether *this process* runs the work through Prefect; a deployment run always is Prefect
CLI_ONLY = ("no_prefect",)

TASK_RUNNERS = ("local", "dask")
DASK_LOCAL_WORKERS = 2  # worker processes of the local Dask cluster (build-cache --task-runner dask)
LAB_DEFAULT_PRESET = "default"


def command_options(a: argparse.Namespace) -> dict:
    """The parsed options of a command, by dest, as a deployment takes them (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
            if k not in NOT_OPTIONS and k not in CLI_ONLY}


def subcommand(parser: argparse.ArgumentParser, cmd: str) -> argparse.ArgumentParser:
    """The subparser of ``cmd`` in the `instruct-tts` parser."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subs.choices[cmd]


def option_defaults(cmd: str) -> dict:
    """Every option of ``cmd`` (by dest) with its command-line default."""
    from instruct_tts.cli import build_parser

    return {a.dest: (str(a.default) if isinstance(a.default, Path) else a.default)
            for a in subcommand(build_parser(), cmd)._actions
            if a.dest != "help" and a.dest not in NOT_OPTIONS and a.dest not in CLI_ONLY}


def option_help(cmd: str) -> dict[str, str]:
    """Every option of ``cmd`` (by dest) with its ``--help`` text, the default filled in."""
    from instruct_tts.cli import build_parser

    sub = subcommand(build_parser(), cmd)
    fmt = sub._get_formatter()
    return {a.dest: " ".join(fmt._expand_help(a).split()) for a in sub._actions
            if a.help and a.dest != "help" and a.dest not in NOT_OPTIONS and a.dest not in CLI_ONLY}


def stage_options(cmd: str, **given) -> dict:
    """``cmd``'s options as its command line would give them: ``given`` (dest names), the rest at their defaults."""
    options = option_defaults(cmd)
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise TypeError(f"instruct-tts {cmd} has no option {', '.join(unknown)}")
    return {**options, **{k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()}}


def _given(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _path(v) -> Path | None:
    return None if v in (None, "") else Path(v)


# ---- options -> the stage's config (the one conversion, for the CLI and the flow) ----------------------------------
def build_config(o: dict):
    """build-cache options -> `BuildConfig` (task_runner / cluster / workers are the flow's: where shards run)."""
    from cache.schema import Normalisation
    from tts_core.audio import AudioPolicy
    from tts_core.cachebuild.build import BuildConfig
    from tts_core.frozen import FrozenModelsConfig

    models = FrozenModelsConfig(**_given(chatterbox_dir=_path(o["chatterbox_dir"]), text_encoder=_path(o["text_encoder"]),
                                         device=o["device"], speech_tokenizer=o["speech_tokenizer"]))
    return BuildConfig(metadata=Path(o["metadata"]), audio_root=Path(o["audio_root"]), store=o["store"], models=models,
                       normalisation=Normalisation(spk_emb=not o["raw_spk"], xvec=not o["raw_xvec"]),
                       audio=AudioPolicy(allow_outside_root=bool(o["allow_outside_root"])),
                       **_given(loader_threads=o["loader_threads"], chunk_rows=o["chunk_rows"]))


def stage1_configs(o: dict, progress: bool = False):
    """train-stage1 options -> (`Stage1TrainConfig`, `MapperConfig`)."""
    from tts_core.mapper.flow import MapperConfig
    from tts_core.stage1.train import Stage1TrainConfig

    train = _given(phase=None if o["phase"] is None else str(o["phase"]),  # `-p phase=1` arrives as JSON 1
                   init_from=o["init_from"] or None, device=o["device"], amp_dtype=o["amp"],
                   epochs=o["epochs"], batch_size=o["batch_size"], lr_phase1=o["lr"], lr_phase2=o["lr_phase2"],
                   patience=o["patience"], eval_every=o["eval_every"], max_steps=o["max_steps"],
                   min_phase_steps=o["min_phase_steps"], warmup_steps=o["warmup_steps"],
                   held_out_frac=o["held_out_frac"], split_by=o["split_by"], seed=o["seed"],
                   resume=False if o["restart"] else None, states_in_memory_mb=o["states_in_memory_mb"],
                   states_cache_mb=o["states_cache_mb"])
    mapper = _given(hidden_dim=o["hidden_dim"], n_blocks=o["n_blocks"], n_steps=o["n_steps"],
                    temperature=o["temperature"], draws=o["mapper_draws"])
    return (Stage1TrainConfig(**train, out_dir=str(o["out"]), progress=progress), MapperConfig.from_dict(mapper))


def stage2_config(o: dict, progress: bool = False):
    """train-stage2 options -> `Stage2Config`."""
    from tts_core.stage2.config import Stage2Config

    train = _given(
        instruction_prob=o["instruction_prob"], prompt_instruction_prob=o["prompt_instruction_prob"],
        instruction_dropout=o["instruction_dropout"], batch_size=o["batch_size"], max_tokens=o["max_tokens"],
        grad_accum=o["grad_accum"], lr=o["lr"], adapter_lr=o["adapter_lr"], epochs=o["epochs"],
        max_steps=o["max_steps"], warmup_steps=o["warmup_steps"], device=o["device"], amp_dtype=o["amp"],
        compile=o["compile"] or None, activation_checkpointing=o["activation_checkpointing"] or None,
        save_every=o["save_every"], log_every=o["log_every"], text_tokenizer=o["text_tokenizer"], seed=o["seed"],
        language=o["language"], hold_out=o["hold_out"], eval_every=o["eval_every"],
        resume=False if o["restart"] else None)
    return Stage2Config.from_dict({**train, "store": o["store"], "mapper_dir": str(o["mapper"]), "t3": o["t3"],
                                   "out_dir": str(o["out"]), "progress": progress})


def eval_config(o: dict):
    """evaluate options -> `EvalConfig`."""
    from tts_core.evaluation.run import EvalConfig

    return EvalConfig(run_dir=str(o["run"]), store=o["store"], **_given(
        out_dir=o["out"], n_instructions=o["n"], text=o["text"], seed=o["seed"], device=o["device"],
        max_new_tokens=o["max_new_tokens"], text_encoder=o["text_encoder"], chatterbox_dir=o["chatterbox_dir"],
        language=o["language"], repetition_penalty=o["repetition_penalty"],
        instruction_guidance=o["instruction_guidance"]))


def lab_config(o: dict):
    """lab options -> `LabConfig`: the size preset, its ablations, the flags given (None: not given), then
    ``settings`` (``--set``: {field: text, or a deployment's JSON value}, typed by `lab_settings`)."""
    from instruct_tts.lab.config import LabConfig

    names = _field_names(LabConfig)
    flagged = {k: v for k, v in o.items() if k in names}
    return LabConfig.preset(o["preset"], ablations=o["ablation"] or (), settings=lab_settings(o["settings"], flagged),
                            **{**flagged, "out": _path(o["out"])})


def lab_settings(given: Mapping[str, Any] | None, flagged: Collection[str]) -> dict:
    """``--set FIELD=VALUE`` pairs → {LabConfig field: value of the field's type}. A field with a flag of its own
    (``flagged``) is set by that flag only; anything else is refused naming the fields ``--set`` takes."""
    from instruct_tts.lab.config import LabConfig

    names = _field_names(LabConfig)
    out = {}
    for name, value in (given or {}).items():
        if name in flagged:
            raise ValueError(f"--set {name}: {name} has a flag of its own, --{name.replace('_', '-')}")
        if name not in names:
            raise ValueError(f"--set {name}: LabConfig has no field {name!r}; --set takes "
                             + ", ".join(n for n in names if n not in flagged))
        out[name] = field_value(LabConfig, name, value)
    return out


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def field_value(cls, name: str, value: Any) -> Any:
    """``value`` (command-line text, or a deployment's JSON value) as dataclass ``cls`` types its field ``name``:
    int, float, str, Path, bool, ``X | None`` ('none' or '' → None) and ``tuple[X, ...]`` (comma-separated text,
    '' = empty)."""
    hint = typing.get_type_hints(cls)[name]
    try:
        return _typed(hint, value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: {name} takes {_type_words(hint)}") from None


def _typed(hint, value):
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _typed(inner, value)
    if typing.get_origin(hint) is tuple:
        items = [x for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
        return tuple(_typed(args[0], x) for x in items)
    if hint is bool:
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(value)
    if hint is int and isinstance(value, float):
        raise TypeError(value)
    if hint in (int, float):
        return hint(value.strip() if isinstance(value, str) else value)
    if hint in (str, Path):
        return hint(value)
    raise TypeError(f"no conversion to {hint}")


def _type_words(hint) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return _type_words(next(a for a in args if a is not type(None))) + " or none"
    if typing.get_origin(hint) is tuple:
        return f"comma-separated values, each {_type_words(args[0])} ('' = none)"
    return {int: "an integer", float: "a number", bool: "on/off", str: "text", Path: "a path"}.get(hint, str(hint))


class SettingAction(argparse.Action):
    """``--set FIELD=VALUE`` (repeatable) into one {field: text} option, checked as it is parsed (``check``: e.g.
    `lab_settings`, against the fields that have a flag of their own). Every further option string of the action
    is the old flag of a field (``--sweep-clips 5`` = ``--set sweep_clips=5``; `add`'s ``hidden`` keeps them out of
    --help)."""

    def __init__(self, option_strings, dest, check: Callable[[dict, Collection[str]], dict], **kw):
        super().__init__(option_strings, dest, **kw)
        self.check = check

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == self.option_strings[0]:
            name, eq, text = str(values).partition("=")
            if not eq:
                parser.error(f"{option_string} takes FIELD=VALUE, got {values!r}")
        else:
            name, text = option_string.lstrip("-").replace("-", "_"), values
        try:
            self.check({name.strip(): text}, {a.dest for a in parser._actions})
        except ValueError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), name.strip(): text})


# ---- --help: every default, read from the config dataclasses ---------------------------------------------------------
def field_default(cls, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(show(v) for v in value) if value else "'' (none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_default(where: str, none: str | None = None, fmt: Callable[[Any], str] = show) -> Callable[[], str]:
    """``"tts_core.stage1.train:Stage1TrainConfig.epochs"`` -> a thunk giving that field's default as help text
    (``none``: what a None default means). Resolved only when help is printed (no imports at parse time)."""
    module, attr = where.split(":")
    cls_name, name = attr.split(".")

    def thunk() -> str:
        value = field_default(getattr(importlib.import_module(module), cls_name), name)
        if value is None:
            return none if none is not None else "none"
        return fmt(value)

    return thunk


def _lab_values(name: str, none: str | Callable[[], str] | None) -> tuple[str, list[str]]:
    """A LabConfig field's value in the default preset, and "preset: value" of the presets that differ."""
    from instruct_tts.lab.config import PRESETS, LabConfig

    def one(preset: str) -> str:
        value = getattr(LabConfig.preset(preset), name)
        if value is None:
            return (none() if callable(none) else none) or "none"
        return show(value)

    base = one(LAB_DEFAULT_PRESET)
    return base, [f"{p}: {one(p)}" for p in PRESETS if p != LAB_DEFAULT_PRESET and one(p) != base]


def lab_default(name: str, none: str | Callable[[], str] | None = None) -> Callable[[], str]:
    """The default preset's value of a LabConfig field, and the other presets' where they differ (``none``: what
    None means, or a thunk giving it)."""
    def thunk() -> str:
        base, others = _lab_values(name, none)
        return base + (f"; preset {', '.join(others)}" if others else "")

    return thunk


def lab_defaults(names: Iterable[str], none: Mapping[str, str] | None = None) -> Callable[[], str]:
    """``field=value`` (and the presets that differ) for each of ``names``: the defaults of the ``--set`` fields."""
    def thunk() -> str:
        parts = []
        for name in names:
            base, others = _lab_values(name, (none or {}).get(name))
            parts.append(f"{name}={base}" + (f" ({', '.join(others)})" if others else ""))
        return ", ".join(parts)

    return thunk


class _Lazy:
    """A default read only when --help is printed (argparse substitutes it for ``%(default_from)s``)."""

    def __init__(self, thunk: Callable[[], str]):
        self.thunk = thunk

    def __str__(self) -> str:
        return self.thunk()


def add(group, *flags: str, default_from: Callable[[], str] | None = None, hidden: tuple[str, ...] = (),
        **kw) -> argparse.Action:
    """``group.add_argument`` whose help ends with "(default: X)", X from ``default_from`` (a `config_default` /
    `lab_default` thunk) — resolved when help is printed, so parsing imports nothing. ``hidden``: old spellings of
    the flag that keep working, not shown by --help."""
    if default_from is not None:
        kw["help"] = (f"{kw['help']} " if kw.get("help") else "") + "(default: %(default_from)s)"
    action = group.add_argument(*flags, *hidden, **kw)
    action.default_from = None if default_from is None else _Lazy(default_from)
    if hidden:
        action.hidden_aliases = frozenset(hidden)
    return action


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Also shows the argparse default of an option that has one (not None / off) and does not name its default;
    leaves out an option's hidden old spellings (``action.hidden_aliases``)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "hidden_aliases", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (text and "default" not in text and action.option_strings and not action.required
                and action.default not in (None, False, argparse.SUPPRESS)):
            return f"{text} (default: %(default)s)"
        return text
