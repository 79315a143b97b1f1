"""The sandbox one submission runs in: bubblewrap, plus one memory and process budget.

`Sandbox(...).start(job_dir)` starts `python -m grading.worker` inside `bwrap` with:
- no network (`--unshare-all`: network, IPC, UTS, cgroup and user namespaces too);
- its own PID namespace: it sees only its own processes, cannot signal the grader, and when it
  ends, or the grader kills it or dies, the kernel kills everything it started (`--die-with-parent`,
  and bwrap is PID 1 there);
- an unprivileged user inside (uid/gid 65534, `nobody`), no capabilities, a new session (no
  terminal to inject keystrokes into);
- a read-only view of the system (/usr, /lib, /bin, /etc), of the Python installation and of the
  course's two packages (`course_lib`, `grading`), nothing else of the course checkout: not the
  submissions, the gradebook, the other workers' folders or the grader's temporary files;
- the job folder read-only at /job (the cells; the hidden inputs arrive on standard input), and
  writable /scratch and /tmp as tmpfs capped at `scratch_mb` each.
The budget for the whole submission (the worker and every process it starts) is a cgroup:
`memory` bytes and `MAX_PROCESSES` tasks (threads count), v1 or v2, whichever this machine has
and lets us write. Where no cgroup can be made (an unprivileged user without delegation), the
budget falls back to limits per process (RLIMIT_AS in the worker): `budget.kind` says which, and
the grader prints it.

Where the grader is root and the budget a cgroup, a worker is not started afresh for every
submission: `start_forked` forks it from this job slot's preloaded zygote (`grading.zygote`), which
gives each submission the same isolation inside the same bubblewrap view, without importing torch
again.

Without bwrap the grader refuses to run, unless the instructor passes `--unsafe-no-sandbox`:
then the worker runs as a plain process in a new session, with the same budget, a scratch folder
of its own as working directory, and nothing else isolated.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

import course_lib

import grading

MAX_PROCESSES = 256
ESSENTIAL = {"memory.limit_in_bytes", "memory.max", "pids.max"}
NOBODY = "65534"


def bwrap() -> str | None:
    return shutil.which("bwrap")


def _cgroup_parents() -> dict[str, Path]:
    """{controller: the folder of this process's own cgroup} for memory and pids (v1), or
    {"v2": folder} on a unified hierarchy."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1]
        if fstype == "cgroup2":
            mounts["v2"] = Path(fields[4])
        elif fstype == "cgroup":
            for controller in ("memory", "pids"):
                if controller in options.split(","):
                    mounts[controller] = Path(fields[4])
    found = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else ["v2"]:
            if c in mounts and c in ("memory", "pids", "v2"):
                found[c] = mounts[c] / path.lstrip("/")
    return found if {"memory", "pids"} <= found.keys() else {"v2": found["v2"]} if "v2" in found else {}


class Budget:
    """One memory and process budget for a whole submission: a cgroup when this machine lets us
    make one (`kind` "cgroup v1" or "cgroup v2"), else limits per process (`kind` "rlimit")."""

    def __init__(self, name: str, memory_bytes: int):
        self.folders: list[Path] = []
        self.kind = "rlimit (per process: RLIMIT_AS; no cgroup could be made)"
        try:
            parents = _cgroup_parents()
            if "memory" in parents:
                settings = {parents["memory"] / name: {"memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes,
                                                       "memory.swappiness": 0},
                            parents["pids"] / name: {"pids.max": MAX_PROCESSES}}
                kind = "cgroup v1"
            elif "v2" in parents:
                settings = {parents["v2"] / name: {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": MAX_PROCESSES}}
                kind = "cgroup v2"
            else:
                return
            for folder, values in settings.items():
                folder.mkdir()
                self.folders.append(folder)
                for key, value in values.items():
                    try:
                        (folder / key).write_text(str(value))
                    except OSError:
                        if key in ESSENTIAL:  # no swap settings on this kernel: fine; no limit: no cgroup
                            raise
            self.kind = kind
        except OSError:
            self.remove()
            self.kind = "rlimit (per process: RLIMIT_AS; no cgroup could be made)"

    def prefix(self) -> list[str]:
        """A command prefix that moves the process into the cgroup before it runs anything."""
        if not self.folders:
            return []
        moves = "; ".join(f'echo $$ > "{f}/cgroup.procs"' for f in self.folders)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh"]

    def add(self, pid: int) -> None:
        """Move a process into the budget (before it runs anything of the submission)."""
        for folder in self.folders:
            (folder / "cgroup.procs").write_text(str(pid))

    def kill(self) -> None:
        """SIGKILL every process left in the budget (there should be none: the PID namespace)."""
        for _ in range(50):
            pids = [int(p) for f in self.folders if (f / "cgroup.procs").exists() for p in (f / "cgroup.procs").read_text().split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        self.kill()
        for folder in reversed(self.folders):
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
        self.folders = []


def _readonly_paths() -> list[str]:
    """What the worker needs to read: the system, Python and its packages, the course's packages."""
    paths = {"/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc"}
    paths |= {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths |= {p for p in sys.path if p and os.path.isdir(p) and ("site-packages" in p or "dist-packages" in p)}
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    paths |= {user} if user and os.path.isdir(user) else set()
    paths |= {str(Path(course_lib.__file__).parent), str(Path(grading.__file__).parent)}
    return sorted(p for p in paths if p and os.path.exists(p))


def under_tmp(path: str) -> bool:
    return path == "/tmp" or path.startswith("/tmp/")


def _system_view(scratch_mb: int, open_parents: bool = False) -> list[str]:
    """bwrap options: capped /tmp and /scratch, /proc, /dev; the read-only system, Python and course.
    `open_parents`: the folders above them readable by everyone (bwrap run by root makes them 0700).

    The tmpfs mounts come first, so that a course or Python installed under /tmp (a CI clone, say)
    is bound on top of the fresh /tmp instead of being hidden by it. TMPDIR is /scratch either way.
    """
    size = str(scratch_mb * 2**20)
    cmd = ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/scratch"]
    parents = sorted({str(a) for p in _readonly_paths() for a in Path(p).parents if str(a) not in ("/", "/tmp")}, key=len)
    for parent in parents if open_parents else []:
        cmd += ["--perms", "0755", "--dir", parent]
    for path in _readonly_paths():
        cmd += ["--ro-bind", path, path]
    return cmd + ["--chdir", "/scratch", "--clearenv", "--setenv", "HOME", "/scratch", "--setenv", "TMPDIR", "/scratch",
                  "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "PYTHONHASHSEED", "0", "--setenv", "OMP_WAIT_POLICY", "PASSIVE"]


def command(job_dir: Path, scratch_mb: int, unsafe: bool) -> list[str]:
    """The command line that runs the worker on a job folder."""
    worker = [sys.executable, "-m", "grading.worker"]
    if unsafe:
        return [*worker, str(job_dir)]
    cmd = [bwrap(), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--uid", NOBODY, "--gid", NOBODY, "--hostname", "sandbox", "--ro-bind", str(job_dir), "/job"]
    return [*cmd, *_system_view(scratch_mb), "--", *worker, "/job"]


def forking(budget: Budget, unsafe: bool) -> bool:
    """Whether submissions are forked from a preloaded zygote (`grading.zygote`): it needs root, to
    make each submission's namespaces and become `nobody`, and a cgroup, to hold the submission."""
    return not unsafe and bool(bwrap()) and os.geteuid() == 0 and budget.kind.startswith("cgroup")


_slot = threading.local()  # this job slot's zygote
_zygotes: list = []
_zygotes_lock = threading.Lock()


def start_forked(budget: Budget, scratch_mb: int, timeout: float):
    """A worker forked, in `budget`, from this job slot's zygote (started on first use)."""
    from . import zygote

    current = getattr(_slot, "zygote", None)
    if current is None or not current.alive():
        cmd = [bwrap(), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--hostname", "sandbox", *_system_view(scratch_mb, open_parents=True),
               "--", sys.executable, "-m", "grading.zygote", str(scratch_mb * 2**20)]
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        current = _slot.zygote = zygote.Zygote(cmd, env | {"OMP_NUM_THREADS": "1"}, "/", timeout)
        with _zygotes_lock:
            _zygotes.append(current)
    return current.start(budget, timeout)


def close_zygotes() -> None:
    """End every job slot's zygote (end of the batch, Ctrl-C)."""
    with _zygotes_lock:
        found, _zygotes[:] = list(_zygotes), []
    for z in found:
        z.close()


def start(job_dir: Path, budget: Budget, scratch_mb: int, unsafe: bool) -> subprocess.Popen:
    """Start the worker; its standard input, output and error are pipes to the grader."""
    cwd = job_dir.parent / "scratch"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "PYTHONHASHSEED")}
    return subprocess.Popen([*budget.prefix(), *command(job_dir, scratch_mb, unsafe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, cwd=cwd, env=env | {"OMP_NUM_THREADS": "1"})


def stop(proc: subprocess.Popen, budget: Budget) -> None:
    """Kill the worker and everything it started."""
    if isinstance(proc, subprocess.Popen):  # a forked worker's pid is not ours to signal: its budget is
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    proc.kill()
    proc.wait()
    budget.remove()


def version() -> str:
    found = bwrap()
    if not found:
        return "none"
    out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    return re.sub(r"\s+", " ", out).strip()
