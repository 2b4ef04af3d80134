"""The web service: a FastAPI app over a `Predictor` (the run's models, loaded once at start-up).

Endpoints: `POST /predict` (multipart field `file`; each model's top-k and inference latency, and with
`explain=true` a PNG overlay per model), `GET /health`, `GET /` (the self-contained demo page),
`GET /openapi.json` and `GET /docs`.

Safety: binds to 127.0.0.1 unless told otherwise (and warns when told); uploads stay in memory and are
capped in bytes (Content-Length and the bytes actually read) and in declared pixels (checked on the
image header, before decoding); no request names a server path. Decoding and inference run in the
thread pool so the event loop keeps serving; the `Predictor` locks each model around its forward pass.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from visionpoc import __version__
from visionpoc.demo_page import CSP, PAGE
from visionpoc.predict import Predictor
from visionpoc.uploads import (
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


def create_app(run_dir: str | Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, device: str = "cpu",
               predictor: Predictor | None = None) -> FastAPI:  # fmt: skip
    """The service for the run in `run_dir`; its models load now, once. Uploads over `max_upload_bytes`
    or declaring more than `max_pixels` pixels are refused (413)."""
    predictor = predictor or Predictor(run_dir, device=device)
    # /docs is FastAPI's Swagger UI: the HTML is served from here (200) but its JS and CSS come from a
    # CDN (cdn.jsdelivr.net), so the interactive UI needs internet access; /openapi.json is local.
    app = FastAPI(
        title="visionpoc: which dog breed?",
        version=__version__,
        description=f"The models of run `{Path(run_dir).name}`: {', '.join(predictor.labels)}.",
        redoc_url=None,
    )
    app.state.predictor = predictor

    @app.exception_handler(UploadError)
    async def refused(_request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, the loaded models and the number of classes."""
        return {"status": "ok", "models": predictor.labels, "num_classes": len(predictor.class_names)}

    def answer(body: bytes, content_type: str | None, top: int, explain: bool) -> dict[str, Any]:
        """Take the file out of the form, check it, decode it and predict: blocking, so it runs in the
        thread pool."""
        data = multipart_file(body, content_type)
        if len(data) > max_upload_bytes:
            raise UploadError(
                413, f"upload too large: {human_size(len(data))}, the limit is {human_size(max_upload_bytes)}"
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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(
            PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
        )

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          device: str = "cpu") -> None:  # fmt: skip
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
    uvicorn.run(app, host=host, port=port, server_header=False, timeout_keep_alive=5)
