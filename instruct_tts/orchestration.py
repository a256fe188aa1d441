"""Run a stage through Prefect when a Prefect API answers; otherwise say so in one line and run it without.

Prefect 3 runs every flow against an API: the configured one (``PREFECT_API_URL``), else a temporary
server it starts in a subprocess and waits for ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
(20 s by default). On a busy machine that server can take longer to boot, and the stage then died with
"Timed out while attempting to connect to ephemeral Prefect API server" before doing any work.
Orchestration plumbing must never be why a stage fails, so before any work the CLI starts that server
itself with a generous timeout (a timeout the user set wins), and when no API can be had the stage runs
its plain library call — the ``--no-prefect`` path: the same result files, no Prefect artifacts.
"""
from __future__ import annotations

import sys
from typing import TextIO

STARTUP_TIMEOUT_S = 120  # the temporary server's start-up wait, unless the user set one


def startup_timeout(eph) -> int:
    """Seconds to wait for the temporary API server (``eph``: Prefect's ``settings.server.ephemeral``): the
    user's own setting, else at least STARTUP_TIMEOUT_S."""
    if "startup_timeout_seconds" in eph.model_fields_set:  # set in the environment or the Prefect profile
        return int(eph.startup_timeout_seconds)
    return max(int(eph.startup_timeout_seconds), STARTUP_TIMEOUT_S)


def prefect_api_problem() -> str | None:
    """None when flows can reach a Prefect API (started here if need be); else why not, in a few words."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            err = client.api_healthcheck()
        return None if err is None else f"the Prefect API at {settings.api.url} does not answer ({_first_line(err)})"
    if not settings.server.ephemeral.enabled:
        return "no PREFECT_API_URL is set and Prefect's temporary server is disabled"
    from prefect.server.api.server import SubprocessASGIServer

    timeout = startup_timeout(settings.server.ephemeral)
    server = SubprocessASGIServer()  # the instance Prefect's own client code uses: a started one is reused
    try:
        server.start(timeout=timeout)
    except Exception as err:  # noqa: BLE001 — any failure to start means: run without it
        if not server.running:
            server.stop()  # Prefect leaves a server that missed the deadline running
        return f"the temporary Prefect API server did not start within {timeout} s ({_first_line(err)})"
    return None


def use_prefect(requested: bool, also: str = "", err: TextIO | None = None) -> bool:
    """Whether to run through Prefect: as requested, unless no API can be had — then one line on stderr
    (``also``: what else changes without Prefect)."""
    if not requested:
        return False
    problem = prefect_api_problem()
    if problem is None:
        return True
    print(f"instruct-tts: {problem}; running without Prefect (results go to files only, no Prefect artifacts{also})",
          file=err or sys.stderr, flush=True)
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
