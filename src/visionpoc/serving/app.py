"""The web service: a FastAPI app over a `Predictor` (the run's models, loaded once at start-up).

Endpoints: `POST /predict` (multipart field `file`; each model's top-k and inference latency, and with
`explain=true` a PNG overlay per model), `GET /health`, `GET /` (the self-contained demo page),
`GET /openapi.json` and `GET /docs` (Swagger UI, with its JS and CSS served from here when the
`fastapi-offline` package is installed, from a CDN otherwise). Each JSON body is a pydantic model
(`PredictResponse`, `HealthResponse`, and `ErrorResponse` for a refused upload), so /openapi.json
describes what the service answers.

Safety: binds to 127.0.0.1 unless told otherwise (and warns when told); uploads stay in memory and are
capped in bytes (Content-Length and the bytes actually read), in declared pixels and in aspect ratio
(both checked on the image header, before decoding); no request names a server path. Decoding and
inference run in the thread pool so the event loop keeps serving, at most `MAX_CONCURRENT_PREDICTIONS`
uploads at a time (decoding one takes at most `DEFAULT_MAX_DECODED_BYTES`, 512 MB; one whose client
hangs up while it waits is dropped); the `Predictor` locks each model around its forward pass.
Load limits (`limits.py`): at most `max_queue` more uploads wait (then 503 with
`Retry-After`), a body must arrive within `body_timeout_s` (else 408, logged as one line), /health and
the page are async and touch nothing blocking (a full queue never delays them), and when `serve` binds to
loopback only loopback Host names are accepted (DNS rebinding; `allowed_hosts` widens it).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from visionpoc import __version__
from visionpoc.errors import VisionpocError
from visionpoc.results import load_results
from visionpoc.serving.limits import (
    BODY_TIMEOUT_S,
    MAX_QUEUED_PREDICTIONS,
    RETRY_AFTER_S,
    Admission,
    is_loopback,
    server_settings,
    trusted_hosts,
)
from visionpoc.serving.page import CSP, PageText, page_text, render_page
from visionpoc.serving.predict import Predictor
from visionpoc.serving.uploads import (
    DEFAULT_MAX_PIXELS,
    MULTIPART_OVERHEAD,
    UploadError,
    decode_image,
    human_size,
    multipart_file,
    read_limited,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
# uploads decoded and predicted at once; the others wait their turn (their bodies, <= the upload limit
# each, are already read). Bounds the memory of decoded images (<= 512 MB each, uploads.DEFAULT_MAX_DECODED_BYTES).
MAX_CONCURRENT_PREDICTIONS = 4
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")  # served by /docs-assets/NAME

_UPLOAD_SCHEMA = {  # the body is parsed by hand (in memory), so FastAPI cannot infer its schema
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "a photo"}},
                }
            }
        },
    }
}


class TopClass(BaseModel):
    """One of a model's top-k classes."""

    label: str = Field(description="the class name")
    index: int = Field(description="the class index, in the order of the run's dataset")
    probability: float = Field(description="the softmax probability, in [0, 1]")


class Explanation(BaseModel):
    """Where a model looked: a heatmap of its predicted class over the crop it saw."""

    method: str = Field(description='"attention rollout" (ViT) or "Grad-CAM" (CNN)')
    png_base64: str = Field(description="the overlay, a base64-encoded PNG at least 224 px on its shorter side")


class ModelPrediction(BaseModel):
    """One model's answer for the uploaded photo."""

    model: str = Field(description="the model's label in the run")
    top: list[TopClass] = Field(description="the top-k classes, most probable first")
    latency_ms: float = Field(description="the forward pass in milliseconds (batch 1, no decoding or preprocessing)")
    # SkipJsonSchema: the key is absent (never null) when there is no explanation
    explanation: Explanation | SkipJsonSchema[None] = Field(
        None, description="only with `explain=true`, and only for models whose explanation succeeded"
    )


class PredictResponse(BaseModel):
    """The answer of `POST /predict`: every model's prediction for one photo."""

    width: int = Field(description="the uploaded image's width in pixels")
    height: int = Field(description="the uploaded image's height in pixels")
    models: list[ModelPrediction] = Field(description="one entry per model, in the run's order")


class HealthResponse(BaseModel):
    """The answer of `GET /health`."""

    status: Literal["ok"] = Field(description="always `ok` when the service answers")
    models: list[str] = Field(description="the labels of the loaded models")
    num_classes: int = Field(description="the number of classes the models choose from")
    title: str = Field(description="the demo page's title (from the run's dataset, or `serve --title`)")


class ErrorResponse(BaseModel):
    """The body of a refused upload (400, 413)."""

    error: str = Field(description="what is wrong with the upload, and how to fix it")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "not a multipart/form-data upload with a `file` field, an invalid Content-Length, "
        "not an image, or too elongated",
    },
    408: {"model": ErrorResponse, "description": "the upload did not arrive within the body timeout"},
    413: {"model": ErrorResponse, "description": "over the upload size limit or the pixel limit"},
    503: {
        "model": ErrorResponse,
        "description": "too many uploads in progress: retry after the `Retry-After` seconds",
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    },
}


def _png_base64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def swagger_assets() -> Path | None:
    """The folder of Swagger UI's JS and CSS bundled by the `fastapi-offline` package, if installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if all((folder / name).is_file() for name in DOCS_ASSETS) else None


@dataclass(frozen=True)
class _Service:
    """What the routes share: the loaded models, the upload limits and the prediction slots."""

    predictor: Predictor
    max_upload_bytes: int  # the file in the form, and (plus MULTIPART_OVERHEAD) the whole body
    max_pixels: int  # the most pixels (width x height) an image header may declare
    slots: threading.BoundedSemaphore  # a thread lock: the thread pool waits on it
    admission: Admission  # the uploads in progress (read, waiting or predicted), bounded
    body_timeout_s: float  # the whole body must arrive within this


def create_app(
    run_dir: str | Path,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    predictor: Predictor | None = None,
    max_concurrent: int = MAX_CONCURRENT_PREDICTIONS,
    title: str | None = None,
    max_queue: int = MAX_QUEUED_PREDICTIONS,
    body_timeout_s: float = BODY_TIMEOUT_S,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The service for the run in `run_dir`; its models load now, once. Uploads over `max_upload_bytes`
    or declaring more than `max_pixels` pixels are refused (413); at most `max_concurrent` uploads are
    decoded and predicted at a time and `max_queue` more wait (beyond: 503); a body slower than
    `body_timeout_s` is a 408. Only `allowed_hosts` Host names are served (400 otherwise; None: any).
    The demo page's title is `title`, else the run's (`page_text`)."""
    predictor = predictor or Predictor(run_dir, device=device)
    text = page_text(load_results(predictor.run_dir).dataset, title)
    # /docs is FastAPI's Swagger UI. Its JS and CSS come from the fastapi-offline package when it is
    # installed (works offline); otherwise from FastAPI's default CDN (the page is blank offline, while
    # /openapi.json always works).
    assets = swagger_assets()
    app = FastAPI(
        title=f"visionpoc: {text.title}",
        version=__version__,
        description=f"The models of run `{Path(run_dir).name}`: {', '.join(predictor.labels)}.",
        redoc_url=None,
        docs_url=None if assets else "/docs",
    )
    app.state.predictor = predictor
    app.state.max_upload_bytes = max_upload_bytes

    @app.exception_handler(UploadError)
    async def refused(_request: Request, exc: UploadError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else {}
        if exc.status in (408, 503):  # the body is left unread: close rather than wait for the rest of it
            headers["Connection"] = "close"
        return JSONResponse(ErrorResponse(error=exc.message).model_dump(), status_code=exc.status, headers=headers)

    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    _add_health(app, predictor, text)
    slots = threading.BoundedSemaphore(max_concurrent)
    app.state.admission = admission = Admission(max_concurrent + max_queue)
    _add_predict(app, _Service(predictor, max_upload_bytes, max_pixels, slots, admission, body_timeout_s))
    if assets:
        _add_offline_docs(app, assets)
    _add_page(app, render_page(text, predictor.labels))
    return app


def _add_health(app: FastAPI, predictor: Predictor, text: PageText) -> None:
    @app.get("/health")
    async def health() -> HealthResponse:  # async and non-blocking: never waits behind predictions
        """Liveness, the loaded models, the number of classes and the demo page's title."""
        return HealthResponse(
            status="ok", models=predictor.labels, num_classes=len(predictor.class_names), title=text.title
        )


def _add_predict(app: FastAPI, service: _Service) -> None:
    # exclude_none: a model without an explanation has no "explanation" key (not a null)
    @app.post("/predict", response_model_exclude_none=True, responses=ERROR_RESPONSES, openapi_extra=_UPLOAD_SCHEMA)
    async def predict(
        request: Request,
        top: int = Query(5, ge=1, le=1000, description="how many classes per model"),
        explain: bool = Query(False, description="add each model's explanation overlay (base64 PNG)"),
    ) -> PredictResponse:
        """Each model's top-k (label, probability) for the uploaded photo, and its inference latency."""
        with service.admission.enter():  # a 503 when the queue is full, before reading the body
            body = await _read_body(request, service)
            gone = threading.Event()  # set if the client hangs up: its queued upload is then never decoded
            watcher = asyncio.create_task(_watch_disconnect(request, gone))
            try:
                ctype = request.headers.get("content-type")
                return await run_in_threadpool(_answer, service, body, ctype, top, explain, gone)
            finally:
                watcher.cancel()


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Set `gone` once the client has hung up (polled: Starlette has no disconnect callback)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    gone.set()


async def _read_body(request: Request, service: _Service) -> bytes:
    """The upload's body, within the size limit and the body deadline; a client that is too slow (408) or
    hangs up mid-body is logged as one line, without a traceback."""
    length = request.headers.get("content-length")
    reading = read_limited(request.stream(), service.max_upload_bytes, length, overhead=MULTIPART_OVERHEAD)
    peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    try:
        return await asyncio.wait_for(reading, service.body_timeout_s)
    except TimeoutError:
        log.warning("upload from %s aborted: its body did not arrive within %g s", peer, service.body_timeout_s)
        raise UploadError(
            408, f"the upload did not arrive within {service.body_timeout_s:g} s: retry on a faster connection"
        ) from None
    except ClientDisconnect:
        log.warning("upload from %s aborted: the client disconnected before sending the whole body", peer)
        raise UploadError(400, "the client disconnected before sending the whole upload") from None


def _answer(
    service: _Service, body: bytes, content_type: str | None, top: int, explain: bool, gone: threading.Event
) -> PredictResponse:
    """Take the file out of the form, check it, decode it and predict: blocking, so it runs in the thread
    pool, as many at a time as `service.slots` allows; skipped once `gone` is set (the client hung up
    while it waited for a slot)."""
    with service.slots:
        if gone.is_set():
            log.info("an upload was dropped: its client disconnected while it waited for a prediction slot")
            raise UploadError(400, "the client disconnected before its upload was decoded")
        data = multipart_file(body, content_type)
        if len(data) > service.max_upload_bytes:
            raise UploadError(
                413,
                f"upload too large: {human_size(len(data))}, the limit is {human_size(service.max_upload_bytes)}",
            )
        image = decode_image(data, service.max_pixels)
        answers = [ModelPrediction.model_validate(a) for a in service.predictor.predict_image(image, top)]
        if explain:
            overlays = service.predictor.explain_image(image)
            for a in answers:
                if a.model in overlays:
                    method, picture = overlays[a.model]
                    a.explanation = Explanation(method=method, png_base64=_png_base64(picture))
        return PredictResponse(width=image.width, height=image.height, models=answers)


def _add_offline_docs(app: FastAPI, assets: Path) -> None:
    """/docs with Swagger UI's JS and CSS served from `assets`, by /docs-assets/NAME."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:  # async: never waits behind predictions
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/docs-assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in DOCS_ASSETS:  # a fixed list: the request names no path on the server
            raise HTTPException(404)
        return FileResponse(assets / name)


def _add_page(app: FastAPI, html: str) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:  # async: a full prediction queue never delays the page
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 10,
    device: str = "cpu",
    title: str | None = None,
    max_queue: int = MAX_QUEUED_PREDICTIONS,
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Run the service with uvicorn until interrupted (one process: the models are loaded once); `title`
    replaces the demo page's title taken from the run. Bound to loopback, it answers only requests whose
    Host is a loopback name or one of `allowed_hosts`; `max_queue` uploads may wait for a prediction slot."""
    import uvicorn

    if not is_loopback(host):
        log.warning(
            "binding to %s: the service is reachable from other machines, without authentication or TLS; "
            "use --host 127.0.0.1 unless that is what you want",
            host,
        )
    hosts = trusted_hosts(host, allowed_hosts)
    app = create_app(
        run_dir,
        max_upload_bytes=int(max_upload_mb * 2**20),
        device=device,
        title=title,
        max_queue=max_queue,
        allowed_hosts=hosts,
    )
    log.info("serving %s on http://%s:%d/ (docs: /docs, API schema: /openapi.json)", run_dir, host, port)
    if hosts is not None:
        log.info("accepting the Host names %s (add one with --allowed-host NAME)", ", ".join(hosts))
    try:
        uvicorn.run(app, host=host, port=port, **server_settings())
    except SystemExit as e:  # uvicorn exits (code 3) when it cannot start, e.g. the port is taken
        if e.code in (0, None):
            raise
        raise VisionpocError(
            f"the web service could not start on {host}:{port} (see the error above: a port already in use "
            "or not allowed?); choose another with --port"
        ) from None
