"""Boot real systemd (PID 1) in a throwaway systemd-nspawn container, run commands in it.

The technique of ../shared/recipes/systemd-container-check.sh (hostoverlay mode):
- everything happens in a private mount namespace with a tmpfs on /run, so nothing is
  mounted or written under the host's /run;
- the container's root is an overlay: the host root read-only below, a tmpfs above, so
  every write inside (the installer, /etc/onebox, /var/lib/onebox) vanishes at halt;
- systemd-nspawn --register=no --keep-unit --private-network -b, in a cgroup of its own
  (/sys/fs/cgroup/{systemd,unified}/onebox-ci-ID) so it leaves nothing in the host's;
- commands run inside with nsenter into the container's namespaces;
- SIGTERM to nspawn halts the container; `halt()` then reports any process, cgroup or
  mount left behind.
Host directories the tests need inside (the checkout, the wheelhouse) are bound
read-only with --bind-ro, because the container's /tmp is a fresh tmpfs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

# Host units that would start in a booted copy of the host root and are of no use there.
MASK = [
    "postgresql.service", "getty@tty1.service", "console-getty.service", "e2scrub_reap.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "fstrim.timer", "systemd-timesyncd.service",
]

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs in the private mount namespace; argv: ovl merged pidfile nspawn-args...
BOOT_SCRIPT = r"""
set -e
ovl=$1; merged=$2; pidfile=$3; masks=$4; shift 4
mount -t tmpfs -o mode=755 onebox-ci-run /run
mount -t tmpfs -o mode=755,size=6g onebox-ci-ovl "$ovl"
mkdir "$ovl/u" "$ovl/w" "$merged"
mount -t overlay overlay -o "lowerdir=/,upperdir=$ovl/u,workdir=$ovl/w" "$merged"
grep " $merged " /proc/self/mountinfo | grep -q " - overlay .*lowerdir=/," || { echo "no overlay"; exit 97; }
[ "$(realpath "$merged")" != / ] || { echo "REFUSING to boot on /"; exit 99; }
for u in $masks; do ln -sf /dev/null "$merged/etc/systemd/system/$u"; done
echo $$ > "$pidfile"
exec systemd-nspawn -D "$merged" "$@" -b
"""


class ContainerError(Exception):
    pass


def why_not_supported() -> str | None:
    """None if a container can be booted here, else the reason (for a pytest skip)."""
    if os.geteuid() != 0:
        return "system tests need root (mount namespaces, overlayfs, systemd-nspawn)"
    for tool in ("systemd-nspawn", "unshare", "nsenter", "timeout"):
        if shutil.which(tool) is None:
            hint = " (apt-get install systemd-container; scripts/setup does)" if tool == "systemd-nspawn" else ""
            return f"{tool} not found{hint}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                            "mount", "-t", "tmpfs", "probe", "/mnt"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot mount in a private mount namespace: {probe.stderr.strip()}"
    return None


def cgroup_roots() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # pure cgroup v2
        return [root]
    return [root / h for h in ("systemd", "unified") if (root / h / "cgroup.procs").exists()]


class Container:
    def __init__(self, base: Path, binds: dict[Path, str], name: str | None = None) -> None:
        self.name = name or f"onebox-ci{os.getpid()}"
        self.base = base
        self.rundir = base / "run" / self.name
        self.ovl = base / "ovl" / self.name
        self.merged = self.ovl / "merged"
        self.binds = binds
        self.cgroups = [r / f"onebox-ci-{self.name}" for r in cgroup_roots()]
        self.console = self.rundir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.nspawn_pid: int | None = None
        self.leader: int | None = None
        self.boot_seconds = 0.0

    # -- boot --------------------------------------------------------------------------

    def boot(self, timeout: float = 120.0) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.ovl.mkdir(parents=True, exist_ok=True)
        for cg in self.cgroups:
            cg.mkdir(exist_ok=True)
        pidfile = self.rundir / "nspawn.pid"
        pidfile.unlink(missing_ok=True)
        args = ["--register=no", "--keep-unit", "--private-network", "-M", self.name,
                "--console=read-only"]
        args += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        enter_cgroups = "; ".join(f'echo $$ > "{cg}/cgroup.procs"' for cg in self.cgroups)
        started = time.monotonic()
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'{enter_cgroups}; exec "$@"', "sh",
                 "timeout", "-k", "15", "3600",
                 "unshare", "--mount", "--propagation", "private", "--",
                 "sh", "-c", BOOT_SCRIPT, "boot", str(self.ovl), str(self.merged), str(pidfile),
                 " ".join(MASK), *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.nspawn_pid = int(self._wait_for(lambda: pidfile.read_text().strip() or None, 20, "nspawn pid"))
        self.leader = int(self._wait_for(self._find_leader, 30, "container init"))
        self._wait_for(lambda: self.run("test", "-S", "/run/systemd/private", timeout=10).returncode == 0 or None,
                       60, "systemd's private socket")
        state = self.run("systemctl", "is-system-running", "--wait", timeout=timeout).stdout.strip()
        if state not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-legend").stdout
            raise ContainerError(f"boot: state {state!r}; failed units: {failed}")
        self.boot_seconds = time.monotonic() - started
        root = [line for line in self.run("cat", "/proc/self/mountinfo").stdout.splitlines()
                if line.split()[4] == "/"]
        if not root or " - overlay overlay " not in root[-1]:
            raise ContainerError(f"safety: the container's root is not the overlay: {root}")

    def _find_leader(self) -> str | None:
        # nspawn forks an intermediate child that forks the container's PID 1 and exits:
        # only a child that is systemd itself is the leader to nsenter.
        for task in Path(f"/proc/{self.nspawn_pid}/task").glob("*/children"):
            for kid in task.read_text().split():
                if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                    return kid
        return None

    def _wait_for(self, probe: object, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ContainerError(f"nspawn exited ({self.proc.returncode}) waiting for {what}: {self.console_tail()}")
            try:
                value = probe()  # type: ignore[operator]
            except (OSError, ValueError):
                value = None
            if value:
                return str(value)
            time.sleep(0.1)
        raise ContainerError(f"timed out waiting for {what}: {self.console_tail()}")

    def console_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- inside ------------------------------------------------------------------------

    def run(self, *argv: str, timeout: float = 60.0, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container as root, with a clean environment."""
        if self.leader is None:
            raise ContainerError("not booted")
        envv = [f"{k}={v}" for k, v in {"PATH": PATH, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8",
                                        "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", **(env or {})}.items()]
        cmd = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
               "env", "-i", *envv, *argv]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout} s")

    def sh(self, script: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, timeout=timeout)

    # -- teardown ----------------------------------------------------------------------

    def halt(self, timeout: float = 30.0) -> list[str]:
        """Halt the container; return what was left behind (empty when clean)."""
        problems: list[str] = []
        if self.proc is not None:
            if self.nspawn_pid and self.proc.poll() is None:
                try:
                    # nspawn turns SIGTERM into SIGRTMIN+3 (halt) for the container's systemd.
                    os.kill(self.nspawn_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"nspawn {self.nspawn_pid} did not halt in {timeout} s; killed")
                if self.nspawn_pid:
                    try:
                        os.kill(self.nspawn_pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait(15)
        for cg in self.cgroups:
            if not cg.exists():
                continue
            left = []
            for procs in cg.rglob("cgroup.procs"):
                try:
                    left += procs.read_text().split()
                except OSError:
                    pass
            if left:
                problems.append(f"processes left in {cg}: {' '.join(left)}")
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                cg.rmdir()
            except OSError as exc:
                problems.append(f"cgroup {cg} remains: {exc}")
        mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(self.ovl) in line or "onebox-ci-" in line]
        if mounts:
            problems.append(f"mounts left on the host: {mounts}")
        else:
            # Only empty mount points remain (the tmpfs lived in the private namespace).
            shutil.rmtree(self.ovl, ignore_errors=True)
            if not problems:
                shutil.rmtree(self.rundir, ignore_errors=True)
        return problems
