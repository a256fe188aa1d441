"""The docs match the code (issue #31 item 5), and this test keeps them so.

Over README.md and docs/*.md, with no subprocess and no model:

* every relative link ``[text](path#anchor)`` (and image) names a file that exists, and its ``#anchor`` a
  heading of that file (GitHub's slug rules: lower case, punctuation dropped, each space a hyphen, ``-1``,
  ``-2`` for repeats);
* every repository path the prose cites (``tts_core/stage1/data.py``, ``bench/gpu.py``, ``docs/lab.md``, in
  backticks or not), every ``python -m MODULE`` of this repository and every root document (``README.md``)
  exists — and nothing cites a design document that is not in the repository (``DESIGN.md``);
* every ``instruct-tts COMMAND ... --flag`` (fenced code and inline code; ``uv run instruct-tts``,
  ``python -m instruct_tts``, ``torchrun ... -m instruct_tts``, ``\\`` continuations; an inline span that starts
  with a subcommand, e.g. ```synthesize --mapper-draws 1```) names a subcommand of
  `instruct_tts.cli.build_parser` and flags that subcommand has;
* every ``prefect deployment run FLOW/- -p NAME=VALUE`` names a flow of ``flows/`` and one of its parameters
  (read from the source with `ast`, so Prefect is not imported).

`test_the_checker_finds_what_it_should` runs the checker on a synthetic page with one of each mistake, so a
checker that silently accepts everything fails.
"""
from __future__ import annotations

import argparse
import ast
import re
import shlex
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# top-level folders of the repository whose paths the docs cite; a cited path under one of them must exist
TOP_DIRS = ("tts_core", "cache", "flows", "instruct_tts", "bench", "tests", "docs", ".ci")
PACKAGES = ("tts_core", "cache", "flows", "instruct_tts", "bench", "tests")
FILE_EXTS = ("py", "md", "toml", "json", "txt", "yaml", "yml", "png", "csv", "sh")
# folders the code writes (git-ignored), cited as where output goes
OUTPUT_DIRS = {"bench/results/"}

FENCE = re.compile(r"^\s*(```+|~~~+)")
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
REPO_PATH = re.compile(r"(?<![\w./$-])((?:%s)/[\w./+-]*)" % "|".join(re.escape(d) for d in TOP_DIRS))
ROOT_DOC = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_-]*\.md)\b")
MODULE = re.compile(r"(?<![\w-])-m\s+([A-Za-z_][\w.]*)")
SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "&", "2>&1"}


# ---- markdown ----------------------------------------------------------------------------------------------------

def split_markdown(text: str) -> tuple[str, list[tuple[int, str]]]:
    """→ (prose with fenced blocks blanked, line count kept; [(first line, block text)])."""
    prose, blocks, block, start, fence = [], [], [], 0, None
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, start, block = m.group(1)[0] * 3, i + 1, []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((start, "\n".join(block)))
            fence = None
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    if fence is not None:
        blocks.append((start, "\n".join(block)))
    return "\n".join(prose), blocks


def inline_spans(prose: str) -> list[tuple[int, str]]:
    """Inline code spans → [(line, content with newlines as spaces)]."""
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split())) for m in SPAN.finditer(prose)]


def without_spans(prose: str) -> str:
    """Prose with its inline code blanked (newlines kept), so `[x](y)` inside code is no link."""
    return SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): rendered text, lower case, punctuation other than
    ``-`` and ``_`` dropped, each space a hyphen (runs of spaces are not merged)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def heading_slugs(text: str) -> set[str]:
    prose, _ = split_markdown(text)
    slugs, seen = set(), {}
    for line in prose.splitlines():
        m = HEADING.match(line)
        if m:
            base = github_slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            slugs.add(base if n == 0 else f"{base}-{n}")
    return slugs


# ---- the code the docs describe ------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def cli_options() -> dict[str, set[str]]:
    """{subcommand: its option strings}; "" holds the top-level parser's."""
    from instruct_tts.cli import build_parser

    parser = build_parser()
    out = {"": {s for a in parser._actions for s in a.option_strings}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = {s for a in sub._actions for s in a.option_strings}
    return out


@lru_cache(maxsize=1)
def flow_parameters() -> dict[str, set[str] | None]:
    """{flow name: parameter names} of every ``@flow(name=...)`` in flows/*.py; None where it takes **kwargs."""
    out: dict[str, set[str] | None] = {}
    for path in sorted((REPO / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", getattr(dec.func, "attr", "")) == "flow":
                    name = next((k.value.value for k in dec.keywords
                                 if k.arg == "name" and isinstance(k.value, ast.Constant)), node.name)
                    a = node.args
                    out[name] = None if a.kwarg else {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
    return out


# ---- checks --------------------------------------------------------------------------------------------------------

def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=False)
    except ValueError:  # an apostrophe in prose
        return command.split()


def _flag(token: str) -> str | None:
    token = token.strip("[](){},")
    if not token.startswith("--") or len(token) < 3 or not token[2].isalpha():
        return None
    return token.split("=", 1)[0]


def check_command(command: str, where: str, options: dict[str, set[str]] | None = None,
                  flows: dict[str, set[str] | None] | None = None) -> list[str]:
    """Errors of one shell command line (continuations already joined) or inline code span."""
    options = cli_options() if options is None else options
    errors = []
    toks = _tokens(command)
    starts = [i + 1 for i, t in enumerate(toks) if t == "instruct-tts" or t.endswith("/instruct-tts")
              or (t == "instruct_tts" and i > 0 and toks[i - 1] == "-m")]
    if len(toks) > 1 and toks[0] and toks[0] in options and _flag(toks[1]):
        starts.append(0)  # an inline span such as `synthesize --mapper-draws 1`
    for start in starts:
        if start >= len(toks):
            continue
        sub = toks[start]
        if sub.startswith("-"):
            sub, rest = "", toks[start:]
        elif sub in options:
            rest = toks[start + 1:]
        else:
            if re.fullmatch(r"[a-z][a-z0-9-]*", sub):
                errors.append(f"{where}: `instruct-tts {sub}`: no such subcommand (have {', '.join(sorted(o for o in options if o))})")
            continue
        for t in rest:
            if t in SEPARATORS or t.startswith("#") or t in ("instruct-tts", "instruct_tts"):
                break
            flag = _flag(t)
            if flag and flag not in options[sub] and flag != "--help":
                errors.append(f"{where}: `instruct-tts {sub or '(top level)'} {flag}`: no such flag")
    i = next((k + 1 for k in range(len(toks) - 1) if toks[k:k + 2] == ["deployment", "run"]), None)
    if i is not None:
        flows = flow_parameters() if flows is None else flows
        if i + 1 < len(toks) and "/" in toks[i + 1]:
            flow = toks[i + 1].split("/")[0]
            if flow not in flows:
                errors.append(f"{where}: `prefect deployment run {toks[i + 1]}`: no flow named {flow!r} in flows/")
            else:
                params = flows[flow]
                for j in range(i + 2, len(toks) - 1):
                    if toks[j] in SEPARATORS:
                        break
                    if toks[j] in ("-p", "--param") and "=" in toks[j + 1]:
                        key = toks[j + 1].split("=", 1)[0]
                        if params is not None and key not in params:
                            errors.append(f"{where}: `prefect deployment run {flow}/- -p {key}=...`: the flow has no "
                                          f"parameter {key!r} (has {', '.join(sorted(params))})")
    return errors


def _path_errors(text: str, where_line, *, in_code: bool) -> list[str]:
    errors = []
    for m in REPO_PATH.finditer(text):
        path = m.group(1).rstrip(".,;:")
        where = where_line(m.start())
        last = path.rsplit("/", 1)[-1]
        is_dir = path.endswith("/")
        if not is_dir and ("." not in last or last.rsplit(".", 1)[-1] not in FILE_EXTS) or ".zarr" in path:
            continue  # a placeholder or a store's path (cache/NAME.zarr, cache/x.zarr/norm_report.md): not in the repository
        if path in OUTPUT_DIRS or (in_code and is_dir):
            continue  # written by the code / a layout tree's labels
        if not (REPO / path).exists():
            errors.append(f"{where}: `{path}` does not exist in the repository")
    for m in ROOT_DOC.finditer(text):
        if not (REPO / m.group(1)).exists():
            errors.append(f"{where_line(m.start())}: `{m.group(1)}` is not in the repository")
    for m in re.finditer(r"\bDESIGN\b(?!\.md)", text):
        if not (REPO / "DESIGN.md").exists():
            errors.append(f"{where_line(m.start())}: cites DESIGN, which is not in the repository")
    for m in MODULE.finditer(text):
        mod = m.group(1).rstrip(".")
        if mod.split(".")[0] not in PACKAGES:
            continue
        base = REPO.joinpath(*mod.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (base / "__main__.py").is_file()):
            errors.append(f"{where_line(m.start())}: `python -m {mod}`: no such module in the repository")
    return errors


def check_markdown(text: str, path: Path) -> list[str]:
    """Every error of one markdown page (path: where it lives, for relative links and messages)."""
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    prose, blocks = split_markdown(text)
    errors = []

    def line_of(s: str, offset: int, first: int = 1) -> str:
        return f"{name}:{first + s.count(chr(10), 0, offset)}"

    # links
    plain = without_spans(prose)
    for m in LINK.finditer(plain):
        target = m.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = line_of(plain, m.start())
        if file_part and not dest.exists():
            errors.append(f"{where}: link to {target}: {file_part} does not exist")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                errors.append(f"{where}: link to {target}: an anchor into a file that is not markdown")
                continue
            slugs = heading_slugs(text if dest == path else dest.read_text(encoding="utf-8"))
            if anchor not in slugs:
                errors.append(f"{where}: link to {target}: no heading with the anchor #{anchor} in {file_part or name}")

    # paths cited in prose (backticks or not) and in code blocks
    errors += _path_errors(prose, lambda o: line_of(prose, o), in_code=False)
    for first, block in blocks:
        errors += _path_errors(block, lambda o, b=block, f=first: line_of(b, o, f), in_code=True)

    # commands: fenced blocks line by line (continuations joined), inline spans one by one
    for first, block in blocks:
        lines, i = block.split("\n"), 0
        while i < len(lines):
            start, command = i, lines[i]
            while command.rstrip().endswith("\\") and i + 1 < len(lines):  # a `\` continuation
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i]
            errors += check_command(command, f"{name}:{first + start}")
            i += 1
    for line, span in inline_spans(prose):
        errors += check_command(span, f"{name}:{line}")
    return list(dict.fromkeys(errors))  # a path cited as a link's text and its target is one error


# ---- tests ---------------------------------------------------------------------------------------------------------

def test_docs_exist():
    assert (REPO / "README.md").is_file() and len(DOCS) > 3


def test_docs_links_paths_and_flags_match_the_code():
    errors = [e for doc in DOCS for e in check_markdown(doc.read_text(encoding="utf-8"), doc)]
    assert not errors, "the docs disagree with the repository:\n" + "\n".join(errors)


def test_github_slugs():
    assert github_slug("T3 families: what `--t3` recognises") == "t3-families-what---t3-recognises"
    assert github_slug("GPU: `make bench-gpu` (= `uv run python -m bench.gpu`)") == \
        "gpu-make-bench-gpu--uv-run-python--m-benchgpu"
    assert github_slug("Stage-2 memory and activation checkpointing") == "stage-2-memory-and-activation-checkpointing"
    assert heading_slugs("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_checker_finds_what_it_should():
    page = REPO / "docs" / "_synthetic_page.md"  # never written: its text is passed in
    text = "\n".join([
        "# Title",
        "Good: [lab](lab.md), [its section](lab.md#running-it), [here](#title), [web](https://example.org/x),",
        "`tts_core/t3/families.py`, tests/test_docs.py, `uv run python -m bench.gpu`, `cache/NAME.zarr/norm_report.md`.",
        "Bad link: [gone](no_such_page.md) and [bad anchor](lab.md#no-such-heading) and [self](#nowhere).",
        "Bad path: `tts_core/no_such_module.py`, and the design doc `DESIGN.md`; `python -m bench.no_such_bench`.",
        "Inline: `uv run instruct-tts synthesize --run runs/t3 --no-such-flag 1` and `train-stage1 --draws 64`,",
        "`synthesize --bogus-inline`, `instruct-tts no-such-command --x`.",
        "```bash",
        "uv run instruct-tts build-cache --metadata m.txt --audio-root . \\",
        "    --store cache/x.zarr --bogus-continued",
        "uv run torchrun --nproc-per-node 8 -m instruct_tts train-stage2 --t3 tiny --bogus-torchrun",
        "python -m instruct_tts lab --out lab/ --preset tiny   # a comment --not-a-flag",
        "prefect deployment run build-cache/- -p store=cache/x.zarr -p no_such_param=1",
        "prefect deployment run no-such-flow/- -p x=1",
        "```",
    ])
    errors = check_markdown(text, page)
    joined = "\n".join(errors)
    expected = ["no_such_page.md does not exist", "#no-such-heading", "#nowhere", "tts_core/no_such_module.py",
                "DESIGN.md", "bench.no_such_bench", "synthesize --no-such-flag", "synthesize --bogus-inline",
                "no-such-command", "build-cache --bogus-continued", "train-stage2 --bogus-torchrun",
                "no_such_param", "no-such-flow"]
    for e in expected:
        assert e in joined, f"the checker missed {e!r}; it found:\n{joined}"
    assert len(errors) == len(expected), joined  # and nothing in the good lines
    assert "--not-a-flag" not in joined and "--draws" not in joined and "--preset" not in joined
