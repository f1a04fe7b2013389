"""Case `health`: the baseline. The same no-op route as every other case, no middleware."""

from fastapi import FastAPI

from bench.apps.common import bench_lifespan

app = FastAPI(lifespan=bench_lifespan())


@app.get("/ping")
async def ping():
    return {"ok": True}
