"""The probes of a worker-only process: /healthz, /readyz and /metrics on its own port
(`[worker] http_port`), answered as the receiver answers them."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.receiver import Ready


def create_probe_app(metrics: Metrics, ready: Ready) -> Starlette:
    """A small app: /healthz 200 while the process lives; /readyz 200, or 503 with the
    problems `ready` reports; /metrics in the Prometheus text format."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        readiness = await ready()
        if readiness.problems:
            answer = {"ready": False, "problems": readiness.problems}
            return JSONResponse({**answer, "degraded": readiness.degraded}, 503)
        return JSONResponse({"ready": True, "degraded": readiness.degraded})

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
        ]
    )
