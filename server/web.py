"""The browser page: `GET /` serves server/static/index.html, `GET /static/<file>` its assets.

Everything the page needs is in server/static (no CDN), so it works on an offline host.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page is small and changes with the server; always revalidate instead of caching stale JS.
NO_CACHE = {"Cache-Control": "no-cache"}


def web_router(static_dir: Path = STATIC_DIR) -> APIRouter:
    """Routes for the page and its static files (path traversal outside `static_dir` is refused)."""
    router = APIRouter()
    root = static_dir.resolve()

    @router.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(root / "index.html", media_type="text/html", headers=NO_CACHE)

    @router.get("/static/{file_path:path}", include_in_schema=False)
    def static_file(file_path: str) -> FileResponse:
        try:
            path = (root / file_path).resolve()
            found = path.is_relative_to(root) and path.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            found = False
        if not found:
            raise HTTPException(status_code=404, detail="not found")
        return FileResponse(path, headers=NO_CACHE)

    return router
