"""Issue 8 #12's measurement (a program, not a test): spurious failures from CLIENT KILL.

2 uvicorn workers behind ``wrk -c50``, a route whose limit is never reached
(1,000,000/second), so every non-2xx answer is a failure decision; meanwhile
20 ``CLIENT KILL TYPE normal`` of rategate's connections (one every 0.4 s).
Prints wrk's totals and the count of failure decisions::

    .venv/bin/python tests/measure_client_kill.py [--tls] [--kills 20] [--duration 12]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from redisserver import RedisServer  # noqa: E402
from test_uvicorn import Uvicorn  # noqa: E402

APP = '''
import os
import rategate
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def ok(request):
    return PlainTextResponse("ok")

async def health(request):
    return PlainTextResponse("ok")

limiter = rategate.Limiter(os.environ["RATEGATE_REDIS_URL"])
app = rategate.RateLimitMiddleware(
    Starlette(routes=[Route("/", ok), Route("/health", health)]),
    limiter=limiter, limits="1000000/second", exempt=["/health"])
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--duration", type=int, default=12)
    args = p.parse_args()
    d = tempfile.mkdtemp(prefix="rategate-measure-")
    with open(os.path.join(d, "measure_app.py"), "w") as f:
        f.write(APP)
    tls = None
    if args.tls:
        from tlscerts import make_certs
        c = make_certs(d)
        tls = (c.server_cert, c.server_key, c.ca)
    with RedisServer(tls=tls) as redis_srv:
        srv = Uvicorn("measure_app:app", workers=2, env={"RATEGATE_REDIS_URL": redis_srv.url,
                                                         "PYTHONPATH": d})
        try:
            subprocess.run(["wrk", "-c10", "-t1", "-d1s", srv.url + "/"], capture_output=True)  # warm
            admin = redis_srv.client()
            killed = []

            def killer() -> None:
                time.sleep(1.0)
                for _ in range(args.kills):
                    killed.append(int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal")))
                    time.sleep(0.4)

            t = threading.Thread(target=killer)
            t.start()
            out = subprocess.run(["wrk", "-c50", "-t2", f"-d{args.duration}s", srv.url + "/"],
                                 capture_output=True, text=True).stdout
            t.join()
        finally:
            srv.stop()
    total = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failures = int(m.group(1)) if m else 0
    print(out)
    print(f"{'TLS' if args.tls else 'plain TCP'}: {args.kills} CLIENT KILLs killed {sum(killed)} connections; "
          f"{total} requests, {failures} failure decisions ({100.0 * failures / max(total, 1):.3f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
