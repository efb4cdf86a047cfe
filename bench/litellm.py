"""The LiteLLM target: LiteLLM's own proxy in a throwaway virtualenv, routed to the benchmark's simulator.

Never a project dependency: the benchmark installs ``litellm[proxy]`` (one pinned version) into
``var/bench-litellm/`` (git-ignored) on its first run and reuses it while the pin is unchanged. When it cannot be
installed (no registry, pip fails, the install takes longer than ``INSTALL_TIMEOUT_S``) the target is reported
unavailable, with the reason, and the rest of the benchmark runs.

It runs as LiteLLM documents it, one process: ``litellm --config <generated> --num_workers 1`` (uvicorn, uvloop),
no database, no Redis, quiet logs, with every benchmark scenario as a model of the same name CesaFlow's clients
use (``bench/fake/<scenario>``, and ``benchtap/...`` through the tap) routed to the simulator's OpenAI dialect
with a generated provider key. Clients authenticate with a generated master key. LiteLLM has no ``GET
/api/v1/org``: the plain API figures are n/a for it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from bench import toolvenv
from bench.harness import SCENARIOS, SERVER_CPUS, Harness, wait_for_port
from deploy.throwaway import HOST, ROOT, Child, free_port

# 1.82.6: the last release before the March 2026 compromise of LiteLLM's PyPI account (1.82.7 and 1.82.8 carried
# a credential stealer; later 1.107.x releases were pulled too). Its proxy's SQL injection (CVE-2026-42208) needs
# the proxy's database, which the benchmark never gives it. Change the pin deliberately, never to "latest".
PIN = "1.82.6"
REQUIREMENT = f"litellm[proxy]=={PIN}"
VENV = ROOT / "var" / "bench-litellm"
INSTALL_TIMEOUT_S = 600.0
START_TIMEOUT_S = 120.0
CHAT_PATH = "/v1/chat/completions"
NAME = "litellm"
# The malicious release's start-up hook: an install that has it is refused (and the venv deleted).
_KNOWN_BAD_FILES = ("litellm_init.pth",)


Unavailable = toolvenv.Unavailable


def _refuse_known_bad(venv: Path) -> str | None:
    for site in venv.glob("lib/python*/site-packages"):
        for bad in _KNOWN_BAD_FILES:
            if (site / bad).exists():
                return f"the installed {REQUIREMENT} contains {bad} (a known malicious file); removed"
    return None


def ensure_installed() -> tuple[Path, str]:
    """The ``litellm`` executable of the venv, and how it got there ("reused" or "installed in N s")."""
    return toolvenv.ensure(VENV, REQUIREMENT, "litellm", timeout_s=INSTALL_TIMEOUT_S, verify=_refuse_known_bad)


@dataclass(frozen=True)
class Setup:
    executable: Path
    master_key: str
    config_path: Path
    log_config_path: Path
    how: str  # "reused" / "installed in N s"


def configure(harness: Harness, installed: tuple[Path, str], *, simulator_url: str, tap_url: str) -> Setup:
    """Write LiteLLM's config for this run (``installed``: what ``ensure_installed`` returned): every scenario
    under the benchmark's model names."""
    executable, how = installed
    master_key = "sk-bench-" + secrets.token_urlsafe(24)  # LiteLLM wants master keys to start with "sk-"
    provider_key = f"fake-bench-{secrets.token_urlsafe(16)}"
    models = [
        {
            "model_name": f"{label}/fake/{scenario['name']}",
            "litellm_params": {"model": f"openai/fake/{scenario['name']}", "api_base": f"{base}/openai/v1"}
            | {"api_key": provider_key},
        }
        for label, base in (("bench", simulator_url), ("benchtap", tap_url))
        for scenario in SCENARIOS.values()
    ]
    config = {
        "model_list": models,
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"set_verbose": False, "json_logs": False},
    }
    directory = harness.workdir / "litellm"
    directory.mkdir(exist_ok=True)
    # JSON is YAML: LiteLLM reads it with yaml.safe_load, and the benchmark needs no YAML writer.
    config_path = directory / "config.yaml"
    config_path.write_text(json.dumps(config, indent=1))
    config_path.chmod(0o600)  # holds the generated keys (throwaway, but still keys)
    # uvicorn's access log off and its other loggers at WARNING, like the other servers (an access line per
    # request is CPU the other targets do not spend).
    log_config = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "WARNING"},
            "uvicorn.error": {"level": "WARNING"},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
    log_config_path = directory / "logging.json"
    log_config_path.write_text(json.dumps(log_config))
    return Setup(executable, master_key, config_path, log_config_path, how)


def start(harness: Harness, setup: Setup, *, name: str = NAME) -> Child:
    """One LiteLLM proxy process on the server's core; returns once it listens."""
    port = free_port()
    env = {
        "PATH": harness.env_path,
        "LANG": "C.UTF-8",
        "HOME": str(harness.workdir),
        # The model price map from the package, not fetched from GitHub at start-up (loopback only, and it would
        # fail here anyway); production mode, so no .env file is read from the working directory.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOG": "ERROR",
        "DISABLE_ADMIN_UI": "True",
    }
    argv = [str(setup.executable), "--config", str(setup.config_path), "--host", HOST, "--port", str(port)]
    argv += ["--num_workers", "1", "--log_config", str(setup.log_config_path), "--telemetry", "False"]
    child = harness.spawn(name, argv, port, env, SERVER_CPUS, cwd=setup.config_path.parent)
    try:
        wait_for_port(child, timeout=START_TIMEOUT_S)
    except SystemExit as exc:  # exited or never listened: LiteLLM is left out, the benchmark goes on
        harness.discard(child)
        raise Unavailable(f"the LiteLLM proxy did not start: {str(exc)[-300:]}") from None
    return child
