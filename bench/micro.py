"""The figures measured without HTTP, each run in its own process by bench/run.py:

    python -m bench.micro cpu        --impl rategate|python-redis --url URL
    python -m bench.micro ffi        --url URL
    python -m bench.micro throughput --impl rategate|python-redis --url URL --seconds S
    python -m bench.micro rss        --impl rategate --url URL

Each prints one line ``MICRO_JSON {...}`` on stdout.

cpu         CPU of the Python thread (``time.thread_time()``) per check, for C
            concurrent checks started with ``asyncio.gather``, repeated.  ``raw``
            is everything the thread spent divided by the checks; ``baseline``
            is the same gather of coroutines that return at once (the Task
            per coroutine that gather makes, which the benchmark adds and a real
            request does not); ``net = raw - baseline`` is the cost of the check
            itself, and is the figure compared with the target.
ffi         ns per call of a check answered without Redis: a key already over
            its limit (rategate's local over-limit cache) and ``memory://``,
            through ``submit`` (the middleware's fast path) and ``await hit``.
throughput  checks/s from one process: C tasks each awaiting ``hit`` in a loop
            for S seconds; only decisions without an error are counted.
rss         VmRSS after 100,000 and after 1,000,000 checks (10% of them on keys
            over their limit, so the local cache is exercised).
middleware  bench/middleware_cost.py: the middleware's event-loop CPU per request
            over the bare app, allowed (Redis) and denied from the deny cache;
            run with RATEGATE_PYTHON_PATH=1 for the Python path (the A/B).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/micro.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALLOWED = "1000000/second"
OVER = "1/hour"


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


# --------------------------------------------------------------------------
# the two implementations behind one shape: hit(key) -> awaitable, error(result)


class RategateImpl:
    name = "rategate"

    def __init__(self, url: str, rates: str = ALLOWED) -> None:
        import rategate

        self.rategate = rategate
        self.limiter = rategate.Limiter(url)
        self.rates = rates
        self.spec = self.limiter.compile(rates)
        self.Decision = rategate.Decision

    def hit(self, key: str, rates: str | None = None):
        return self.limiter.hit(key, rates or self.rates)

    async def hit_submit(self, key: str):
        r = self.limiter.submit(key, self.spec, 1)
        return r if type(r) is self.Decision else await r

    @staticmethod
    def failed(d) -> bool:
        return d.error is not None

    @staticmethod
    def allowed(d) -> bool:
        return d.allowed

    def stats(self):
        return self.limiter.stats()

    async def aclose(self) -> None:
        await self.limiter.aclose()


class PyRedisImpl:
    name = "python-redis"

    def __init__(self, url: str, rates: str = ALLOWED) -> None:
        from bench.pyredis_limiter import PyRedisLimiter

        self.limiters = {rates: PyRedisLimiter(url, rates)}
        self.url = url
        self.rates = rates

    def hit(self, key: str, rates: str | None = None):
        rates = rates or self.rates
        lim = self.limiters.get(rates)
        if lim is None:
            from bench.pyredis_limiter import PyRedisLimiter

            lim = self.limiters[rates] = PyRedisLimiter(self.url, rates)
        return lim.hit(key)

    @staticmethod
    def failed(d) -> bool:
        return False  # errors raise

    @staticmethod
    def allowed(d) -> bool:
        return bool(d[0])

    def stats(self):
        return None

    async def aclose(self) -> None:
        for lim in self.limiters.values():
            await lim.aclose()


def make_impl(name: str, url: str):
    if name == "rategate":
        return RategateImpl(url)
    if name == "python-redis":
        return PyRedisImpl(url)
    raise SystemExit(f"unknown --impl {name!r}")


# --------------------------------------------------------------------------


async def fig_cpu(a) -> dict:
    impl = make_impl(a.impl, a.url)
    keys = [f"cpu:{i}" for i in range(1000)]
    C, rounds = a.concurrency, max(1, a.checks // a.concurrency)
    nk = len(keys)

    async def noop(key):
        return None

    async def measure(fn) -> float:
        gather = asyncio.gather
        t0 = time.thread_time()
        for r in range(rounds):
            base = r * C
            await gather(*[fn(keys[(base + j) % nk]) for j in range(C)])
        return (time.thread_time() - t0) / (rounds * C) * 1e6

    variants = {"hit": impl.hit}
    if isinstance(impl, RategateImpl):
        variants["submit"] = impl.hit_submit
        # The floor of any awaited operation, measured the same way: a plain
        # asyncio future per call, all resolved by one callback (as rategate's
        # drain resolves a batch).  No limiter can cost the thread less.
        loop = asyncio.get_running_loop()
        pending: list = []

        def resolve_all() -> None:
            for f in pending:
                f.set_result(None)
            pending.clear()

        async def floor(key):
            f = loop.create_future()
            pending.append(f)
            if len(pending) == 1:
                loop.call_soon(resolve_all)
            return await f

        variants["future_floor"] = floor
    # warm up: connections, scripts, caches, the allocator
    for fn in (noop, *variants.values()):
        await asyncio.gather(*[fn(keys[j % nk]) for j in range(C)])
    out: dict = {"impl": impl.name, "concurrency": C, "checks_per_rep": rounds * C, "reps": a.reps}
    samples: dict[str, list[float]] = {k: [] for k in ("baseline", *variants)}
    for _ in range(a.reps):  # interleaved, so drifting machine load hits all alike
        samples["baseline"].append(await measure(noop))
        for name, fn in variants.items():
            samples[name].append(await measure(fn))
    base = statistics.median(samples["baseline"])
    out["baseline_us"] = round(base, 3)
    for name in variants:
        raw = statistics.median(samples[name])
        out[name] = {"raw_us": round(raw, 3), "net_us": round(raw - base, 3),
                     "samples_us": [round(x, 3) for x in samples[name]]}
    # one decision, to show it really went to Redis and was allowed
    d = await impl.hit("cpu:probe")
    out["probe_allowed"] = impl.allowed(d)
    out["stats"] = impl.stats()
    await impl.aclose()
    return out


async def fig_ffi(a) -> dict:
    import rategate

    Decision = rategate.Decision
    out: dict = {"calls": a.calls}

    async def bench(limiter, key, rates, expect_allowed: bool) -> dict:
        spec = limiter.compile(rates)
        r = limiter.submit(key, spec, 1)
        sync = type(r) is Decision
        d = r if sync else await r
        res: dict = {"answered_synchronously": sync, "allowed": d.allowed, "error": d.error}
        if not sync or d.allowed != expect_allowed or d.error is not None:
            res["problem"] = "submit() did not answer at once with the expected decision"
            return res
        submit = limiter.submit
        n = a.calls
        best = None
        for _ in range(3):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                submit(key, spec, 1)
            ns = (time.perf_counter_ns() - t0) / n
            best = ns if best is None else min(best, ns)
        res["submit_ns"] = round(best, 1)
        hit = limiter.hit
        best = None
        for _ in range(3):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                await hit(key, rates)
            ns = (time.perf_counter_ns() - t0) / n
            best = ns if best is None else min(best, ns)
        res["hit_ns"] = round(best, 1)
        last = limiter.submit(key, spec, 1)
        if type(last) is not Decision or last.allowed != expect_allowed:
            res["problem"] = f"the decision changed during the measurement: {last!r}"
        return res

    lim = rategate.Limiter(a.url)
    key = f"ffi:over:{os.getpid()}:{time.time_ns()}"  # fresh, whatever the Redis holds
    first = await lim.hit(key, OVER)   # allowed, takes the only token
    second = await lim.hit(key, OVER)  # denied by Redis: the key goes into the local cache
    out["setup"] = {"first_allowed": first.allowed, "second_allowed": second.allowed,
                    "second_error": second.error}
    before = lim.stats()
    out["cached_denial"] = await bench(lim, key, OVER, expect_allowed=False)
    after = lim.stats()
    out["cached_denial"]["cached_denials_counted"] = after.get("cached_denials", 0) - before.get("cached_denials", 0)
    await lim.aclose()
    mem = rategate.Limiter("memory://")
    # a bucket that no number of calls here can empty
    out["memory"] = await bench(mem, "ffi:mem", rategate.Rate(1_000_000, 1.0, burst=1_000_000_000),
                                expect_allowed=True)
    await mem.aclose()
    # for scale: the same loop calling a no-op C function with 3 arguments
    n = a.calls
    f = max
    t0 = time.perf_counter_ns()
    for _ in range(n):
        f(1, 2, 3)
    out["reference_builtin_call_ns"] = round((time.perf_counter_ns() - t0) / n, 1)
    return out


async def fig_throughput(a) -> dict:
    impl = make_impl(a.impl, a.url)
    keys = [f"tp:{i}" for i in range(10000)]
    nk = len(keys)
    C = a.concurrency
    await asyncio.gather(*[impl.hit(keys[j]) for j in range(min(C, 100))])  # warm up
    ok = failed = 0
    stop = False
    hit, is_failed = impl.hit, impl.failed

    async def worker(i: int) -> None:
        nonlocal ok, failed
        j = i
        while not stop:
            d = await hit(keys[j % nk])
            j += C
            if is_failed(d):
                failed += 1
            else:
                ok += 1

    def set_stop():
        nonlocal stop
        stop = True

    loop = asyncio.get_running_loop()
    t0, c0 = time.perf_counter(), time.thread_time()
    loop.call_later(a.seconds, set_stop)
    await asyncio.gather(*[worker(i) for i in range(C)])
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    out = {"impl": impl.name, "concurrency": C, "seconds": round(wall, 3), "checks": ok,
           "failed": failed, "checks_per_s": round(ok / wall), "thread_cpu_us_per_check":
           round(cpu / max(1, ok + failed) * 1e6, 3), "stats": impl.stats()}
    await impl.aclose()
    return out


async def fig_rss(a) -> dict:
    impl = make_impl(a.impl, a.url)
    allowed_keys = [f"rss:a:{i}" for i in range(10000)]
    over_keys = [f"rss:d:{i}" for i in range(100)]
    C = a.concurrency
    targets = sorted(a.marks)
    count = 0
    failed = 0
    hit, is_failed = impl.hit, impl.failed
    deadline = time.monotonic() + a.deadline

    async def run_until(n: int) -> None:
        nonlocal count, failed

        async def worker(i: int) -> None:
            nonlocal count, failed
            while count < n and time.monotonic() < deadline:
                c = count
                count += 1
                if c % 10 == 0:
                    d = await hit(over_keys[(c // 10) % 100], OVER)
                else:
                    d = await hit(allowed_keys[c % 10000])
                if is_failed(d):
                    failed += 1

        await asyncio.gather(*[worker(i) for i in range(C)])

    out: dict = {"impl": impl.name, "concurrency": C, "rss_kb_start": rss_kb(), "marks": []}
    t0 = time.perf_counter()
    for n in targets:
        await run_until(n)
        gc.collect()
        out["marks"].append({"checks": count, "rss_kb": rss_kb(), "seconds": round(time.perf_counter() - t0, 2)})
        if count < n:
            out["deadline_hit"] = True
            break
    out["failed"] = failed
    out["stats"] = impl.stats()
    await impl.aclose()
    return out


FIGURES = {"cpu": fig_cpu, "ffi": fig_ffi, "throughput": fig_throughput, "rss": fig_rss}


async def fig_middleware(a) -> dict:
    from bench.middleware_cost import measure

    return await measure(a.url, a.checks, a.reps)


FIGURES["middleware"] = fig_middleware


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro")
    p.add_argument("figure", choices=sorted(FIGURES))
    p.add_argument("--impl", default="rategate")
    p.add_argument("--url", default=os.environ.get("RATEGATE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--checks", type=int, default=20000, help="cpu: checks per repetition")
    p.add_argument("--reps", type=int, default=5, help="cpu: repetitions (median taken)")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--calls", type=int, default=200000, help="ffi: calls per measurement")
    p.add_argument("--seconds", type=float, default=3.0, help="throughput: duration")
    p.add_argument("--marks", type=int, nargs="+", default=[100_000, 1_000_000], help="rss: check counts")
    p.add_argument("--deadline", type=float, default=60.0, help="rss: give up after this many seconds")
    a = p.parse_args(argv)
    factory = None
    if a.loop == "uvloop":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            a.loop = "asyncio"
    with asyncio.Runner(loop_factory=factory) as runner:
        out = runner.run(FIGURES[a.figure](a))
    out["loop"] = a.loop
    sys.stdout.write("MICRO_JSON " + json.dumps(out, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
