"""The other processes of the shm:// tests (tests/test_shm*.py): each command
opens ``shm://NAME`` itself, in a fresh interpreter, as an unrelated process
of the host would.

    python tests/shm_worker.py flood NAME KEY N RATE       N hits; prints the allowed count
    python tests/shm_worker.py hang NAME KEY RATE STAGE [CONCURRENCY]
                                                           one hit (taking slot b"hanging" with
                                                           a CONCURRENCY limit) that stops for
                                                           good inside the lock, at STAGE
                                                           (shmstore.h)
    python tests/shm_worker.py zygote NAME KEY RATE HOLD_NS FD
        reads "fork" lines; forks a flooder per line (its pid on stdout) that hits KEY
        forever and writes one byte per decision to FD: b"a" allowed, b"d" denied,
        b"e" a failure decision; HOLD_NS widens each journaled write (the crash test)
    python tests/shm_worker.py fork NAME KEY RATE CHILDREN  a Limiter opened before fork
                                                           used by CHILDREN children; prints
                                                           every remaining, one per line
    python tests/shm_worker.py open NAME KEY RATE          open, one hit; prints remaining
    python tests/shm_worker.py --uid UID CMD ...           the same, as user UID (run as root)

Every command waits for a line on stdin before its hits when START is in
the environment (so several start together).
"""

from __future__ import annotations

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rategate  # noqa: E402


def _limiter(name: str, **kw: object) -> rategate.Limiter:
    return rategate.Limiter(f"shm://{name}", **kw)  # type: ignore[arg-type]


def _wait_start() -> None:
    if os.environ.get("START"):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()


def flood(name: str, key: str, n: str, rate: str) -> None:
    lim = _limiter(name, timeout=5.0)
    spec = lim.compile(rate)
    submit = lim.submit
    _wait_start()
    allowed = errors = 0
    for _ in range(int(n)):
        d = submit(key, spec, 1)
        allowed += d.allowed
        errors += d.error is not None
    print(allowed, errors, flush=True)


def hang(name: str, key: str, rate: str, stage: str, concurrency: str = "0") -> None:
    lim = _limiter(name)
    spec = lim.compile(rate, concurrency=int(concurrency))
    lim._engine._test_fault(0, int(stage))
    print("ready", flush=True)
    if spec.concurrency:
        lim.submit(key, spec, 1, b"hanging")  # never returns
    else:
        lim.submit(key, spec, 1)
    print("returned", flush=True)


def zygote(name: str, key: str, rate: str, hold_ns: str, fd: str) -> None:
    lim = _limiter(name, timeout=1.0)
    spec = lim.compile(rate)
    out = int(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the flooders
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "fork":
            break
        pid = os.fork()
        if pid == 0:
            try:
                lim._engine._test_fault(int(hold_ns), 0)
                submit = lim.submit
                while True:
                    d = submit(key, spec, 1)
                    os.write(out, b"e" if d.error is not None else b"a" if d.allowed else b"d")
            finally:
                os._exit(1)
        print(pid, flush=True)


def fork(name: str, key: str, rate: str, children: str) -> None:
    lim = _limiter(name)
    spec = lim.compile(rate)
    print(lim.submit(key, spec, 1).remaining, flush=True)
    pids = []
    for _ in range(int(children)):
        pid = os.fork()
        if pid == 0:
            d = lim.submit(key, spec, 1)
            os.write(1, f"{d.remaining if d.error is None else d.error}\n".encode())  # one write
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert status == 0
    print(lim.submit(key, spec, 1).remaining, flush=True)


def open_one(name: str, key: str, rate: str) -> None:
    _wait_start()
    lim = _limiter(name)
    print(lim.submit(key, lim.compile(rate), 1).remaining, flush=True)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[0] == "--uid":  # become that user (imports done: no file of ours is read after)
        uid = int(argv[1])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        argv = argv[2:]
    cmd, args = argv[0], argv[1:]
    {"flood": flood, "hang": hang, "zygote": zygote, "fork": fork, "open": open_one}[cmd](*args)
