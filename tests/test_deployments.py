"""Each Prefect deployment takes what its command takes: the same options, under the flags' own names (the argparse
dests), with the same defaults — and a value given either way reaches the stage's config (issue #31)."""
from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import pytest

from instruct_tts.cli import build_parser, main
from instruct_tts.options import CLI_ONLY, NOT_OPTIONS, command_options, stage_options, subcommand

# command -> (flows module, flow function, the conversion the CLI and the flow share, required argv)
STAGES = {
    "build-cache": ("flows.build_cache", "build_cache_flow", "build_config",
                    ["--metadata", "m.txt", "--audio-root", "clips", "--store", "s.zarr"]),
    "train-stage1": ("flows.train_stage1", "train_stage1_flow", "stage1_configs", ["--store", "s.zarr", "--out", "o"]),
    "train-stage2": ("flows.train_stage2", "train_stage2_flow", "stage2_config",
                     ["--store", "s.zarr", "--mapper", "m", "--t3", "tiny", "--out", "o"]),
    "synthesize": ("flows.evaluate", "synthesize_flow", "synthesize_command", ["--run", "r"]),
    "evaluate": ("flows.evaluate", "evaluate_flow", "eval_config", ["--run", "r", "--store", "s.zarr"]),
    "lab": ("flows.lab", "lab_flow", "lab_config", []),
}
# The only option a deployment does not take. Every other dest of a stage's parser must be a flow parameter.
EXCLUDED = {
    # whether *this process* goes through Prefect: a deployment run is Prefect by definition, and without Prefect
    # the CLI calls the same conversion the flow calls (instruct_tts/options.py)
    "no_prefect": "a switch of the CLI process",
}
assert set(EXCLUDED) == set(CLI_ONLY)


def _actions(cmd: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in subcommand(build_parser(), cmd)._actions
            if a.dest != "help" and a.dest not in NOT_OPTIONS and a.dest not in EXCLUDED}


def _flow(cmd: str):
    import importlib

    module, name, _, _ = STAGES[cmd]
    return getattr(importlib.import_module(module), name)


def _cli_default(action: argparse.Action):
    return str(action.default) if isinstance(action.default, Path) else action.default


@pytest.fixture(scope="module")
def deployments():
    from flows.serve import deployments

    return {d.flow_name: d for d in deployments()}


@pytest.mark.parametrize("cmd", list(STAGES))
def test_deployment_parameters_are_the_commands_options(cmd, deployments):
    actions = _actions(cmd)
    schema = deployments[cmd]._parameter_openapi_schema.model_dump()
    assert set(schema["properties"]) == set(actions), "flow parameters != command options"
    assert set(schema.get("required") or []) == {d for d, a in actions.items() if a.required}
    signature = inspect.signature(_flow(cmd).fn).parameters
    for dest, action in actions.items():
        if action.required:
            assert signature[dest].default is inspect.Parameter.empty, dest
            continue
        assert signature[dest].default == _cli_default(action), dest
        assert schema["properties"][dest].get("default") == _cli_default(action), dest


@pytest.mark.parametrize("cmd", list(STAGES))
def test_each_parameter_is_described_in_the_ui_by_its_flags_help(cmd, deployments):
    """Prefect's run form shows a parameter's description: it is the flag's --help text, its default filled in."""
    from instruct_tts.options import option_help

    helps = option_help(cmd)
    props = deployments[cmd]._parameter_openapi_schema.model_dump()["properties"]
    for dest, action in _actions(cmd).items():
        text = props[dest].get("description", "")
        assert text == helps[dest], dest
        assert "%(" not in text and not text.startswith("(default"), f"{dest}: no help of its own: {text!r}"
        if "default_from" in (action.help or ""):
            assert "(default: " in text, dest


@pytest.mark.parametrize("cmd", list(STAGES))
def test_usage_strings_name_real_parameters(cmd, deployments):
    from flows.serve import USAGE

    named = set(re.findall(r"-p (\w+)=", USAGE[cmd]))
    assert named and named <= set(_actions(cmd)), named - set(_actions(cmd))
    assert deployments[cmd].description.startswith(f"prefect deployment run {cmd}/- ")


# ---- a value given reaches the config ---------------------------------------------------------------------------
def _candidates(action: argparse.Action) -> list[list[str]]:
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        return [[flag]]
    if action.choices:
        return [[flag, c] for c in action.choices]
    name = getattr(action.type, "__name__", "")
    if action.type is float:
        return [[flag, "0.375"]]
    if action.type in (int,) or name == "_positive_int":
        return [[flag, "7"], [flag, "3"]]
    if name == "_floats":
        return [[flag, "0.5,0.25"], [flag, ""]]
    if action.metavar == "FIELD=VALUE":  # lab --set: any field without a flag of its own
        return [[flag, "sweep_clips=7"], [flag, "repetition_sweep="]]
    return [[flag, "x/y"]]


def _config(cmd: str, argv: list[str]):
    import instruct_tts.options as options

    o = command_options(build_parser().parse_args([cmd, *STAGES[cmd][3], *argv]))
    return getattr(options, STAGES[cmd][2])(o)


# options that steer where the work runs, not what it computes: the flow's task runner (tests/test_dask_build.py)
NOT_IN_CONFIG = {"build-cache": {"task_runner", "cluster", "workers"}}


@pytest.mark.parametrize("cmd", ["build-cache", "train-stage1", "train-stage2", "evaluate", "lab"])
def test_every_option_changes_the_config_the_stage_gets(cmd):
    base = _config(cmd, [])
    for dest, action in _actions(cmd).items():
        if action.required or dest in NOT_IN_CONFIG.get(cmd, ()):
            continue
        assert any(_config(cmd, argv) != base for argv in _candidates(action)), f"{cmd} --{dest} does not arrive"


def test_a_value_given_arrives_and_the_rest_are_the_dataclass_defaults(monkeypatch, tmp_path):
    import tts_core.stage1.from_store as from_store
    from tts_core.mapper.flow import MapperConfig
    from tts_core.stage1.train import Stage1TrainConfig

    got = {}

    def fake_train(store, cfg, mcfg, on_epoch=None):
        got.update(store=store, cfg=cfg, mcfg=mcfg)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        Path(cfg.out_dir, "report.md").write_text("report\n")

    monkeypatch.setattr(from_store, "train_stage1_from_store", fake_train)
    assert main(["train-stage1", "--store", "s.zarr", "--out", str(tmp_path / "o"), "--no-prefect", "--draws", "3",
                 "--epochs", "7", "--lr", "0.01", "--restart"]) == 0
    cfg, mcfg = got["cfg"], got["mcfg"]
    assert got["store"] == "s.zarr" and mcfg.draws == 3 and cfg.epochs == 7 and cfg.lr_phase1 == 0.01
    assert cfg.resume is False and cfg.out_dir == str(tmp_path / "o")
    assert cfg.batch_size == Stage1TrainConfig().batch_size and mcfg.temperature == MapperConfig().temperature


class _Captured(Exception):
    pass


@pytest.mark.parametrize("cmd", list(STAGES))
def test_the_cli_and_the_flow_hand_the_same_options_to_the_shared_function(cmd, monkeypatch):
    """The CLI without Prefect and the flow's own function both call the one conversion, with every option."""
    import importlib

    import instruct_tts.options as options
    import tts_core.synthesis_batch as synthesis_batch

    module, _, shared, required = STAGES[cmd]
    seen = []

    def capture(o=None, progress=False, **kw):
        seen.append(dict(o if o is not None else kw))
        raise _Captured

    owner = synthesis_batch if shared == "synthesize_command" else options
    monkeypatch.setattr(owner, shared, capture)
    monkeypatch.setattr(importlib.import_module(module), shared, capture)
    values = {"n": "5", "seed": "7", "device": "cuda:1", "out": "o2"}
    extra = [x for d, v in values.items() if d in _actions(cmd) and not _actions(cmd)[d].required
             for x in (f"--{d}", v)]
    argv = [cmd, *required, *extra] + (["--no-prefect"] if "no_prefect" in
                                       {a.dest for a in subcommand(build_parser(), cmd)._actions} else [])
    with pytest.raises(_Captured):
        main(argv)
    with pytest.raises(_Captured):
        _flow(cmd).fn(**seen[0])
    assert seen[0] == seen[1] and set(seen[0]) == set(_actions(cmd))
    assert seen[0]["device"] == "cuda:1" and seen[0].get("seed", 7) == 7
    assert seen[0] == stage_options(cmd, **seen[0])  # what the demo builds the same way


# ---- --help shows every default, from the config dataclasses -----------------------------------------------------
def _help(cmd: str) -> dict[str, str]:
    sub = subcommand(build_parser(), cmd)
    formatter = sub._get_formatter()
    return {a.dest: formatter._expand_help(a) for a in sub._actions if a.help}


@pytest.mark.parametrize("cmd", list(STAGES))
def test_help_shows_every_default(cmd):
    shown = _help(cmd)
    for dest, action in _actions(cmd).items():
        if action.required or isinstance(action, argparse._StoreTrueAction) or dest in ("text", "instruction",
                                                                                      "reference", "batch"):
            continue  # required; a switch (off); or synthesize's clip / batch inputs, which have no default
        if dest in ("out", "out_dir") and cmd == "synthesize":
            continue
        assert "default" in shown.get(dest, ""), f"{cmd} --{dest}: {shown.get(dest)!r}"


def test_help_defaults_are_read_from_the_dataclasses():
    from instruct_tts.lab import LabConfig
    from tts_core.cachebuild.build import BuildConfig
    from tts_core.evaluation.run import EvalConfig
    from tts_core.mapper.flow import MapperConfig
    from tts_core.stage1.train import Stage1TrainConfig
    from tts_core.stage2.train import Stage2Config

    s1, s2 = _help("train-stage1"), _help("train-stage2")
    assert f"(default: {MapperConfig().draws})" in s1["mapper_draws"]
    assert f"(default: {MapperConfig().temperature:g})" in s1["temperature"]
    assert f"(default: {Stage1TrainConfig().epochs})" in s1["epochs"]
    assert f"(default: {Stage2Config().row_mix.prompt_instruction_prob:g})" in s2["prompt_instruction_prob"]
    assert f"(default: {EvalConfig.n_instructions})" in _help("evaluate")["n"]
    build = _help("build-cache")
    assert f"(default: {BuildConfig.loader_threads})" in build["loader_threads"] and "threads" in build["loader_threads"]
    assert f"(default: {LabConfig.preset('default').n_clips};" in _help("lab")["n_clips"]
    assert "(default: auto)" in s1["device"] and "cuda when available" in s1["device"]
    assert "(default: cpu)" in _help("synthesize")["device"]


def test_lab_preset_help_cites_no_issue_or_unmeasured_time():
    text = _help("lab")["preset"]
    assert "issue" not in text and "min" not in text and all(p in text for p in ("default", "medium", "tiny"))


# ---- synthesize's batch file ---------------------------------------------------------------------------------------
def test_batch_file_lines_comments_and_references(tmp_path):
    from tts_core.synthesis_batch import read_batch

    (tmp_path / "ref.wav").write_bytes(b"")
    batch = tmp_path / "lines.txt"
    batch.write_text("# comment\n\nHello.|A deep voice.\nAgain.||ref.wav\nBoth.|Slower.|ref.wav\n")
    clips = read_batch(batch, tmp_path / "wavs")
    assert [(c.line, c.text, c.instruction) for c in clips] == [(3, "Hello.", "A deep voice."), (4, "Again.", None),
                                                                (5, "Both.", "Slower.")]
    assert clips[1].reference == tmp_path / "ref.wav" and clips[0].out == tmp_path / "wavs" / "0003.wav"


@pytest.mark.parametrize("line, says", [("no bar here", "no '|'"), ("a|b|ref.wav|d", "4 fields"),
                                        ("|A voice.", "text is empty"), ("Hi.|", "neither an instruction"),
                                        ("Hi.||missing.wav", "missing.wav not found")])
def test_a_bad_batch_line_is_named_with_what_to_do(tmp_path, line, says):
    from tts_core.synthesis_batch import SynthesizeRequestError, read_batch

    batch = tmp_path / "lines.txt"
    batch.write_text(f"Fine.|A voice.\n{line}\n")
    with pytest.raises(SynthesizeRequestError, match=re.escape(f"{batch}:2: ")) as err:
        read_batch(batch, tmp_path)
    assert says in str(err.value) and "text|instruction[|reference.wav]" in str(err.value)


def test_synthesize_batch_runs_every_line_with_the_options(monkeypatch, tmp_path, capsys):
    import numpy as np

    import tts_core.synthesis as synthesis
    from tts_core.synthesis import SynthResult

    calls = {"from_run": [], "synth": []}

    class FakeSynth:
        @classmethod
        def from_run(cls, run_dir, device="cpu", text_encoder=None, chatterbox_dir=None):
            calls["from_run"].append((run_dir, device, text_encoder, chatterbox_dir))
            return cls()

        def synthesize(self, text, **kw):
            calls["synth"].append((text, kw))
            return SynthResult(tokens=np.arange(5), wav=np.zeros(1600, np.float32), sample_rate=16_000,
                               speaker_emb=np.zeros(256), x_vector=None)

    monkeypatch.setattr(synthesis, "Synthesizer", FakeSynth)
    batch = tmp_path / "lines.txt"
    batch.write_text("One.|A deep voice.\n# skip\nTwo.|A high voice.\n")
    assert main(["synthesize", "--run", "r", "--batch", str(batch), "--out-dir", str(tmp_path / "w"), "--seed", "4",
                 "--temperature", "0.5", "--mapper-draws", "2", "--device", "cuda:1"]) == 0
    assert calls["from_run"] == [("r", "cuda:1", None, None)]
    assert [t for t, _ in calls["synth"]] == ["One.", "Two."]
    kw = calls["synth"][0][1]
    assert kw["seed"] == 4 and kw["mapper_draws"] == 2 and kw["sampling"].temperature == 0.5
    assert (tmp_path / "w" / "0001.wav").is_file() and (tmp_path / "w" / "0003.tokens.npy").is_file()
    assert "0003.wav: 0.10 s, 5 speech tokens" in capsys.readouterr().out
    assert main(["synthesize", "--run", "r", "--batch", str(batch), "--out", "a.wav"]) == 2  # --out is one clip's
    assert "drop --out" in capsys.readouterr().err


# ---- serve and PREFECT_API_URL -------------------------------------------------------------------------------------
@pytest.fixture
def no_side_effects(monkeypatch):
    import subprocess

    import flows.serve as serve

    def refuse(*a, **k):
        raise AssertionError("must not start a server or change a setting")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(serve, "_prefect_config", refuse)
    monkeypatch.setattr(serve, "_api_up", lambda url: True)
    return serve


def _profile(monkeypatch, name: str, url: str | None):
    import prefect.settings.profiles as profiles
    from prefect.settings import PREFECT_API_URL
    from prefect.settings.profiles import Profile

    monkeypatch.setattr(profiles, "load_current_profile",
                        lambda: Profile(name=name, settings={PREFECT_API_URL: url} if url else {}))


def test_serve_honours_prefect_api_url_from_the_environment(monkeypatch, no_side_effects):
    monkeypatch.setenv("PREFECT_API_URL", "http://example.org:4200/api")
    said = []
    changes = no_side_effects.ensure_server(say=said.append)
    assert changes.server is None and not changes.profile_set
    assert said == ["Using PREFECT_API_URL=http://example.org:4200/api from the environment; starting no server and "
                    "changing no setting."]
    changes.undo()  # nothing to undo
    monkeypatch.setattr(no_side_effects, "_api_up", lambda url: False)  # set, but nothing answers: said, no server
    with pytest.raises(no_side_effects.ServeError, match="PREFECT_API_URL=http://example.org:4200/api .from the "
                                                         "environment. does not answer"):
        no_side_effects.ensure_server(say=said.append)


def test_serve_honours_prefect_api_url_from_the_profile(monkeypatch, no_side_effects):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    _profile(monkeypatch, "work", "http://prefect.internal/api")
    said = []
    changes = no_side_effects.ensure_server(say=said.append)
    assert changes.server is None and not changes.profile_set
    assert said[0].startswith("Using PREFECT_API_URL=http://prefect.internal/api from Prefect profile 'work'")


def test_serve_without_a_url_says_what_it_sets_and_undoes_it(monkeypatch):
    import flows.serve as serve

    monkeypatch.setenv("PREFECT_API_URL", "placeholder")  # restored (unset) after the test
    monkeypatch.delenv("PREFECT_API_URL")
    _profile(monkeypatch, "default", None)
    monkeypatch.setattr(serve, "_api_up", lambda url: True)  # a server already answers at 127.0.0.1:4200
    config = []
    monkeypatch.setattr(serve, "_prefect_config", lambda *a: config.append(a))
    said = []
    changes = serve.ensure_server(say=said.append)
    assert said == ["No PREFECT_API_URL is set; a Prefect server already answers at http://127.0.0.1:4200/api: using "
                    "it (not stopped on exit).",
                    "Setting PREFECT_API_URL=http://127.0.0.1:4200/api in Prefect profile 'default' (so that `prefect "
                    "deployment run` in another terminal reaches it); unset again on exit."]
    assert config == [("set", "PREFECT_API_URL=http://127.0.0.1:4200/api")] and changes.server is None
    changes.undo()
    assert config[-1] == ("unset", "PREFECT_API_URL", "-y")
