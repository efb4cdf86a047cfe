"""Running the agent's shell commands in a sandbox (providers.md §2.4), one fresh ``bash -c`` per command.

Three modes, chosen by ``settings.SANDBOX_MODE`` and never swapped for one another at run time:

* ``bwrap`` (default): bubblewrap with every namespace unshared. The command sees read-only ``/usr`` (and the
  ``/bin``, ``/lib`` … links or binds that exist on the host), ``/etc/alternatives``, ``/etc/ld.so.cache``, a
  synthesized ``/etc/passwd`` and ``/etc/group`` naming only its own uid, a fresh ``/proc``, a minimal ``/dev``, a
  small private ``/tmp`` and the workspace at ``/workspace``. No network, no app directories, no other process.
* ``unshare`` (util-linux): user, network and PID namespaces, but the host filesystem stays visible (readable app
  files!). The user namespace maps only the current uid (``--map-current-user``, not ``--map-root-user``), so the
  command holds no capabilities even inside its namespaces.
* ``none``: **unsafe, development only.** ``bash -c`` runs directly in the workspace directory with the scrubbed
  environment, the rlimits and the uid drop, and nothing else: the command can read whatever its uid can read and
  use the network, and a child that calls ``setsid`` escapes the kill of the process group.

In every mode: the environment holds only ``_ENV`` (nothing from ``os.environ``: no keys, no database URL); limits
are set with ``prlimit``; a server running as root spawns the command as the workspace's owner, the run's own uid
and gid from the ``SANDBOX_UID`` range, with no supplementary groups (RLIMIT_NPROC counts per uid, hence one uid
per run: a fork bomb in one run cannot starve another's commands); each command gets its own process group,
and when it ends, times out or is stopped the whole group is SIGKILLed. In the namespaced modes the kill of the
bwrap/unshare process also ends its PID namespace, so background and ``nohup`` children die with it.

Each mode is self-tested (a trivial command through the exact same command line) before its first use and the
result cached; a failed self-test makes ``run_command`` raise ``SandboxUnavailable``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from runs.workspaces.files import usage
from runs.workspaces.paths import WorkspaceError, real_root
from runs.workspaces.storage import ensure_root, sandbox_owner, untraversable_ancestor, workspace_owner

logger = logging.getLogger("cesaflow.workspaces")

# The programs used, looked up on _ENV's PATH. Tests point one at a missing path to simulate a broken install.
BWRAP = "bwrap"
UNSHARE = "unshare"
PRLIMIT = "prlimit"
BASH = "bash"

MODES = ("bwrap", "unshare", "none")
SANDBOX_HOME = "/workspace"
OUTPUT_HEAD_CHARS = 5000
OUTPUT_TAIL_CHARS = 5000
# Live output to the browser stops here (the command goes on; the result still carries the head and the tail).
FORWARD_MAX_CHARS = 1024 * 1024
FORWARD_INTERVAL_S = 0.05
TMPFS_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 64 * 1024
# After the kill, how long to wait for the output pipe to close (a stray that escaped the group may hold it).
_DRAIN_S = 1.0
_SELF_TEST_TIMEOUT_S = 15.0
_SELF_TEST_MARKER = "cesaflow-sandbox-ok"
_SELF_TEST_COMMAND = f"printf '%s\\n' {_SELF_TEST_MARKER} > .selftest && cat .selftest"
_FORWARD_STOPPED_NOTE = "\n[… live output stopped after 1 MiB; the command is still running …]\n"

OnOutput = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CommandLimits:
    """rlimits for one command: CPU seconds, address space, largest file, processes (of the uid), open files."""

    cpu_s: int = 60
    address_space: int = 2 * 1024**3
    file_size: int = 100 * 1024**2
    processes: int = 256
    open_files: int = 1024


DEFAULT_LIMITS = CommandLimits()


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a command ended. ``exit_code`` is None when we killed it; a signal death reads as 128 + the signal."""

    exit_code: int | None
    output: str
    timed_out: bool
    cancelled: bool
    # Killed because the workspace grew past ``max_bytes`` / ``max_files`` while it ran (a disk is shared).
    over_limit: bool = False


@dataclass(frozen=True, slots=True)
class SandboxStatus:
    """A mode's self-test result; ``detail`` is for operators (it may name host paths), not for the model."""

    mode: str
    ok: bool
    detail: str


class SandboxUnavailable(Exception):
    """The configured mode failed its self-test, so no command runs; str() is safe for the model and the UI."""

    def __init__(self, mode: str) -> None:
        if mode in MODES:
            super().__init__(f"Running commands is unavailable: the {mode} sandbox failed its self-test.")
        else:
            super().__init__("Running commands is unavailable: the configured sandbox mode is not recognised.")


@dataclass(frozen=True, slots=True)
class _Plan:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Identity:
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _env(home: str) -> dict[str, str]:
    """The whole environment a command gets; nothing is inherited from the server's own."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "PAGER": "cat",
        "MANPAGER": "cat",
        "LESS": "-R",
        "PIP_PROGRESS_BAR": "off",
        "TQDM_DISABLE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _identity(workspace: Path) -> _Identity:
    """Who a command in ``workspace`` runs as: the workspace's owner (its run's own uid) when we are root."""
    owner = workspace_owner(workspace)
    if owner is None:
        return _Identity(None, None, None)
    uid, gid = owner
    if uid == 0 or gid == 0:  # settings forbid it; this guards against a future change of those checks
        raise RuntimeError("Refusing to run a sandboxed command as root.")
    return _Identity(uid, gid, [])


def _prlimit(limits: CommandLimits) -> list[str]:
    return [
        PRLIMIT,
        # soft:hard one second apart: SIGXCPU first ("CPU time limit exceeded", exit 152), SIGKILL if ignored.
        f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
        f"--as={limits.address_space}",
        f"--fsize={limits.file_size}",
        f"--nproc={limits.processes}",
        f"--nofile={limits.open_files}",
        "--",
    ]


def _system_mounts() -> list[str]:
    """Read-only system directories, mirroring the host: /bin, /lib … are symlinks into /usr on merged-/usr hosts
    (Debian 12 here) and real directories elsewhere; bind or link only what exists."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    # python3 and bash need nothing from /etc; these make `alternatives` links and libraries in ld.so.conf.d dirs
    # resolve. Both are lists of paths, nothing secret.
    for extra in ("/etc/alternatives", "/etc/ld.so.cache"):
        if os.path.exists(extra):
            args += ["--ro-bind", extra, extra]
    # An app installed under a bound directory (/usr/src/app in many images) would be visible through /usr: hide
    # its code, its var/ (keys, database) and the workspace root behind empty tmpfs mounts.
    for private in {os.path.realpath(p) for p in (settings.BASE_DIR, settings.VAR_DIR, settings.WORKSPACE_ROOT)}:
        if private.startswith("/usr/") and os.path.isdir(private):
            args += ["--tmpfs", private]
    return args


@contextlib.contextmanager
def _data_fds(blobs: list[bytes]) -> Iterator[list[int]]:
    """Read ends of pipes pre-filled with ``blobs`` (for bwrap's ``--ro-bind-data``), closed on exit."""
    fds: list[int] = []
    try:
        for blob in blobs:
            read_fd, write_fd = os.pipe()
            fds.append(read_fd)
            try:
                os.write(write_fd, blob)  # a few dozen bytes: far below the pipe buffer, so this cannot block
            finally:
                os.close(write_fd)
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def _plan(mode: str, workspace: Path, command: str, limits: CommandLimits) -> Iterator[_Plan]:
    """The exact command line for ``mode``: the self-test and real commands both come from here."""
    cwd = os.fspath(workspace)
    if mode == "bwrap":
        env = _env(SANDBOX_HOME)
        ident = _identity(workspace)
        uid = ident.user if ident.user is not None else os.geteuid()
        gid = ident.group if ident.group is not None else os.getegid()
        # Tools such as whoami, git and getpass want a passwd entry for the current uid; give them one that names
        # nothing else from the host.
        passwd = f"sandbox:x:{uid}:{gid}:sandbox:{SANDBOX_HOME}:/bin/bash\n".encode()
        group = f"sandbox:x:{gid}:\n".encode()
        with _data_fds([passwd, group]) as (passwd_fd, group_fd):
            # --disable-userns: no user namespace inside the sandbox, so no nested unshare to gain capabilities.
            argv = [
                *_prlimit(limits),
                BWRAP,
                "--unshare-all",
                "--unshare-user",
                "--disable-userns",
                "--die-with-parent",
                "--new-session",
                "--clearenv",
            ]
            for key, value in env.items():
                argv += ["--setenv", key, value]
            argv += _system_mounts()
            argv += ["--perms", "0644", "--ro-bind-data", str(passwd_fd), "/etc/passwd"]
            argv += ["--perms", "0644", "--ro-bind-data", str(group_fd), "/etc/group"]
            argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp"]  # noqa: S108 - the sandbox's own private tmpfs
            argv += ["--bind", cwd, SANDBOX_HOME, "--chdir", SANDBOX_HOME, BASH, "-c", command]
            yield _Plan(argv=argv, env=env, cwd=cwd, pass_fds=(passwd_fd, group_fd))
        return
    if mode == "unshare":
        prefix = [UNSHARE, "--user", "--map-current-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    elif mode == "none":
        prefix = []
    else:
        raise ValueError("Unknown sandbox mode.")
    yield _Plan(argv=[*_prlimit(limits), *prefix, BASH, "-c", command], env=_env(cwd), cwd=cwd, pass_fds=())


def _kill_group(pgid: int) -> None:
    """SIGKILL the command's process group (start_new_session made its first process the leader)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# --- Self-test -----------------------------------------------------------------------------------------------

_status_cache: dict[tuple[object, ...], tuple[SandboxStatus, float]] = {}  # status, when it was tested
_FAILED_STATUS_TTL_S = 60.0
# How often a running command's workspace is measured against its caps.
_USAGE_CHECK_S = 1.0
_status_lock = threading.Lock()


def _self_test(mode: str) -> SandboxStatus:
    if mode not in MODES:
        return SandboxStatus(mode=mode, ok=False, detail=f"unknown sandbox mode {mode!r}")
    try:
        # A real workspace under the real root: it also proves the sandbox uid can traverse the root.
        probe = Path(tempfile.mkdtemp(prefix=".selftest-", dir=ensure_root()))
    except OSError as exc:
        return SandboxStatus(mode=mode, ok=False, detail=f"cannot create a probe workspace: {exc}")
    try:
        owner = sandbox_owner()
        if owner is not None:
            os.chown(probe, *owner)
        ident = _identity(probe)
        with _plan(mode, probe, _SELF_TEST_COMMAND, DEFAULT_LIMITS) as plan:
            proc = subprocess.Popen(  # noqa: S603 - a fixed argv built by _plan, no shell on our side
                plan.argv,
                env=plan.env,
                cwd=plan.cwd,
                pass_fds=plan.pass_fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=ident.user,
                group=ident.group,
                extra_groups=ident.extra_groups,
            )
        try:
            raw, _ = proc.communicate(timeout=_SELF_TEST_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return SandboxStatus(mode=mode, ok=False, detail=f"{mode}: the self-test timed out")
        finally:
            _kill_group(proc.pid)
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxStatus(mode=mode, ok=False, detail=f"{mode}: cannot start: {exc}")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    output = raw.decode("utf-8", "replace").strip()
    if proc.returncode == 0 and output == _SELF_TEST_MARKER:
        return SandboxStatus(mode=mode, ok=True, detail=f"{mode}: self-test passed")
    detail = f"{mode}: exit {proc.returncode}: {output[-500:]}"
    # The likeliest cause when the server runs as root in a private home directory: say what to do.
    if owner is not None and (blocked := untraversable_ancestor(probe.parent)) is not None:
        mode_bits = stat.S_IMODE(blocked.stat().st_mode)
        detail += (
            f" (the sandbox's uid {owner[0]} cannot traverse {blocked}, mode {mode_bits:o}:"
            f" set CESAFLOW_WORKSPACE_ROOT to a directory below paths others may traverse, such as"
            f" /var/lib/cesaflow/workspaces, or allow traversal with chmod o+x {blocked})"
        )
    return SandboxStatus(mode=mode, ok=False, detail=detail)


def sandbox_status(mode: str | None = None, *, refresh: bool = False) -> SandboxStatus:
    """The self-test result for ``mode`` (default ``settings.SANDBOX_MODE``), cached per mode and setup.

    The cache key includes the programs, the workspace root and the sandbox uid, so changing any of them tests
    again. Blocking (it may spawn a process): call it from a thread in async code.
    """
    chosen = mode or str(settings.SANDBOX_MODE)
    key = (chosen, BWRAP, UNSHARE, PRLIMIT, BASH, str(settings.WORKSPACE_ROOT), sandbox_owner())
    with _status_lock:
        cached = None if refresh else _status_cache.get(key)
        status = cached[0] if cached is not None else None
        # A failure is tested again after a minute (a transient one must not turn commands off until a restart).
        if cached is not None and not cached[0].ok and time.monotonic() - cached[1] > _FAILED_STATUS_TTL_S:
            status = None
        if status is None:
            status = _self_test(chosen)
            _status_cache[key] = (status, time.monotonic())
            if status.ok:
                logger.info("sandbox self-test passed: mode=%s", chosen)
            else:
                # The detail is the sandbox tool's own error for a fixed command: no user data in it.
                logger.warning("sandbox self-test failed: mode=%s detail=%s", chosen, status.detail)
    return status


# --- Running a command ---------------------------------------------------------------------------------------


class _Capture:
    """Output kept in bounded memory (head + rolling tail) and forwarded live, coalesced and capped."""

    def __init__(self, on_output: OnOutput | None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._head = ""
        self._tail = ""
        self._total = 0
        self._on_output = on_output
        self._pending = ""
        self._forwarded = 0
        self._forward_capped = False
        self._last_forward = 0.0

    def text(self) -> str:
        if self._total <= OUTPUT_HEAD_CHARS + OUTPUT_TAIL_CHARS:
            return self._head + self._tail
        elided = self._total - OUTPUT_HEAD_CHARS - OUTPUT_TAIL_CHARS
        return f"{self._head}\n[… {elided} characters elided …]\n{self._tail}"

    def flush_delay(self) -> float | None:
        """Seconds until buffered live output is due, None when nothing is buffered."""
        if not self._pending:
            return None
        loop = asyncio.get_running_loop()
        return max(0.0, self._last_forward + FORWARD_INTERVAL_S - loop.time())

    async def feed(self, data: bytes, *, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        if text:
            self._total += len(text)
            room = OUTPUT_HEAD_CHARS - len(self._head)
            rest = text
            if room > 0:
                self._head += text[:room]
                rest = text[room:]
            if rest:
                self._tail = (self._tail + rest)[-OUTPUT_TAIL_CHARS:]
            self._queue(text)
        if final or self.flush_delay() == 0.0:
            await self.flush()

    def _queue(self, text: str) -> None:
        if self._on_output is None or self._forward_capped:
            return
        room = FORWARD_MAX_CHARS - self._forwarded - len(self._pending)
        if len(text) > room:
            self._pending += text[: max(room, 0)] + _FORWARD_STOPPED_NOTE
            self._forward_capped = True
        else:
            self._pending += text

    async def flush(self) -> None:
        if self._on_output is None or not self._pending:
            return
        chunk, self._pending = self._pending, ""
        self._forwarded += len(chunk)
        self._last_forward = asyncio.get_running_loop().time()
        await self._on_output("output", chunk)


async def _pump(reader: asyncio.StreamReader, capture: _Capture) -> None:
    """Read the merged stdout/stderr pipe to EOF."""
    while True:
        delay = capture.flush_delay()
        try:
            data = await asyncio.wait_for(reader.read(_READ_CHUNK), timeout=delay)
        except TimeoutError:
            await capture.flush()
            continue
        if not data:
            break
        await capture.feed(data)
    await capture.feed(b"", final=True)


async def _spawn(plan: _Plan, write_fd: int) -> asyncio.subprocess.Process:
    ident = _identity(Path(plan.cwd))
    return await asyncio.create_subprocess_exec(
        *plan.argv,
        stdin=subprocess.DEVNULL,
        stdout=write_fd,
        stderr=write_fd,
        cwd=plan.cwd,
        env=plan.env,
        pass_fds=plan.pass_fds,
        start_new_session=True,
        user=ident.user,
        group=ident.group,
        extra_groups=ident.extra_groups,
    )


async def run_command(
    root: Path,
    command: str,
    *,
    timeout_s: float,
    on_output: OnOutput | None = None,
    stop: asyncio.Event | None = None,
    mode: str | None = None,
    limits: CommandLimits = DEFAULT_LIMITS,
    max_bytes: int | None = None,
    max_files: int | None = None,
) -> CommandResult:
    """Run ``bash -c command`` in the workspace ``root`` under the sandbox and return how it ended.

    Output (stdout and stderr merged, stream name ``"output"``) goes to ``on_output`` as it arrives, and comes back
    in the result cut to its first and last 5,000 characters. On timeout, or as soon as ``stop`` is set, the whole
    process tree is killed, and so it is when the workspace grows past ``max_bytes`` or ``max_files`` (checked every
    ``_USAGE_CHECK_S`` while it runs: RLIMIT_FSIZE bounds one file, not how many). Raises ``SandboxUnavailable`` if
    the mode failed its self-test (there is no fallback to another mode) and ``WorkspaceError`` for a command that
    cannot be passed to a program (a NUL byte).
    """
    chosen = mode or str(settings.SANDBOX_MODE)
    status = await asyncio.to_thread(sandbox_status, chosen)
    if not status.ok:
        raise SandboxUnavailable(chosen)
    if "\x00" in command:
        raise WorkspaceError("The command contains a NUL byte.")
    loop = asyncio.get_running_loop()
    capture = _Capture(on_output)
    reader = asyncio.StreamReader(limit=4 * _READ_CHUNK)
    # Our own pipe rather than stdout=PIPE: we own its transport and can close it even if a stray still holds
    # the write end after the kill.
    read_fd, write_fd = os.pipe()
    try:
        with _plan(chosen, real_root(root), command, limits) as plan:
            proc = await _spawn(plan, write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    try:
        transport, _protocol = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
    except BaseException:
        _kill_group(proc.pid)
        raise
    pump = asyncio.create_task(_pump(reader, capture))
    waiter = asyncio.create_task(proc.wait())
    stopper = asyncio.create_task(stop.wait()) if stop is not None else None
    timed_out = cancelled = over_limit = False
    watch_usage = max_bytes is not None or max_files is not None
    try:
        pending: set[asyncio.Future[Any]] = {waiter, pump}
        if stopper is not None:
            pending.add(stopper)
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                timed_out = True
                break
            wait_s = min(remaining, _USAGE_CHECK_S) if watch_usage else remaining
            done, _ = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                break
            if not done and watch_usage:
                total, count = await asyncio.to_thread(usage, root)
                if (max_bytes is not None and total > max_bytes) or (max_files is not None and count > max_files):
                    over_limit = True
                    break
            if stopper is not None and stopper in done:
                cancelled = True
                break
            if pump in done:
                pump.result()  # a failing on_output: raise it (the finally below still kills the tree)
                pending.discard(pump)  # EOF before exit: the command closed its output and goes on
        # Also after a normal exit: nothing the command started may outlive it.
        _kill_group(proc.pid)
        returncode = await waiter
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump), timeout=_DRAIN_S)
        if pump.done():
            pump.result()
    finally:
        _kill_group(proc.pid)
        for task in (pump, waiter, stopper):
            if task is not None and not task.done():
                task.cancel()
        transport.close()
    exit_code: int | None = None
    if not (timed_out or cancelled or over_limit):
        exit_code = 128 - returncode if returncode < 0 else returncode  # a signal death reads as the shell shows it
    logger.info("command finished: mode=%s exit=%s timed_out=%s cancelled=%s", chosen, exit_code, timed_out, cancelled)
    return CommandResult(
        exit_code=exit_code, output=capture.text(), timed_out=timed_out, cancelled=cancelled, over_limit=over_limit
    )
