"""The HTTP API beside the page: text to image, PNG or base64 out, and the model's sizes and defaults.

    POST /api/t2i   {"prompt": "...", "size": "128x128", "guidance": 3, "guidance_floor": 0.05,
                     "image_top_k": 16, "seed": 0, "num_images": 1, "format": "png" | "base64"}
    GET  /api/info  checkpoint, crop sizes, defaults, limits, requests and generate calls served so far

Fields left out take the page's defaults. A bad request gets a 4xx with {"error": "one line"}: 400 for a
value the model refuses (the library's `InferenceError` message), 422 for a wrong type or unknown field.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import logging
from typing import Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from lumina_jax.inference import InferenceError
from lumina_jax.serve import forms
from lumina_jax.serve.service import Service

log = logging.getLogger(__name__)


class T2IRequest(BaseModel):
    """Body of POST /api/t2i (the same fields as the page's text-to-image form)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    size: Optional[str] = None  # "WxH" from the crop list (GET /api/info); default: the largest square
    guidance: Optional[float] = None
    guidance_floor: Optional[float] = None
    image_top_k: Optional[int] = None
    seed: int = 0  # image j uses seed + j
    num_images: int = 1
    format: Literal["png", "base64"] = "png"  # png: the image itself (num_images 1); base64: JSON


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def add_routes(app: FastAPI, service: Service) -> None:
    """Adds /api/t2i, /api/info and the one-line 422 answer for malformed bodies to `app`."""

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        where = lambda loc: ".".join(p for p in loc[1:] if isinstance(p, str)) or "body"  # noqa: E731
        parts = [f"{where(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return _error(422, "; ".join(parts))

    @app.get("/api/info")
    def info():
        return {"checkpoint": service.checkpoint, "target_size": service.lm.target_size,
                "sizes": forms.size_choices(service.lm), "defaults": dataclasses.asdict(service.defaults),
                "max_images": forms.MAX_IMAGES, "max_batch": service.batcher.max_batch,
                "served": {"requests": service.batcher.jobs, "generate_calls": service.batcher.calls}}

    @app.post("/api/t2i")
    def t2i(body: T2IRequest):
        try:
            if body.format == "png" and body.num_images != 1:
                raise InferenceError(f"format png returns one image; use format base64 for num_images "
                                     f"{body.num_images}")
            job = forms.t2i_job(service.lm, service.defaults, body.prompt, body.size, body.guidance,
                                body.guidance_floor, body.image_top_k, body.seed, body.num_images)
            results = service.run(job)
        except InferenceError as e:
            return _error(400, str(e))
        except Exception:  # noqa: BLE001 - logged here; the client gets one line, never a trace
            log.exception("text to image failed")
            return _error(500, "internal error while generating (see the server log)")
        if any(not r.images or isinstance(im, str) for r in results for im in r.images):
            return _error(500, "the model produced no valid image for this request")
        if body.format == "png":
            r = results[0]
            return Response(_png(r.images[0]), media_type="image/png", headers={"X-Seed": str(r.seed)})
        return {"results": [{**r.to_json(), "png_base64": [base64.b64encode(_png(im)).decode("ascii")
                                                           for im in r.images]} for r in results]}
