"""The command sandbox, with the real bwrap / unshare / prlimit of this machine: no mocks.

Each mode runs only if its self-test passes here (the skip says why otherwise). Several checks run the same
command in ``none`` mode as well, to show the assertion would fail without the isolation being tested.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from runs.workspaces import (
    CommandLimits,
    SandboxUnavailable,
    WorkspaceError,
    run_command,
    sandbox_status,
    workspace_create,
)
from runs.workspaces import sandbox as sandbox_module
from runs.workspaces.sandbox import FORWARD_MAX_CHARS

REPO_DIR = Path(__file__).resolve().parents[3]
AS_ROOT = os.geteuid() == 0
# A uid nothing else on the machine uses, so "no process of this uid is left" cannot be disturbed by other test
# runs (which sandbox as 65534) and RLIMIT_NPROC counts only this test's processes.
ISOLATED_UID = 64123


def _require(mode: str) -> str:
    status = sandbox_status(mode)
    if not status.ok:
        pytest.skip(f"the {mode} sandbox fails its self-test on this machine: {status.detail}")
    return mode


@pytest.fixture(params=["bwrap", "unshare", "none"])
def mode(request, workspace_root: Path) -> str:
    return _require(request.param)


@pytest.fixture(params=["bwrap", "unshare"])
def namespaced_mode(request, workspace_root: Path) -> str:
    return _require(request.param)


@pytest.fixture
def bwrap(workspace_root: Path) -> str:
    return _require("bwrap")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _assert_stopped_growing(*paths: Path) -> None:
    """Background writers append to ``paths`` every 0.1 s; once they are dead the sizes stay put."""
    await asyncio.sleep(0.3)
    before = [_size(path) for path in paths]
    assert all(before), "a background writer never ran"
    await asyncio.sleep(0.6)
    assert [_size(path) for path in paths] == before, "a background child outlived the command"


def _live_pids(uid: int) -> list[str]:
    """Processes of ``uid`` that are not zombies (an orphaned zombie waits for PID 1 to reap it; it runs nothing)."""
    found = subprocess.run(["pgrep", "-u", str(uid), "-r", "D,R,S,T,t,I"], capture_output=True, text=True, check=False)
    return found.stdout.split()


# --- Environment, identity, isolation ----------------------------------------------------------------------------


async def test_environment_is_scrubbed(mode: str, workspace: Path, monkeypatch) -> None:
    monkeypatch.setenv("CESAFLOW_TEST_CANARY", "canary-7f3a9")
    monkeypatch.setenv("DATABASE_URL", os.environ.get("DATABASE_URL", "postgres://canary-db"))
    result = await run_command(workspace, "env", timeout_s=5, mode=mode)
    assert result.exit_code == 0
    env = {key: value for key, _, value in (line.partition("=") for line in result.output.splitlines())}
    assert "canary-7f3a9" not in result.output
    assert not [key for key in env if key.startswith("CESAFLOW_")]
    assert "DATABASE_URL" not in env
    assert "REDIS_URL" not in env
    assert set(env) == {
        "PATH",
        "HOME",
        "LANG",
        "PAGER",
        "MANPAGER",
        "LESS",
        "PIP_PROGRESS_BAR",
        "TQDM_DISABLE",
        "PYTHONDONTWRITEBYTECODE",
        "PWD",  # set by bash itself
        "SHLVL",  # set by bash itself
        "_",  # set by bash itself
    }
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["HOME"] == ("/workspace" if mode == "bwrap" else str(workspace))


@pytest.mark.skipif(not AS_ROOT, reason="the uid drop only happens when the server runs as root")
async def test_commands_never_run_as_root(mode: str, workspace: Path, settings) -> None:
    result = await run_command(workspace, "id -u; id -g; id -G", timeout_s=5, mode=mode)
    owner = workspace.stat()  # the run's own uid/gid, never 0
    assert owner.st_uid >= settings.SANDBOX_UID
    assert result.output == f"{owner.st_uid}\n{owner.st_gid}\n{owner.st_gid}\n"


async def test_bwrap_sees_only_the_workspace_and_python_works(bwrap: str, workspace: Path, settings) -> None:
    command = "pwd; echo hello > made.txt; python3 -c 'print(6 * 7)'; whoami; ls /"
    result = await run_command(workspace, command, timeout_s=5, mode=bwrap)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == ["/workspace", "42", "sandbox"]
    system = {top for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") if os.path.lexists(f"/{top}")}
    assert set(lines[3:]) == {"dev", "etc", "proc", "tmp", "usr", "workspace"} | system
    assert (workspace / "made.txt").read_text() == "hello\n"
    if AS_ROOT:
        assert (workspace / "made.txt").stat().st_uid == workspace.stat().st_uid


async def test_bwrap_has_no_network(bwrap: str, workspace: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        probe = (
            "import socket\n"
            f"for host in ('127.0.0.1', '10.255.255.1'):\n"
            "    s = socket.socket(); s.settimeout(1)\n"
            f"    print(host, s.connect_ex((host, {port})))\n"
        )
        result = await run_command(workspace, f"python3 -c {_quote(probe)}", timeout_s=5, mode=bwrap)
        assert result.exit_code == 0, result.output
        codes = dict(line.split() for line in result.output.splitlines())
        assert codes["127.0.0.1"] != "0"  # the sandbox's own loopback: nothing listens there
        assert codes["10.255.255.1"] == "101"  # ENETUNREACH: no route out at all
        with pytest.raises(TimeoutError):
            listener.accept()


async def test_without_a_sandbox_the_same_probe_reaches_the_host(workspace_root: Path, workspace: Path) -> None:
    # The control for the isolation tests above and below: in `none` mode the same commands do see the host.
    _require("none")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = f"import socket; print(socket.create_connection(('127.0.0.1', {port}), timeout=1) and 'connected')"
        command = f"python3 -c {_quote(probe)}; {_visibility_probe()}"
        result = await run_command(workspace, command, timeout_s=5, mode="none")
        listener.accept()[0].close()
    assert result.output.splitlines() == ["connected", "proc-visible", "repo-visible"]


def _visibility_probe() -> str:
    return (
        f"test -e /proc/{os.getpid()} && echo proc-visible || echo proc-hidden; "
        f"test -e {REPO_DIR} && echo repo-visible || echo repo-hidden"
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


async def test_bwrap_hides_the_server_process_and_the_app_directories(bwrap: str, workspace: Path) -> None:
    command = (
        f"{_visibility_probe()}; "
        f"cat /proc/{os.getpid()}/environ >/dev/null 2>&1 && echo environ-readable || echo environ-unreadable; "
        "test -e /work && echo work-visible || echo work-hidden; "
        "ls /proc | grep -c '^[0-9]'"
    )
    result = await run_command(workspace, command, timeout_s=5, mode=bwrap)
    lines = result.output.splitlines()
    assert lines[:4] == ["proc-hidden", "repo-hidden", "environ-unreadable", "work-hidden"]
    assert int(lines[4]) <= 6  # only the sandbox's own few processes exist in its /proc


async def test_unshare_hides_the_server_process_but_not_the_filesystem(workspace_root: Path, workspace: Path) -> None:
    mode = _require("unshare")
    result = await run_command(workspace, _visibility_probe(), timeout_s=5, mode=mode)
    # Documented limit of this mode: a fresh /proc, but the host's files stay readable.
    assert result.output.splitlines() == ["proc-hidden", "repo-visible"]


# --- Limits -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not AS_ROOT, reason="a dedicated uid (and counting its processes) needs root")
async def test_fork_bomb_is_contained_and_leaves_nothing(mode: str, workspace_root: Path, settings) -> None:
    # A uid of its own per mode and per session: the bomb's zombies (reaped slowly by some container inits) count
    # against RLIMIT_NPROC, and must not be inherited by the next mode's bwrap or by a parallel test run.
    uid = ISOLATED_UID + ["bwrap", "unshare", "none"].index(mode) * 1000 + os.getpid() % 1000
    settings.SANDBOX_UID = settings.SANDBOX_GID = uid
    settings.SANDBOX_UIDS = 1
    workspace = workspace_create(uuid.uuid4())
    started = time.monotonic()
    result = await run_command(
        workspace, ":(){ :|:& };:; sleep 30", timeout_s=1.5, mode=mode, limits=CommandLimits(processes=32)
    )
    assert time.monotonic() - started < 4
    assert result.timed_out is True
    assert result.exit_code is None
    assert "Resource temporarily unavailable" in result.output  # RLIMIT_NPROC refused forks
    deadline = time.monotonic() + 3
    while _live_pids(uid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _live_pids(uid) == []


async def test_fsize_limit_stops_yes_into_a_file(mode: str, workspace: Path) -> None:
    limit = 1024 * 1024
    result = await run_command(
        workspace, "yes > big; echo status=$?", timeout_s=10, mode=mode, limits=CommandLimits(file_size=limit)
    )
    assert result.timed_out is False
    assert "status=153" in result.output  # 128 + SIGXFSZ
    assert 0 < (workspace / "big").stat().st_size <= limit


async def test_cpu_limit_ends_a_busy_loop(mode: str, workspace: Path) -> None:
    started = time.monotonic()
    result = await run_command(workspace, "while :; do :; done", timeout_s=8, mode=mode, limits=CommandLimits(cpu_s=1))
    assert time.monotonic() - started < 5
    assert result.timed_out is False
    if mode == "unshare":
        # util-linux 2.38's unshare reports a child's signal death as exit 1 ("sigprocmask unblock failed").
        assert result.exit_code not in (None, 0)
    else:
        assert result.exit_code == 152  # 128 + SIGXCPU


# --- Killing the tree ---------------------------------------------------------------------------------------------

_BACKGROUND = (
    "nohup bash -c 'while :; do printf x >> ticks; sleep 0.1; done' >/dev/null 2>&1 & echo $! > bg.pid; "
    "(while :; do printf x >> ticks2; sleep 0.1; done) & "
    "sleep 100"
)


async def _assert_background_dead(mode: str, workspace: Path) -> None:
    await _assert_stopped_growing(workspace / "ticks", workspace / "ticks2")
    if mode == "none":  # no PID namespace: the pid in the file is the host's
        assert not _alive(int((workspace / "bg.pid").read_text()))


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; a zombie is dead, only waiting for PID 1 to reap it (in this
    container PID 1 reaps orphans lazily, so /proc/<pid> of a killed orphan can linger for a while)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


async def test_timeout_kills_background_children(mode: str, workspace: Path) -> None:
    started = time.monotonic()
    result = await run_command(workspace, _BACKGROUND, timeout_s=1.0, mode=mode)
    assert time.monotonic() - started < 2.5
    assert (result.timed_out, result.cancelled, result.exit_code) == (True, False, None)
    await _assert_background_dead(mode, workspace)


async def test_stop_kills_background_children_within_a_second(mode: str, workspace: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.6, stop.set)
    started = time.monotonic()
    result = await run_command(workspace, _BACKGROUND, timeout_s=30, mode=mode, stop=stop)
    assert time.monotonic() - started < 0.6 + 1.0
    assert (result.timed_out, result.cancelled, result.exit_code) == (False, True, None)
    await _assert_background_dead(mode, workspace)


async def test_normal_exit_does_not_wait_for_or_keep_background_children(mode: str, workspace: Path) -> None:
    command = "(while :; do printf x >> ticks; sleep 0.1; done) & sleep 0.3; echo done; exit 3"
    started = time.monotonic()
    result = await run_command(workspace, command, timeout_s=10, mode=mode)
    assert time.monotonic() - started < 2
    assert (result.exit_code, result.output, result.timed_out) == (3, "done\n", False)
    await _assert_stopped_growing(workspace / "ticks")


async def test_cancelling_the_caller_kills_the_command(mode: str, workspace: Path) -> None:
    command = "(while :; do printf x >> ticks; sleep 0.1; done) & sleep 100"
    task = asyncio.create_task(run_command(workspace, command, timeout_s=30, mode=mode))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _assert_stopped_growing(workspace / "ticks")


async def test_failing_output_callback_raises_and_kills_the_command(mode: str, workspace: Path) -> None:
    async def broken(stream: str, text: str) -> None:
        raise RuntimeError("channel layer down")

    command = "(while :; do printf x >> ticks; sleep 0.1; done) & sleep 0.3; echo hi; sleep 100"
    with pytest.raises(RuntimeError, match="channel layer down"):
        await run_command(workspace, command, timeout_s=10, mode=mode, on_output=broken)
    await _assert_stopped_growing(workspace / "ticks")


# --- Output -------------------------------------------------------------------------------------------------------


async def test_long_output_keeps_head_and_tail(mode: str, workspace: Path) -> None:
    full = "".join(f"{n}\n" for n in range(1, 5001))
    result = await run_command(workspace, "seq 1 5000", timeout_s=5, mode=mode)
    elided = len(full) - 10_000
    assert result.output == f"{full[:5000]}\n[… {elided} characters elided …]\n{full[-5000:]}"
    short = await run_command(workspace, "seq 1 100", timeout_s=5, mode=mode)
    assert short.output == "".join(f"{n}\n" for n in range(1, 101))


async def test_endless_output_is_bounded_in_memory(workspace_root: Path, workspace: Path) -> None:
    result = await run_command(workspace, "yes", timeout_s=0.7, mode=_require("none"))
    assert result.timed_out is True
    assert result.output.startswith("y\ny\n")
    assert "characters elided" in result.output
    assert len(result.output) < 10_100


async def test_on_output_gets_chunks_as_they_arrive(mode: str, workspace: Path) -> None:
    calls: list[tuple[str, str, float]] = []

    async def collect(stream: str, text: str) -> None:
        calls.append((stream, text, time.monotonic()))

    command = "echo one; echo err >&2; sleep 0.4; echo two"
    result = await run_command(workspace, command, timeout_s=5, mode=mode, on_output=collect)
    finished = time.monotonic()
    assert result.output == "one\nerr\ntwo\n"
    assert "".join(text for _, text, _ in calls) == "one\nerr\ntwo\n"
    assert {stream for stream, _, _ in calls} == {"output"}
    assert len(calls) >= 2
    assert finished - calls[0][2] > 0.3  # "one" arrived while the command was still running


async def test_on_output_stops_forwarding_after_one_mib_and_says_so_once(workspace_root: Path, workspace: Path) -> None:
    forwarded: list[str] = []

    async def collect(stream: str, text: str) -> None:
        forwarded.append(text)

    command = "head -c 3000000 /dev/zero | tr '\\0' a"
    result = await run_command(workspace, command, timeout_s=10, on_output=collect, mode=_require("none"))
    text = "".join(forwarded)
    assert text.count("live output stopped after 1 MiB") == 1
    assert text.index("\n[… live output stopped") == FORWARD_MAX_CHARS
    assert set(text[:FORWARD_MAX_CHARS]) == {"a"}
    assert f"[… {3_000_000 - 10_000} characters elided …]" in result.output


async def test_utf8_split_across_reads_is_decoded_whole(mode: str, workspace: Path) -> None:
    command = "python3 -c 'import sys; sys.stdout.write(\"é\" * 4000)'"
    result = await run_command(workspace, command, timeout_s=5, mode=mode)
    assert result.output == "é" * 4000


async def test_command_with_a_nul_byte_is_refused(mode: str, workspace: Path) -> None:
    with pytest.raises(WorkspaceError, match="NUL"):
        await run_command(workspace, "echo a\x00b", timeout_s=5, mode=mode)


# --- Self-test ----------------------------------------------------------------------------------------------------


async def test_a_broken_bwrap_install_makes_commands_unavailable(
    workspace_root: Path, workspace: Path, monkeypatch, settings
) -> None:
    monkeypatch.setattr(sandbox_module, "BWRAP", "/nonexistent/bwrap")
    settings.SANDBOX_MODE = "bwrap"
    status = sandbox_status("bwrap")
    assert status.ok is False
    assert "/nonexistent/bwrap" in status.detail  # operator-facing detail names the failure
    for mode in ("bwrap", None):
        with pytest.raises(SandboxUnavailable) as info:
            await run_command(workspace, "touch ran", timeout_s=5, mode=mode)
        assert str(info.value) == "Running commands is unavailable: the bwrap sandbox failed its self-test."
    assert not (workspace / "ran").exists()  # and no other mode ran it instead


@pytest.mark.skipif(not AS_ROOT, reason="the sandbox has a uid of its own only when the server runs as root")
def test_a_workspace_root_the_sandbox_uid_cannot_reach_is_named_with_the_fix(bwrap: str, settings) -> None:
    """A fresh clone in a home directory only its owner may enter (``/root``, Debian 12's ``0700`` homes) puts
    ``var/workspaces`` below it: the self-test fails, and the operator is told which directory and what to do."""
    base = Path(tempfile.mkdtemp(prefix="cesaflow-home-test-", dir="/tmp"))
    try:
        base.chmod(0o711)
        private = base / "home"
        private.mkdir()
        private.chmod(0o700)
        settings.WORKSPACE_ROOT = private / "clone" / "var" / "workspaces"
        status = sandbox_status("bwrap", refresh=True)
        assert status.ok is False
        assert f"cannot traverse {private}, mode 700" in status.detail
        assert "CESAFLOW_WORKSPACE_ROOT" in status.detail
        private.chmod(0o711)  # traversable: the same root passes
        assert sandbox_status("bwrap", refresh=True).ok is True
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_self_test_result_is_cached_until_refreshed(workspace_root: Path, monkeypatch) -> None:
    first = sandbox_status("none")
    assert first.ok is True
    monkeypatch.setattr(sandbox_module, "_self_test", lambda mode: pytest.fail("the cached result was not used"))
    assert sandbox_status("none") is first
    monkeypatch.undo()
    assert sandbox_status("none", refresh=True).ok is True


async def test_unknown_mode_fails_its_self_test(workspace_root: Path, workspace: Path) -> None:
    status = sandbox_status("docker")
    assert (status.ok, status.mode) == (False, "docker")
    with pytest.raises(SandboxUnavailable, match="sandbox mode is not recognised"):
        await run_command(workspace, "true", timeout_s=5, mode="docker")


@pytest.mark.skipif(not AS_ROOT, reason="per-run uids are handed out only when the server runs as root")
async def test_a_fork_bomb_in_one_run_does_not_starve_another_runs_commands(
    bwrap: str, workspace_root: Path, settings
) -> None:
    # RLIMIT_NPROC counts every process of a uid: with one uid for all runs, one run's bomb would leave the others
    # unable to start anything ("Creating new namespace failed: Resource temporarily unavailable").
    settings.SANDBOX_UID = settings.SANDBOX_GID = 310_000
    first, second = workspace_create(uuid.UUID(int=1)), workspace_create(uuid.UUID(int=2))
    assert first.stat().st_uid != second.stat().st_uid
    limits = CommandLimits(processes=32)
    bomb = asyncio.create_task(run_command(first, ":(){ :|:& };:; sleep 30", timeout_s=3, mode=bwrap, limits=limits))
    await asyncio.sleep(1.0)  # the bomb has filled its uid's budget by now
    result = await run_command(second, "echo fine", timeout_s=5, mode=bwrap, limits=limits)
    assert (result.exit_code, result.output) == (0, "fine\n")
    assert (await bomb).timed_out


async def test_bwrap_refuses_nested_user_namespaces(bwrap: str, workspace: Path) -> None:
    # security.md: a command must not gain (namespaced) root by unsharing again inside the sandbox.
    result = await run_command(workspace, "unshare -U -r id -u; echo rc=$?", timeout_s=5, mode=bwrap)
    assert result.output.strip().endswith("rc=1")
    assert "\n0\n" not in f"\n{result.output}"


@pytest.mark.skipif(not AS_ROOT, reason="creating a directory under /usr needs root")
async def test_app_directories_under_usr_are_hidden_from_bwrap(bwrap: str, workspace: Path, settings) -> None:
    # Images often install the app under /usr (e.g. /usr/src/app), which bwrap binds read-only for the toolchain.
    app = Path(tempfile.mkdtemp(prefix="cesaflow-app-", dir="/usr/local/share"))
    try:
        (app / "keyring").write_text("app secret\n")
        app.chmod(0o755)
        (app / "keyring").chmod(0o644)
        settings.VAR_DIR = app
        result = await run_command(workspace, f"cat {app}/keyring; ls -A {app} | wc -l", timeout_s=5, mode=bwrap)
        assert "app secret" not in result.output
        assert result.output.strip().endswith("0")
        settings.VAR_DIR = app.parent / "elsewhere"  # the control: not hidden when it is not the app's
        control = await run_command(workspace, f"cat {app}/keyring", timeout_s=5, mode=bwrap)
        assert "app secret" in control.output
    finally:
        shutil.rmtree(app, ignore_errors=True)


async def test_a_command_filling_the_workspace_is_killed_while_it_runs(mode: str, workspace: Path) -> None:
    # Each file stays under RLIMIT_FSIZE; only the total is over: the cap is watched during the command.
    command = "i=0; while true; do head -c 300000 /dev/zero > f$i; i=$((i+1)); sleep 0.05; done"
    started = time.monotonic()
    result = await run_command(workspace, command, timeout_s=20, mode=mode, max_bytes=3_000_000)
    assert result.over_limit is True
    assert result.exit_code is None
    assert time.monotonic() - started < 6
    size = sum(p.stat().st_size for p in workspace.iterdir())
    assert size < 3_000_000 + 2 * 300_000 * 25  # stopped within about a second of crossing the cap
