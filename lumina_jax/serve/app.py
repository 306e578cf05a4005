"""One ASGI app: the API routes first, the Gradio page mounted at the root."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from lumina_jax.serve.api import add_routes
from lumina_jax.serve.page import TITLE, Outputs, build_page
from lumina_jax.serve.service import Service


def build_app(service: Service, work_dir: Path, api_base: str) -> FastAPI:
    """The server's app; `work_dir` receives each page answer's PNGs and JSON (served for download)."""
    app = FastAPI(title=TITLE, docs_url=None, redoc_url=None, openapi_url=None)
    add_routes(app, service)
    page = build_page(service, Outputs(work_dir), api_base)
    # show_error=False: an unexpected failure shows a plain "Error" (and is logged); refusals are gr.Error lines
    return gr.mount_gradio_app(app, page, path="/", show_error=False, allowed_paths=[str(work_dir)],
                               footer_links=["api"])
