"""GET /health (200 while serving, 503 once shutting down) and GET /version."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ember import __version__
from ember.server.serving import ServerBusyError

router = APIRouter(tags=["Server"])


@router.get("/health")
async def health(raw_request: Request):
    if not raw_request.app.state.serving.engine.is_accepting:
        raise ServerBusyError("the server is shutting down")
    return Response(status_code=200)


@router.get("/version")
async def version():
    return {"version": __version__}
