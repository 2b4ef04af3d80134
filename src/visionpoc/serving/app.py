"""The web service: a FastAPI app over a `Predictor` (the run's models, loaded once at start-up).

Endpoints: `POST /predict` (multipart field `file`; each model's top-k and inference latency, and with
`explain=true` a PNG overlay per model), `GET /health`, `GET /` (the self-contained demo page),
`GET /openapi.json` and `GET /docs` (Swagger UI, with its JS and CSS served from here when the
`fastapi-offline` package is installed, from a CDN otherwise).

Safety: binds to 127.0.0.1 unless told otherwise (and warns when told); uploads stay in memory and are
capped in bytes (Content-Length and the bytes actually read), in declared pixels and in aspect ratio
(both checked on the image header, before decoding); no request names a server path. Decoding and
inference run in the thread pool so the event loop keeps serving, at most `MAX_CONCURRENT_PREDICTIONS`
uploads at a time (each decoded image may take up to 192 MB); the `Predictor` locks each model around
its forward pass.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import ipaddress
import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from visionpoc import __version__
from visionpoc.errors import VisionpocError
from visionpoc.serving.page import CSP, PAGE
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
# each, are already read). Bounds the memory of decoded images (<= 192 MB each at the pixel cap).
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


def create_app(
    run_dir: str | Path,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    predictor: Predictor | None = None,
    max_concurrent: int = MAX_CONCURRENT_PREDICTIONS,
) -> FastAPI:
    """The service for the run in `run_dir`; its models load now, once. Uploads over `max_upload_bytes`
    or declaring more than `max_pixels` pixels are refused (413); at most `max_concurrent` uploads are
    decoded and predicted at a time."""
    predictor = predictor or Predictor(run_dir, device=device)
    # /docs is FastAPI's Swagger UI. Its JS and CSS come from the fastapi-offline package when it is
    # installed (works offline); otherwise from FastAPI's default CDN (the page is blank offline, while
    # /openapi.json always works).
    assets = swagger_assets()
    app = FastAPI(
        title="visionpoc: which dog breed?",
        version=__version__,
        description=f"The models of run `{Path(run_dir).name}`: {', '.join(predictor.labels)}.",
        redoc_url=None,
        docs_url=None if assets else "/docs",
    )
    app.state.predictor = predictor
    app.state.max_upload_bytes = max_upload_bytes
    busy = threading.BoundedSemaphore(max_concurrent)  # a thread lock: the thread pool waits on it

    @app.exception_handler(UploadError)
    async def refused(_request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, the loaded models and the number of classes."""
        return {"status": "ok", "models": predictor.labels, "num_classes": len(predictor.class_names)}

    def answer(body: bytes, content_type: str | None, top: int, explain: bool) -> dict[str, Any]:
        """Take the file out of the form, check it, decode it and predict: blocking, so it runs in the
        thread pool, `max_concurrent` at a time."""
        with busy:
            data = multipart_file(body, content_type)
            if len(data) > max_upload_bytes:
                raise UploadError(
                    413,
                    f"upload too large: {human_size(len(data))}, the limit is {human_size(max_upload_bytes)}",
                )
            image = decode_image(data, max_pixels)
            answers = predictor.predict_image(image, top)
            if explain:
                overlays = predictor.explain_image(image)
                for a in answers:
                    if a["model"] in overlays:
                        method, picture = overlays[a["model"]]
                        a["explanation"] = {"method": method, "png_base64": _png_base64(picture)}
            return {"width": image.width, "height": image.height, "models": answers}

    @app.post("/predict", openapi_extra=_UPLOAD_SCHEMA)
    async def predict(
        request: Request,
        top: int = Query(5, ge=1, le=1000, description="how many classes per model"),
        explain: bool = Query(False, description="add each model's explanation overlay (base64 PNG)"),
    ) -> dict[str, Any]:
        """Each model's top-k (label, probability) for the uploaded photo, and its inference latency."""
        length = request.headers.get("content-length")
        body = await read_limited(request.stream(), max_upload_bytes, length, overhead=MULTIPART_OVERHEAD)
        return await run_in_threadpool(answer, body, request.headers.get("content-type"), top, explain)

    if assets:

        @app.get("/docs", include_in_schema=False)
        def docs() -> HTMLResponse:
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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10, device: str = "cpu"
) -> None:
    """Run the service with uvicorn until interrupted (one process: the models are loaded once)."""
    import uvicorn

    if not is_loopback(host):
        log.warning(
            "binding to %s: the service is reachable from other machines, without authentication or TLS; "
            "use --host 127.0.0.1 unless that is what you want",
            host,
        )
    app = create_app(run_dir, max_upload_bytes=int(max_upload_mb * 2**20), device=device)
    log.info("serving %s on http://%s:%d/ (docs: /docs, API schema: /openapi.json)", run_dir, host, port)
    try:
        uvicorn.run(app, host=host, port=port, server_header=False, timeout_keep_alive=5)
    except SystemExit as e:  # uvicorn exits (code 3) when it cannot start, e.g. the port is taken
        if e.code in (0, None):
            raise
        raise VisionpocError(
            f"the web service could not start on {host}:{port} (see the error above: a port already in use "
            "or not allowed?); choose another with --port"
        ) from None
