"""The dashboard page and its static files (``tasks_platform/api/dashboard.*``).

The page needs no token to load: it asks for one and calls the API with it, like any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from tasks_platform.api.errors import NotFound

router = APIRouter(include_in_schema=False)

FOLDER = Path(__file__).resolve().parents[1]
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@router.get("/dashboard")
def dashboard() -> FileResponse:
    return _file("dashboard.html")


@router.get("/dashboard/{asset}")
def dashboard_asset(asset: str) -> FileResponse:
    return _file(asset)


def _file(name: str) -> FileResponse:
    path = FOLDER / name
    suffix = path.suffix
    if not name.startswith("dashboard.") or "/" in name or suffix not in MEDIA_TYPES:
        raise NotFound(f"no such file: {name}")
    if not path.is_file():
        raise NotFound(f"no such file: {name}")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=MEDIA_TYPES[suffix], headers=headers)
