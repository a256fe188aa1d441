"""Serve every deployment from one process: `instruct-tts serve`.

Deployment names are a single character ("-") so that a user types the flow name plus two
characters: `prefect deployment run build-cache/-` (Prefect requires FLOW/DEPLOYMENT; names must be
non-empty and may not contain / % & < >).
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


# flow -> the parameters a user passes to `prefect deployment run FLOW/-` (shown as the description)
USAGE = {
    "build-cache": "-p metadata=meta.txt -p audio_root=DIR -p store=cache/NAME.zarr "
                   "[-p task_runner=dask -p cluster=tcp://scheduler:8786]",
    "train-stage1": "-p store=cache/NAME.zarr -p out=runs/mapper [-p phase=both] [-p train='{\"epochs\": 50}']",
    "train-stage2": "-p store=cache/NAME.zarr -p mapper=runs/mapper -p t3=DIR_OR_PRESET -p out=runs/t3",
    "synthesize": "-p run_dir=runs/t3 -p batch=lines.txt -p out_dir=wavs  (lines: text|instruction[|reference.wav])",
    "evaluate": "-p run_dir=runs/t3 -p store=cache/NAME.zarr",
    "lab": "-p out=lab [-p preset=default|medium|tiny] [-p overrides='{\"n_clips\": 2000}']",
}


def deployments():
    from flows.build_cache import build_cache_flow
    from flows.evaluate import evaluate_flow, synthesize_flow
    from flows.lab import lab_flow
    from flows.train_stage1 import train_stage1_flow
    from flows.train_stage2 import train_stage2_flow

    flows = (build_cache_flow, train_stage1_flow, train_stage2_flow, synthesize_flow, evaluate_flow, lab_flow)
    return [f.to_deployment(name=DEPLOYMENT_NAME,
                            description=f"prefect deployment run {f.name}/{DEPLOYMENT_NAME} {USAGE[f.name]}")
            for f in flows]


def _api_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def ensure_server(api_url: str = DEFAULT_API, timeout: float = 90.0) -> subprocess.Popen | None:
    """Start a local Prefect server unless one answers, and point this profile at it so that a
    `prefect deployment run` typed in another terminal reaches the same server (undone on exit)."""
    if _api_up(api_url):
        os.environ["PREFECT_API_URL"] = api_url
        return None
    else:
        host, port = "127.0.0.1", api_url.split(":")[-1].split("/")[0]
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                raise RuntimeError(f"port {port} is taken by something that is not a Prefect API")
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", port],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while not _api_up(api_url):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the Prefect server did not start; run `prefect server start` yourself")
            time.sleep(1)
    _prefect_config("set", f"PREFECT_API_URL={api_url}")
    os.environ["PREFECT_API_URL"] = api_url
    return proc


def _prefect_config(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefect", "config", *args], check=True, stdout=subprocess.DEVNULL)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # so the `finally` below stops the server and restores the profile


def serve_all(start_server: bool = True) -> None:
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = ensure_server() if start_server else None
    from prefect import serve  # only now: Prefect reads PREFECT_API_URL when it is first imported

    print(f"Prefect API: {os.environ.get('PREFECT_API_URL')}  (UI: {os.environ.get('PREFECT_API_URL', '')[:-4]})")
    deps = deployments()
    print("In another terminal:")
    for d in deps:
        print(f"  uv run {d.description}")
    try:
        serve(*deps)
    finally:
        if server is not None:  # we started it: leave the profile as we found it
            server.terminate()
            _prefect_config("unset", "PREFECT_API_URL", "-y")
