"""Serve every deployment from one process: `instruct-tts serve`.

Deployment names are a single character ("-") so that a user types the flow name plus two
characters: `prefect deployment run build-cache/-` (Prefect requires FLOW/DEPLOYMENT; names must be
non-empty and may not contain / % & < >). Each deployment's parameters are its command's flags (docs/deployments.md).

An existing PREFECT_API_URL (environment or profile) is used as it is; only when none is set does `serve` start a
local server and point the profile at it, saying so, and undo both on exit (`ensure_server`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

DEPLOYMENT_NAME = "-"
DEFAULT_API = "http://127.0.0.1:4200/api"


# flow -> the parameters a user passes to `prefect deployment run FLOW/-` (shown as the description). Parameters are
# the command's flags in snake_case (`instruct-tts CMD --help`); tests/test_deployments.py checks these names.
USAGE = {
    "build-cache": "-p metadata=meta.txt -p audio_root=DIR -p store=cache/NAME.zarr "
                   "[-p device=cuda] [-p task_runner=dask -p cluster=tcp://scheduler:8786]",
    "train-stage1": "-p store=cache/NAME.zarr -p out=runs/mapper [-p phase=both] [-p epochs=50] [-p device=cuda]",
    "train-stage2": "-p store=cache/NAME.zarr -p mapper=runs/mapper -p t3=DIR_OR_PRESET -p out=runs/t3 "
                    "[-p max_steps=2000]",
    "synthesize": "-p run=runs/t3 -p batch=lines.txt -p out_dir=wavs  (lines: text|instruction[|reference.wav]; "
                  "or -p text=... -p instruction=... -p out=a.wav)",
    "evaluate": "-p run=runs/t3 -p store=cache/NAME.zarr [-p n=24]",
    "lab": "-p out=lab [-p preset=default|medium|tiny] [-p n_clips=2000]",
}


def deployments():
    from flows.build_cache import build_cache_flow
    from flows.evaluate import evaluate_flow, synthesize_flow
    from flows.lab import lab_flow
    from flows.train_stage1 import train_stage1_flow
    from flows.train_stage2 import train_stage2_flow

    flows = (build_cache_flow, train_stage1_flow, train_stage2_flow, synthesize_flow, evaluate_flow, lab_flow)
    out = []
    for f in flows:
        d = f.to_deployment(name=DEPLOYMENT_NAME,
                            description=f"prefect deployment run {f.name}/{DEPLOYMENT_NAME} {USAGE[f.name]}")
        describe_parameters(d._parameter_openapi_schema.properties, f.name)
        out.append(d)
    return out


def describe_parameters(properties: dict, cmd: str) -> None:
    """Give each parameter its flag's ``--help`` text, defaults included, as the description Prefect's UI shows
    in the run form: the parameters are the flags, so their explanation has one home too (the parser)."""
    from instruct_tts.options import option_help

    for name, text in option_help(cmd).items():
        if name in properties and text:
            properties[name]["description"] = text


def _api_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def configured_api() -> tuple[str, str] | None:
    """The PREFECT_API_URL already set, and where: the environment, else the active Prefect profile."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url, "the environment"
    from prefect.settings.profiles import load_current_profile

    profile = load_current_profile()
    for setting, value in profile.settings.items():
        if setting.name == "PREFECT_API_URL" and value:
            return str(value), f"Prefect profile {profile.name!r}"
    return None


class ServeError(RuntimeError):
    """No Prefect API to serve the deployments against (said in one line)."""


class Changes:
    """What `ensure_server` changed on this machine, to be undone on exit."""

    def __init__(self, server: subprocess.Popen | None = None, profile_set: bool = False):
        self.server, self.profile_set = server, profile_set

    def undo(self) -> None:
        if self.server is not None:
            self.server.terminate()
        if self.profile_set:
            _prefect_config("unset", "PREFECT_API_URL", "-y")


def ensure_server(api_url: str = DEFAULT_API, timeout: float = 90.0, say=print) -> Changes:
    """An existing PREFECT_API_URL (environment or profile) is used as it is: no server is started, nothing changes.
    Only when none is set: start a local Prefect server unless one answers at ``api_url``, and set PREFECT_API_URL
    in the active profile so that a `prefect deployment run` typed in another terminal reaches it — each change said
    on stdout, and undone by `Changes.undo` on exit."""
    configured = configured_api()
    if configured is not None:
        url, where = configured
        if not _api_up(url):
            raise ServeError(f"PREFECT_API_URL={url} (from {where}) does not answer: start that server, or unset "
                             "PREFECT_API_URL to have `serve` start a local one")
        say(f"Using PREFECT_API_URL={url} from {where}; starting no server and changing no setting.")
        return Changes()
    server = None
    if _api_up(api_url):
        say(f"No PREFECT_API_URL is set; a Prefect server already answers at {api_url}: using it (not stopped on exit).")
    else:
        host, port = "127.0.0.1", api_url.split(":")[-1].split("/")[0]
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                raise ServeError(f"port {port} is taken by something that is not a Prefect API")
        say(f"No PREFECT_API_URL is set: starting a Prefect server on {host}:{port} (stopped on exit).")
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", port],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while not _api_up(api_url):
            if server.poll() is not None or time.time() > deadline:
                server.terminate()
                raise ServeError("the Prefect server did not start; run `prefect server start` yourself")
            time.sleep(1)
    from prefect.settings.profiles import load_current_profile

    say(f"Setting PREFECT_API_URL={api_url} in Prefect profile {load_current_profile().name!r} (so that "
        "`prefect deployment run` in another terminal reaches it); unset again on exit.")
    _prefect_config("set", f"PREFECT_API_URL={api_url}")
    os.environ["PREFECT_API_URL"] = api_url
    return Changes(server=server, profile_set=True)


def _prefect_config(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefect", "config", *args], check=True, stdout=subprocess.DEVNULL)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # so the `finally` below stops the server and restores the profile


def serve_all(start_server: bool = True) -> None:
    import signal

    from prefect.settings import PREFECT_API_URL, temporary_settings

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    changes = ensure_server() if start_server else Changes()
    try:
        # Prefect read its settings when first imported (above, before any URL was set here): pass the URL on
        url = os.environ.get("PREFECT_API_URL") or (configured_api() or ("", ""))[0]
        with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
            from prefect import serve

            print(f"Prefect API: {url or '(none: Prefect runs a temporary server)'}"
                  + (f"  (UI: {url.removesuffix('/api')})" if url else ""))
            deps = deployments()
            print("In another terminal:")
            for d in deps:
                print(f"  uv run {d.description}")
            serve(*deps)
    finally:
        changes.undo()  # we started the server / set the profile: leave both as we found them
