"""One preloaded worker per job slot, so that a submission does not pay for importing torch.

    python -m grading.zygote       # started by the grader inside bubblewrap, never by hand

Starting a fresh Python and importing torch took most of the time of one sandboxed submission.
Where the grader runs as root with a cgroup budget (what `make grade` does on a CI box), each job
slot instead starts one zygote: a Python, inside the same bubblewrap sandbox as before (no network,
read-only system and course, nothing else of the checkout, its own PID namespace), that imports
torch, IPython and the lab checks once. No student code ever runs in it. For each submission:

1. The grader sends it three fresh pipes (the worker's standard input, output and error) over a
   Unix socket; the zygote forks a child. The child says "started" on the socket, and the kernel
   tells the grader its pid (SO_PASSCRED), which the grader moves into the submission's cgroup
   (memory and process budget) before it writes anything to the child's input.
2. The child, now in the budget, unshares new PID, mount, IPC, UTS and network namespaces and forks
   the submission's first process, PID 1 there: when it ends, or the grader kills the cgroup, the
   kernel kills everything the submission started. That process mounts a fresh /proc (it sees only
   its own processes), fresh size-capped tmpfs on /scratch and /tmp, drops every capability and
   becomes uid/gid 65534 with no_new_privs, then forks PID 2, which runs `grading.worker.run` on
   the job and inputs read from its standard input, exactly as the one-shot worker does.
3. The zygote reaps the child and sends its exit status (128 + signal, as bubblewrap reports it).

Elsewhere (not root, no cgroup, --unsafe-no-sandbox) the grader starts one sandbox per submission
(`grading.sandbox.start`), as before.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
NOBODY = 65534


# ------------------------------------------------------------------- inside the sandbox: the zygote


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _become_the_submission(scratch_bytes: int) -> None:
    """In PID 1 of the submission's namespaces: fresh /proc, /scratch and /tmp; no privileges left."""
    _libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    _libc_call("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    # A course or Python under /tmp (a CI clone) is bound inside the zygote's /tmp: keep that /tmp
    # (root's, not writable by the submission) rather than hide it; TMPDIR points at /scratch.
    from grading.sandbox import _readonly_paths, under_tmp

    course_in_tmp = any(under_tmp(p) for p in _readonly_paths())
    for path in (b"/scratch",) if course_in_tmp else (b"/scratch", b"/tmp"):
        _libc_call("mount", b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_bytes},mode=1777".encode())
    _libc_call("sethostname", b"sandbox", 7)
    for cap in range(64):  # the bounding set: no capability can come back, not even through execve
        ctypes.CDLL(None).prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)  # drops the permitted and effective capabilities too
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.getuid() != NOBODY or os.geteuid() != NOBODY:
        raise OSError("could not become the unprivileged user")
    os.chdir("/scratch")
    os.environ.clear()
    os.environ.update(HOME="/scratch", TMPDIR="/scratch", PATH="/usr/bin:/bin", PYTHONHASHSEED="0", OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")


def _wait_for(pid: int) -> int:
    """Reap children (PID 1 reaps orphans too) until `pid` ends: its exit code, 128 + a signal."""
    while True:
        found, status = os.waitpid(-1, 0)
        if found == pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


def _init(scratch_bytes: int) -> None:
    """PID 1 of the submission's namespaces: sets them up, then runs the worker as PID 2 (a signal
    the notebook sends to itself reaches it, as one to PID 1 would not) and waits for it."""
    try:
        _become_the_submission(scratch_bytes)
        pid = os.fork()
        if pid == 0:
            from grading import worker

            worker.run(json.loads(sys.stdin.buffer.readline()))  # never returns
        os.close(0)  # only the worker reads its input
        os._exit(_wait_for(pid))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _child(control: socket.socket, fds: list[int], scratch_bytes: int) -> None:
    """The submission's outer process: joins the budget (the grader moves it), then starts PID 1."""
    try:
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.setsid()
        control.send(b"started")  # the kernel attaches this process's pid, as the grader sees it
        control.close()
        if os.read(0, 1) != b"G":  # the grader writes it once this process is in the budget
            os._exit(1)
        _libc_call("unshare", CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET)
        init = os.fork()
        if init == 0:
            _init(scratch_bytes)
        os._exit(_wait_for(init))
    except BaseException:  # noqa: BLE001 - said on the worker's standard error, which the grader keeps
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def main() -> None:
    import torch  # noqa: F401 - what every submission needs, imported once
    from IPython.core.interactiveshell import InteractiveShell  # noqa: F401

    import grading.checks
    from grading import guard, worker  # noqa: F401

    for name in grading.checks.LECTURES:
        grading.checks.lab_module(name)
    scratch_bytes = int(sys.argv[1])
    control = socket.socket(fileno=os.dup(0))  # fds 0, 1 and 2 are the children's own pipes
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    control.send(b"ready")
    while True:
        fds = array.array("i")
        message, ancillary, _, _ = control.recvmsg(100, socket.CMSG_SPACE(3 * fds.itemsize))
        if not message:
            return  # the grader closed the socket
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        pid = os.fork()
        if pid == 0:
            _child(control, list(fds), scratch_bytes)
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        control.send(json.dumps({"rc": 128 - code if code < 0 else code}).encode())


# ---------------------------------------------------------------------- in the grader: its handle


class Submission:
    """What `subprocess.Popen` gives for a one-shot worker, for a submission forked by a zygote:
    `stdin`, `stdout`, `stderr`, `pid` (as the grader sees it), `poll()`, `returncode`, `kill()`, `wait()`."""

    def __init__(self, zygote: "Zygote", pid: int, stdin, stdout, stderr, budget):
        self.zygote, self.pid, self.stdin, self.stdout, self.stderr, self.budget = zygote, pid, stdin, stdout, stderr, budget
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self.zygote.exit_status(wait=0)
        return self.returncode

    def kill(self) -> None:
        self.budget.kill()  # the child and PID 1 of its namespace: the kernel kills the rest

    def wait(self):
        if self.returncode is None:
            self.returncode = self.zygote.exit_status(wait=30)
        if self.returncode is None:  # it did not report: not to be trusted with another submission
            self.zygote.close()
            self.returncode = -signal.SIGKILL
        return self.returncode


class Zygote:
    """One zygote, started on first use by the job slot (thread) that owns it."""

    def __init__(self, command: list[str], env: dict, cwd: str, start_timeout: float):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.errors = b""
        self.proc = subprocess.Popen(command, stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, cwd=cwd, env=env)
        theirs.close()
        threading.Thread(target=self._tail, daemon=True).start()
        if self._receive(start_timeout)[0] != b"ready":
            self.close()
            last = self.errors.decode(errors="replace").strip().split("\n")[-1][:300]
            raise OSError(f"the grading sandbox failed to start{': ' + last if last else ''}")

    def _tail(self) -> None:
        while chunk := self.proc.stderr.read(4096):
            self.errors = (self.errors + chunk)[-4096:]

    def _receive(self, timeout: float) -> tuple[bytes, int | None]:
        """(message, sender's pid), or (b"", None) at the timeout or when the zygote is gone."""
        if not select.select([self.control], [], [], timeout)[0]:
            return b"", None
        try:
            message, ancillary, _, _ = self.control.recvmsg(100, socket.CMSG_SPACE(struct.calcsize("3i")))
        except OSError:
            return b"", None
        pid = next((struct.unpack("3i", data[:12])[0] for level, kind, data in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
        return message, pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, budget, timeout: float) -> Submission:
        """Fork a child for one submission, in `budget`; its input, output and error are pipes."""
        (in_r, in_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
        try:
            self.control.sendmsg([b"run"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [in_r, out_w, err_w]))])
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        stdin, stdout, stderr = os.fdopen(in_w, "wb"), os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb")
        message, pid = self._receive(timeout)
        if message != b"started" or not pid:
            self.close()
            for f in (stdin, stdout, stderr):
                f.close()
            raise OSError("the grading sandbox did not start a worker")
        try:
            budget.add(pid)
            stdin.write(b"G")
            stdin.flush()
        except OSError:  # the child waits for a word that will not come: the zygote is not to be reused
            self.close()
            for f in (stdin, stdout, stderr):
                f.close()
            raise
        return Submission(self, pid, stdin, stdout, stderr, budget)

    def exit_status(self, wait: float) -> int | None:
        message, _ = self._receive(wait)
        if not message:
            return None if self.alive() or wait == 0 else -signal.SIGKILL
        return json.loads(message)["rc"]

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.kill()
        self.proc.wait()  # the socket stays open: a thread waiting on it sees the zygote's end close


if __name__ == "__main__":
    main()
