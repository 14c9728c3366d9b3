"""The ``tomopipe serve`` web application: JSON and images from a project, and the pages.

``create_app(project_folder, token=None)`` builds a Starlette app. Pages are plain HTML + a
little JavaScript from ``tomopipe/serve/static`` (no build step), served from a fixed list of
file names; data are addressed by run / set ids (see ``api_project`` and ``api_viewers``). The
security rules (token, Origin and Host checks) are in ``security``.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project

from . import api_project, api_viewers
from .common import ApiError, json_response
from .jobs import JobQueue
from .security import SecurityMiddleware

#: The pages and their assets: the only files the server ever sends (name -> media type).
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "run.html": "text/html; charset=utf-8",
    "tilt.html": "text/html; charset=utf-8",
    "ctf.html": "text/html; charset=utf-8",
    "tomogram.html": "text/html; charset=utf-8",
    "map.html": "text/html; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "project.js": "text/javascript; charset=utf-8",
    "run.js": "text/javascript; charset=utf-8",
    "tilt.js": "text/javascript; charset=utf-8",
    "ctf.js": "text/javascript; charset=utf-8",
    "tomogram.js": "text/javascript; charset=utf-8",
    "map.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _static_bytes(name: str) -> bytes:
    return (resources.files("tomopipe.serve") / "static" / name).read_bytes()


def static_file(request: Request):
    """A page or asset by name from :data:`STATIC_FILES`; any other name (``..``, a slash, an
    encoded path) is a 404 without touching the file system."""
    name = request.path_params["name"]
    if name not in STATIC_FILES:
        return json_response({"error": f"no page {name!r}"}, status=404)
    return Response(_static_bytes(name), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


def home(request: Request):
    return RedirectResponse("/static/index.html", status_code=307)


async def api_error(request: Request, error: Exception):
    if isinstance(error, ApiError):
        return json_response({"error": str(error), **error.details}, status=error.status)
    return json_response({"error": str(error)}, status=400)


async def http_error(request: Request, error: HTTPException):
    return json_response({"error": error.detail}, status=error.status_code)


def create_app(project_folder: str | Path, token: str | None = None) -> SecurityMiddleware:
    """The web app of the project in ``project_folder``. ``token`` None: only loopback clients and
    loopback Host names are served; otherwise every request must carry ``token``."""
    folder = Path(project_folder).resolve()
    with Project.open(folder):  # a clear error now if this is not a project
        pass
    jobs: JobQueue | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if jobs is not None:
            jobs.close()

    routes = [Route("/", home), Route("/static/{name:str}", static_file),
              *api_project.ROUTES, *api_viewers.ROUTES]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={TomopipeError: api_error, HTTPException: http_error})
    jobs = JobQueue(folder)
    app.state.project_folder = folder
    app.state.jobs = jobs
    app.state.token = token
    secured = SecurityMiddleware(app, token)
    secured.state = app.state
    return secured
