"""The web chat page: GET / serves static/index.html, GET /static/{name} its script and style sheet.
The page talks to this server's own /v1/models and /v1/chat/completions; nothing comes from a CDN."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

router = APIRouter(tags=["Web"])
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Only these files are served: no path from the URL ever reaches the file system.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate, so an upgraded server never runs a stale page


@router.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC_DIR / "index.html", media_type=STATIC_FILES["index.html"], headers=NO_CACHE)


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str):
    if name not in STATIC_FILES:
        raise HTTPException(404, f"no static file named {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=NO_CACHE)
