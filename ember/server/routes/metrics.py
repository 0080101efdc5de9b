"""GET /metrics: Prometheus text exposition of the app's registry (see server/metrics.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["Server"])


@router.get("/metrics")
async def metrics(raw_request: Request):
    return Response(content=raw_request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
