"""The hostile-co-tenant harness: a pod in miniature whose /dev/shm, IPC namespace and volume are shared
by root and other users, as a pod's containers share them when they run as different users.

Use it through the fixtures of tests/hostile/conftest.py (every test there needs root; the module
skips otherwise):

    def test_a_fifo_never_hangs_the_consumer(pod: Pod, tenants: Tenants) -> None:
        token = parse_address("shm:///data").token
        pod.run(["mkfifo", f"/dev/shm/podipc.presence.{token}.consumer"], user=tenants.mallory)
        result = pod.podipc("consume", "shm:///data?wait=2", user=tenants.alice, timeout=4)
        assert_one_line_error(result, exit_code=3)

`pod` (one per test) runs commands inside the pod, as root (`user=None`) or as a tenant:
    pod.run(argv, user=..., timeout=..., input=...)       -> CompletedProcess[str], never left running
    pod.popen(argv, user=...)                             -> Popen[str] (stdout/stderr pipes), killed at teardown
    pod.spawn(argv, user=...)                             -> (Popen[str], pid of argv's process); pod.kill(pid)
    pod.podipc(*args, user=...)                           -> `python -m podipc ARGS` with this checkout
    pod.python(code, *args, user=...)                     -> `python -c CODE ARGS` (podipc importable)
    pod.host_path("/dev/shm/x")                           -> the same file seen from the test process
    pod.volume                                            -> /tmp/volume (1777) in the pod: an emptyDir
`tenants` (created once per machine, reused by later runs, never removed: parallel runs share them):
    tenants.alice, tenants.bob: users whose primary group is tenants.group ("podipc-pod"), as with a pod's
        runAsGroup: they may share a channel deliberately with mode=0660.
    tenants.mallory: a user outside that group, the hostile co-tenant.
    Each is a User(name, uid, gid).
`assert_one_line_error(result, exit_code)`: the contract of every error path: the documented exit
code, one line on stderr, no traceback.

How the pod is made: a holder process `unshare --ipc --mount --net --propagation private` mounts a
fresh tmpfs at /dev/shm (mode 1777), a fresh mqueue at /dev/mqueue and a fresh tmpfs at /tmp (the
pod's own, holding the volume), brings lo up, and sleeps. Commands join it with `nsenter --target HOLDER --ipc --mount --net` and
drop to a tenant with `runuser -u NAME --`, in directory / with a small fixed environment.
The interpreter running the tests may live where other users cannot go (a pyenv under /root): in
the pod's own mount namespace, every directory on the way to it, its prefixes and this checkout
that "other" may not enter is covered by a 0755 tmpfs holding bind mounts of just the children on
the way, so tenants can run this Python and this checkout. Nothing changes on the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import select
import shutil
import site
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import podipc

SHARED_GROUP = "podipc-pod"
ALICE, BOB, MALLORY = "podipc-alice", "podipc-bob", "podipc-mallory"
USERS_LOCK = "/run/podipc-test-users.lock"
"""Serialises useradd between test runs started at the same time on one machine."""
TOOLS = ("unshare", "nsenter", "runuser", "useradd", "groupadd", "mount")
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
VOLUME = "/tmp/volume"
HOLDER_SCRIPT = f"""
set -e
mount -t tmpfs -o size=128m,mode=1777 podipc-shm /dev/shm
mkdir -p /dev/mqueue && mount -t mqueue podipc-mqueue /dev/mqueue
mkdir /dev/shm/.host-tmp && mount --bind /tmp /dev/shm/.host-tmp
mount -t tmpfs -o size=64m,mode=1777 podipc-tmp /tmp
{{keep_reachable}}
umount -l /dev/shm/.host-tmp && rmdir /dev/shm/.host-tmp
mkdir -m 1777 {VOLUME}
ip link set lo up 2>/dev/null || true
echo ready
exec sleep infinity
"""
START_SECONDS = 20


def missing_requirement() -> str | None:
    """Why this machine cannot run the harness (None: it can): root and util-linux/passwd tools are needed."""
    if os.geteuid() != 0:
        return "the hostile-co-tenant tests need root (useradd, unshare, nsenter, runuser)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the hostile-co-tenant tests need {', '.join(missing)} (apt-get install util-linux passwd mount)"
    return None


@dataclass(frozen=True)
class User:
    """A user of the machine that tests run commands as."""

    name: str
    uid: int
    gid: int
    """Primary group: objects it creates get this group."""


@dataclass(frozen=True)
class Tenants:
    """The users of the co-tenant tests: alice and bob share `group` (mode=0660 works between them); mallory does not."""

    alice: User
    bob: User
    mallory: User
    group: int


def ensure_tenants() -> Tenants:
    """Create the tenants' group and users if missing (idempotent, safe when runs race), and return them."""
    with open(USERS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        group = _ensure_group(SHARED_GROUP)
        alice = _ensure_user(ALICE, ["--gid", SHARED_GROUP])
        bob = _ensure_user(BOB, ["--gid", SHARED_GROUP])
        mallory = _ensure_user(MALLORY, ["--user-group"])
    if mallory.gid == group or alice.gid != group or bob.gid != group or MALLORY in grp.getgrgid(group).gr_mem:
        raise RuntimeError(f"{MALLORY} must be outside {SHARED_GROUP}, {ALICE} and {BOB} inside it")
    return Tenants(alice, bob, mallory, group)


def _ensure_group(name: str) -> int:
    with contextlib.suppress(KeyError):
        return grp.getgrnam(name).gr_gid
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    return grp.getgrnam(name).gr_gid


def _ensure_user(name: str, group_options: list[str]) -> User:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
        command += ["--shell", "/usr/sbin/nologin", *group_options, name]
        subprocess.run(command, check=True, capture_output=True)
        entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid)


class Pod:
    """A pod in miniature (private IPC, mount and net namespaces, fresh /dev/shm, /dev/mqueue and a volume)."""

    def __init__(self) -> None:
        self.volume = VOLUME
        """A directory of the pod's own /tmp (mode 1777), like an emptyDir every container mounts."""
        self._started: list[subprocess.Popen[str]] = []
        namespaces = ["unshare", "--ipc", "--mount", "--net", "--propagation", "private", "--"]
        self.holder = subprocess.Popen(
            [*namespaces, "sh", "-c", HOLDER_SCRIPT.format(keep_reachable=_rebind_under_tmp())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            self._wait_until_ready()
            self._let_tenants_reach_python()
        except BaseException:
            self.close()
            raise

    def _wait_until_ready(self) -> None:
        assert self.holder.stdout is not None
        ready, _, _ = select.select([self.holder.stdout], [], [], START_SECONDS)
        line = self.holder.stdout.readline() if ready else ""
        if line.strip() != "ready":
            stderr = self.holder.stderr.read() if self.holder.poll() is not None and self.holder.stderr else ""
            raise RuntimeError(f"the pod's holder did not start: {line!r} {stderr}")

    def command(self, argv: Sequence[str], user: User | None = None) -> list[str]:
        """The argv that runs `argv` inside the pod, as `user` (None: root)."""
        enter = ["nsenter", f"--target={self.holder.pid}", "--ipc", "--mount", "--net", "--"]
        become = ["runuser", "-u", user.name, "--"] if user is not None else []
        return [*enter, *become, *argv]

    def popen(self, argv: Sequence[str], user: User | None = None, stdin: int | None = None) -> subprocess.Popen[str]:
        """Start `argv` inside the pod; stdout and stderr are pipes. Killed at the end of the test if still running."""
        process = subprocess.Popen(
            self.command(argv, user),
            cwd="/",
            env=ENVIRONMENT,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._started.append(process)
        return process

    def spawn(self, argv: Sequence[str], user: User | None = None) -> tuple[subprocess.Popen[str], int]:
        """Start `argv` inside the pod like popen(); also return its pid (to signal it, e.g. kill -9)."""
        process = self.popen(["sh", "-c", 'echo "$$" && exec "$@"', "sh", *argv], user)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_SECONDS)
        line = process.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"{argv[0]} did not start in the pod: {line!r}")
        return process, int(line)

    def kill(self, pid: int) -> None:
        """SIGKILL a process started with spawn()."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)

    def run(
        self, argv: Sequence[str], user: User | None = None, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the pod to its end; on timeout it is killed and subprocess.TimeoutExpired raised."""
        process = self.popen(argv, user, stdin=subprocess.PIPE if input is not None else None)
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def podipc(self, *args: str, user: User | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run this checkout's `podipc ARGS` inside the pod."""
        return self.run([sys.executable, "-m", "podipc", *args], user, timeout)

    def python(
        self, code: str, *args: str, user: User | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -c CODE ARGS` inside the pod (podipc importable)."""
        return self.run([sys.executable, "-c", code, *args], user, timeout)

    def host_path(self, path: str) -> str:
        """The path by which the test process sees `path` of the pod's mount namespace."""
        return f"/proc/{self.holder.pid}/root{path}"

    def close(self) -> None:
        """Kill whatever still runs in the pod, then the holder; the pod's tmpfs mounts vanish with it."""
        for process in self._started:
            if process.poll() is None:
                _kill_group(process)
            with contextlib.suppress(Exception):
                process.communicate(timeout=10)
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)
        for stream in (self.holder.stdout, self.holder.stderr):
            if stream is not None:
                stream.close()

    def _let_tenants_reach_python(self) -> None:
        """Cover each directory others may not enter on the way to the interpreter and the checkout (see the module)."""
        for _ in range(20):
            blocked = self._first_blocked_directory()
            if blocked is None:
                return
            directory, children = blocked
            self._cover(directory, children)
        raise RuntimeError("could not make the interpreter reachable for the tenants")

    def _first_blocked_directory(self) -> tuple[str, set[str]] | None:
        """The first directory on the way to a needed path that "other" may not enter, and the children needed in it."""
        blocked: str | None = None
        children: set[str] = set()
        for needed in _needed_paths():
            parts = needed.strip("/").split("/")
            for depth in range(len(parts)):
                directory = "/" + "/".join(parts[:depth])
                status = os.stat(self.host_path(directory))
                if stat.S_ISDIR(status.st_mode) and not status.st_mode & stat.S_IXOTH:
                    if blocked in (None, directory):
                        blocked = directory
                        children.add(parts[depth])
                    break
        return (blocked, children) if blocked is not None else None

    def _cover(self, directory: str, children: set[str]) -> None:
        stash = f"{self.volume}/.podipc-harness-stash"
        script = ["set -e", f"mkdir {stash}", f"mount --bind '{directory}' {stash}"]
        script.append(f"mount -t tmpfs -o mode=0755,size=1m podipc-cover '{directory}'")
        for child in sorted(children):
            kind = "-d" if os.path.isdir(self.host_path(f"{directory}/{child}")) else "-f"
            make = f"mkdir '{directory}/{child}'" if kind == "-d" else f"touch '{directory}/{child}'"
            script += [make, f"mount --bind '{stash}/{child}' '{directory}/{child}'"]
        script += [f"umount -l {stash}", f"rmdir {stash}"]
        result = self.run(["sh", "-c", "\n".join(script)], timeout=20)
        if result.returncode != 0:
            raise RuntimeError(f"covering {directory} failed: {result.stderr.strip()}")


def _needed_paths() -> list[str]:
    """What tenants must reach to run this interpreter with this checkout's podipc."""
    paths = {
        os.path.realpath(sys.executable),
        sys.executable,
        os.path.realpath(sys.prefix),
        os.path.realpath(sys.base_prefix),
        os.path.dirname(os.path.dirname(os.path.realpath(podipc.__file__))),
        *(os.path.realpath(path) for path in site.getsitepackages()),
    }
    return sorted(path for path in paths if os.path.exists(path))


def _rebind_under_tmp() -> str:
    """Shell lines that make needed paths under /tmp (a checkout cloned there) visible again over the pod's own /tmp.

    The pod's fresh /tmp hides the host's; the holder binds the host's /tmp at /dev/shm/.host-tmp
    first, rebinds what is needed from there, then removes that stash.
    """
    directories = sorted({path if os.path.isdir(path) else os.path.dirname(path) for path in _needed_paths()})
    under_tmp = [path for path in directories if path == "/tmp" or path.startswith("/tmp/")]
    outermost = [path for path in under_tmp if not any(path.startswith(other + "/") for other in under_tmp)]
    return "\n".join(f"mkdir -p '{path}' && mount --bind '/dev/shm/.host-tmp{path[4:]}' '{path}'" for path in outermost)


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)


def assert_one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The error contract: exit code `exit_code`, exactly one line on stderr, no traceback. Returns that line."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


@contextlib.contextmanager
def pod_in_miniature() -> Iterator[Pod]:
    """A Pod for the duration of a with-block."""
    pod = Pod()
    try:
        yield pod
    finally:
        pod.close()
