"""GET /web: a single page to try the service in a browser.

The page (``decoder_gateway/api/static/``) is plain HTML, CSS and JavaScript: no build
step, nothing fetched from elsewhere. It streams over the WebSocket endpoint and plays
the PCM frames as they arrive with Web Audio. Its assets sit under ``/web/`` and are
named relative to the page, so it also works behind a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter()

# The page's assets, by the names it uses (web/app.js, web/style.css); nothing else.
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a new release shows at once


# Package data (pyproject.toml), installed as plain files next to the code.
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_NO_CACHE)


@router.api_route("/web", methods=["GET", "HEAD"], include_in_schema=False)
async def web_page() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.api_route("/web/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def web_asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no such file: web/{name}")
    return _file(name, media_type)
