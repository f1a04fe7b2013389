"""A server under test as a real process: ``python -m ARGV`` in its own
process group, its output in a log file, stopped as a group.

:class:`test_uvicorn.Uvicorn` and :class:`test_servers.Server` build on it;
each waits for its server to be ready in its own way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class ServerProcess:
    """``python -m ARGV`` listening on 127.0.0.1:``port``; the repository and
    tests/ on its PYTHONPATH, ``env`` on top of ours.  :meth:`stop` ends the
    process group: SIGTERM (or SIGKILL), SIGKILL after ``term_wait`` seconds,
    and SIGKILL to whatever of the group is left (workers)."""

    term_wait = 10.0

    def __init__(self, argv: list[str], port: int, *, env: dict[str, str] | None = None, cwd: str = REPO,
                 log_prefix: str = "rategate-server-") -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._logf = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [REPO, HERE] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd, env=full_env,
                                     stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        with open(self._logf.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, graceful: bool = True) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
                self.proc.wait(self.term_wait)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:  # pragma: no cover
                pass
        try:  # the master is gone; its workers may not be
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._logf.close()
        try:
            os.unlink(self._logf.name)
        except OSError:  # pragma: no cover
            pass
