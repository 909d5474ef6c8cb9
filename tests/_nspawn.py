"""A real systemd 252 booted in a systemd-nspawn container, for tests/test_systemd_boot.py.

The container is the host's ``/usr`` bind-mounted read-only plus a copy of ``/etc`` with a fresh machine-id, booted
with ``systemd-nspawn --boot --register=no --keep-unit --private-network``. What makes it work on a host whose PID 1
is not systemd and whose cgroups are a hybrid layout (found by trying):

- ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``: the container gets a cgroup2 tree of its own;
- nspawn runs in a private mount namespace (``unshare -m``) with a tmpfs on ``/run`` (it writes there, and ``/run``
  is on disk here) and the ``/usr`` bind mount: both vanish with the namespace, whatever happens to the test;
- it starts from a new cgroup of its own (in the cgroup2 and the ``name=systemd`` hierarchies), which ``close()``
  empties (``cgroup.kill``) and removes;
- commands run inside through ``nsenter -t <container PID 1> -a`` (no machined: ``--register=no``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

SYSTEMD = Path("/usr/lib/systemd/systemd")
HOST_PYTHON = Path("/usr/bin/python3")  # the container's python is the host's: /usr is shared
# A clean environment for commands inside: nothing of the test's (venv, pyenv, NOTIFY_SOCKET ...) leaks in.
_INSIDE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG=C.UTF-8", "SYSTEMD_PAGER=",
               "SYSTEMD_COLORS=0", "TERM=dumb")
# The inner half of the launcher, run by ``unshare -m``: $1 = container root, the rest = nspawn's arguments.
_LAUNCH = """set -e
root=$1; shift
mount -t tmpfs -o mode=0755 tmpfs /run
mount --bind /usr "$root/usr"
mount -o remount,bind,ro "$root/usr"
exec "$@"
"""


class BootError(RuntimeError):
    """The container did not boot; the message carries nspawn's output."""


def unavailable() -> str | None:
    """Why a container cannot be booted here (a skip reason), or None when it can be tried."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root: systemd-nspawn boots a container (run as root, e.g. in CI)"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (apt-get install systemd-container; .ci/run does it when root)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux)"
    if not SYSTEMD.is_file():
        return f"no {SYSTEMD} on this host: the container boots the host's systemd from its /usr"
    if not HOST_PYTHON.is_file():
        return f"no {HOST_PYTHON}: deploy/install.sh builds the service's venv from the system python"
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy mounted (nspawn is given a cgroup2 tree with SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1)"
    return None


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of this mount namespace."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, super_opts = right.split(" ", 2)
        found.append((left.split(" ")[4], fstype, super_opts))
    return found


def _cgroup2_mount() -> Path | None:
    return next((Path(m) for m, fstype, _ in _mounts() if fstype == "cgroup2"), None)


def _own_cgroups() -> list[Path]:
    """Where this process sits in the cgroup2 hierarchy and (hybrid layout) in the name=systemd one."""
    paths: list[Path] = []
    own = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
    v2 = _cgroup2_mount()
    if v2 is not None and "" in own:
        paths.append(v2 / own[""].lstrip("/"))
    for mount, fstype, opts in _mounts():
        if fstype == "cgroup" and "name=systemd" in opts.split(",") and "name=systemd" in own:
            paths.append(Path(mount) / own["name=systemd"].lstrip("/"))
    return paths


def make_root(root: Path) -> None:
    """An empty container root: ``/usr`` is bind-mounted at boot; ``/etc`` is a copy with a fresh machine-id."""
    for sub in ("usr", "var", "srv", "opt", "root", "tmp", "home", "proc", "sys", "dev", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        if Path("/", link).is_symlink():  # a merged-/usr host, as Debian 12 is
            (root / link).symlink_to(target)
    etc = root / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    (etc / "machine-id").unlink(missing_ok=True)
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    # The host's own services (databases ...) would only slow the boot; and nothing of an earlier install here.
    wants = etc / "systemd/system/multi-user.target.wants"
    if wants.is_dir():
        shutil.rmtree(wants)
    for leftover in ("retrain-uploader", "systemd/system/retrain-uploader.service",
                     "systemd/system/retrain-uploader.service.d"):
        path = etc / leftover
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for table in ("passwd", "group", "shadow", "gshadow"):
        path = etc / table
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if not line.startswith("retrain-uploader:")]
            path.write_text("".join(kept))


class Container:
    """A booted container. ``run()`` executes a command inside; ``close()`` tears everything down."""

    def __init__(self, root: Path, log: Path, *, binds_ro: Mapping[Path, str] | None = None) -> None:
        self.root = root
        self.log = log
        self.binds_ro = dict(binds_ro or {})
        name = f"retrain-nspawn-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.cgroups = [parent / name for parent in _own_cgroups()]
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    # -- life --------------------------------------------------------------------------------------------------------

    def boot(self, timeout: float = 30.0) -> None:
        """Start nspawn and wait until the container's systemd has finished booting; BootError if it does not."""
        for cgroup in self.cgroups:
            cgroup.mkdir()
        nspawn = [
            "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", "--private-network",
            "--console=passive", f"--directory={self.root}", f"--machine={self.root.name}",
            *(f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()),
        ]
        # The launcher moves itself into the new cgroups, then execs unshare, sh and nspawn in the same process.
        join = "".join(f'echo $$ > "{c}/cgroup.procs"; ' for c in self.cgroups)
        launcher = ["sh", "-c", f'{join}exec unshare -m --propagation private sh -c "$0" launch "$@"',
                    _LAUNCH, str(self.root), *nspawn]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            self.leader = self._find_leader()
            self._check_alive(deadline)
            time.sleep(0.05)
        while True:  # systemctl fails until PID 1's private bus is up
            state = self.run("systemctl", "is-system-running", "--wait", timeout=max(deadline - time.monotonic(), 1))
            if state.stdout.strip() in ("running", "degraded"):
                return
            self._check_alive(deadline)
            time.sleep(0.1)

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BootError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console()}")
        if time.monotonic() > deadline:
            raise BootError(f"the container did not finish booting in time:\n{self.console()}")

    def _find_leader(self) -> int | None:
        """The container's PID 1 as the host sees it: the child of nspawn that runs systemd."""
        assert self.proc is not None
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return None

    def console(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])

    def close(self) -> list[str]:
        """Power the container off (SIGTERM to nspawn), kill whatever is left, remove the cgroups and the root.

        Returns what could not be cleaned up (empty when everything went)."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                problems.append("nspawn did not exit on SIGTERM; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for cgroup in self.cgroups:
            kill = cgroup / "cgroup.kill"
            if cgroup.exists() and kill.exists() and _populated(cgroup):
                problems.append(f"processes left in {cgroup}; killed")
                kill.write_text("1")
            if not _remove_cgroup(cgroup, timeout=10):
                problems.append(f"cgroup {cgroup} could not be removed")
        if any(Path(m).is_relative_to(self.root) for m, _, _ in _mounts()):
            problems.append(f"mounts left under {self.root}; root kept")  # never rm -rf through a bind mount
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems

    # -- inside ------------------------------------------------------------------------------------------------------

    def run(self, *cmd: str, input: str | None = None, timeout: float = 30.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container as root, in its namespaces and root, with a clean environment."""
        assert self.leader is not None, "not booted"
        done = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "env", "-i", *_INSIDE_ENV, *cmd],
            input=input, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def path(self, inside: str) -> Path:
        """A path inside the container as the host sees it (the root is a plain folder; only /usr is a mount)."""
        return self.root / inside.lstrip("/")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _remove_cgroup(cgroup: Path, timeout: float) -> bool:
    """rmdir the tree, deepest first, until it is gone (a cgroup is busy until its last process has been reaped)."""
    deadline = time.monotonic() + timeout
    while cgroup.exists():
        try:
            for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                sub.rmdir()
            cgroup.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    return True


def _populated(cgroup: Path) -> bool:
    events = cgroup / "cgroup.events"
    if events.exists():
        return bool(re.search(r"^populated 1$", events.read_text(), re.M))
    return bool((cgroup / "cgroup.procs").read_text().strip()) if (cgroup / "cgroup.procs").exists() else False


def copy_source(source: Path, dest: Path) -> None:
    """The project without its local state (.git, .venv, build output, caches), as deploy/install.sh stages it."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))


def build_wheelhouse(source: Path, wheelhouse: Path, work: Path, timeout: float = 300.0) -> None:
    """The project and its dependencies as wheels for the container's python (no registry in there), plus the build
    backend that deploy/install.sh's ``pip install`` of the source needs. Built with that same python, from a
    ``copy_source`` copy (pip builds inside the folder it is given)."""
    venv = work / "wheel-venv"
    subprocess.run([str(HOST_PYTHON), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=timeout)
    pip: Sequence[str] = [str(venv / "bin/python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--wheel-dir", str(wheelhouse), str(source), "setuptools>=68"],
                   check=True, capture_output=True, text=True, timeout=timeout)
