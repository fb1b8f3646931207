"""The explorer's web app (FastAPI): the page, its assets, dashboard pages and the JSON API.

Routes: ``GET /`` the page; ``GET /static/...`` its script and style (package data);
``GET /dashboards/<layer>/...`` the dashboard folder given for a layer; ``GET /api/info``;
``POST /api/run``; ``POST /api/feature``; ``POST /api/ablate``; ``GET /api/openapi.json`` the
API's schema. Every error is JSON ``{"error": ..., "kind": ...}`` (``schemas.ErrorResponse``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sae_lens_attn import __version__
from sae_lens_attn.explorer.anyio_compat import prepare_anyio
from sae_lens_attn.explorer.schemas import (
    AblateRequest,
    AblateResponse,
    ErrorResponse,
    FeatureRequest,
    FeatureResponse,
    InfoResponse,
    RunRequest,
    RunResponse,
)
from sae_lens_attn.explorer.session import ExplorerSession, ModelFailed, RequestRefused

ASSETS = Path(str(files("sae_lens_attn.explorer") / "assets"))
"""The page, its script and its style."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
"""Host names a loopback server answers to (other Host headers are refused: DNS rebinding)."""
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page's Content-Security-Policy: it loads and contacts nothing but this server."""
ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
"""``kind`` of the HTTP errors the framework raises."""


def create_app(session: ExplorerSession, *, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The explorer app serving ``session``.

    Args:
        session: the model and SAEs to explore.
        allowed_hosts: ``Host`` header values accepted (default: ``LOOPBACK_HOSTS``; ``["*"]``
            accepts any, for a server bound to another interface).
    """
    prepare_anyio()
    app = FastAPI(
        title="sae-lens-attn prompt explorer",
        version=__version__,
        description="Run prompts through a model and its attention SAEs; see each feature's "
        "direct feature attribution (DFA) by source position and by head.",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI and ReDoc load scripts from CDNs
        redoc_url=None,
    )
    _add_error_handlers(app)
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 413, 422, 500)
    }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = (ASSETS / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/api/info", response_model=InfoResponse)
    def info() -> InfoResponse:
        """The model, the loaded layers and their SAEs, and the limits."""
        return session.info()

    @app.post("/api/run", response_model=RunResponse, responses=responses)
    def run(request: RunRequest) -> Response:
        """Tokenize the prompt (BOS first) and list each layer's top features per position."""
        return _json(session.run(request.prompt))

    @app.post("/api/feature", response_model=FeatureResponse, responses=responses)
    def feature(request: FeatureRequest) -> Response:
        """DFA of one feature at one position, by source position and by head, with its logit
        effects, family and dashboard link."""
        return _json(
            session.feature(request.prompt, request.layer, request.feature, request.position)
        )

    @app.post("/api/ablate", response_model=AblateResponse, responses=responses)
    def ablate(request: AblateRequest) -> Response:
        """The top logits at one position before and after zero-ablating one feature there
        (the SAE spliced, its error term kept)."""
        return _json(
            session.ablate(
                request.prompt, request.layer, request.feature, request.position, request.k
            )
        )

    app.mount("/static", StaticFiles(directory=ASSETS), name="static")
    for layer, folder in session.dashboards.items():
        app.mount(f"/dashboards/{layer}", StaticFiles(directory=folder), name=f"dashboards-{layer}")
    app.add_middleware(BodyLimit, max_bytes=session.max_body_bytes)
    app.add_middleware(
        TrustedHostMiddleware,
        allowed_hosts=list(LOOPBACK_HOSTS) if allowed_hosts is None else allowed_hosts,
    )
    return app


def _json(answer: BaseModel) -> Response:
    """``answer`` as JSON, serialized once (the session built it validated; FastAPI would
    validate it again)."""
    return Response(answer.model_dump_json(), media_type="application/json")


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, kind=kind).model_dump(), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestRefused)
    async def refused(_request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestRefused)
        return _error(422, err.kind, str(err))

    @app.exception_handler(ModelFailed)
    async def model_failed(_request: Request, err: Exception) -> JSONResponse:
        return _error(500, "model_error", str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        problems = list(err.errors())
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = next(p for p in problems if p.get("type") == "json_invalid")
            return _error(
                400,
                "invalid_json",
                f"the request body is not valid JSON ({detail.get('ctx', {}).get('error', '')}); "
                'send a JSON object such as {"prompt": "..."}',
            )
        return _error(422, "invalid_request", "; ".join(_describe(p) for p in problems))

    @app.exception_handler(Exception)
    async def crashed(_request: Request, err: Exception) -> JSONResponse:
        return _error(500, "internal_error", f"the server failed: {type(err).__name__}: {err}")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        return _error(err.status_code, ERRORS.get(err.status_code, "http_error"), str(err.detail))


def _describe(problem: Any) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
    given = problem.get("input")
    shown = "" if problem.get("type") == "missing" else f" (got {given!r:.80})"
    return f"{where}: {problem.get('msg', 'invalid')}{shown}"


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, whether or not the
    client declares their length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than the {self.max_bytes} bytes this server accepts"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = _error(413, "body_too_large", message)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > self.max_bytes:  # a streamed body: the route's reading fails
                raise HTTPException(413, detail=message)
            return message_in

        await self.app(scope, limited_receive, send)
