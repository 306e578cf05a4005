"""Serve a model directory as a web page (text to image, image to image, chat) and an HTTP API.

    python -m lumina_jax.serve                              # the shipped demo model on http://127.0.0.1:7860
    python -m lumina_jax.serve --checkpoint ckpts/lumina-7b-768 --mesh tensor=8 --max-batch 16

Requests that arrive within --max-wait-ms of each other and share their settings are decoded together in
one batch of up to --max-batch images; each still gets exactly the images its own seed gives alone.
API: POST /api/t2i (JSON in, PNG or base64 out), GET /api/info; see docs/serving.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from lumina_jax.inference import DEFAULT_CHECKPOINT, InferenceError, Lumina, add_placement_flags
from lumina_jax.serve import forms
from lumina_jax.serve.batching import Batcher
from lumina_jax.serve.service import Service
from lumina_jax.validation import float_flag, int_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="assembled model directory (lumina.json, decoder/, vqgan/, tokenizer/); default: the shipped "
                        "demo model lumina_jax/demo_weights, with its demo settings as the page's defaults")
    add_placement_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int_flag(0, 65535), default=7860, help="TCP port, 0..65535 (default 7860)")
    p.add_argument("--max-batch", type=int_flag(1), default=8,
                   help="images decoded together in one generate call (default 8). Every call runs this many rows "
                        "(padded), so results do not depend on what shares a batch; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float_flag(0.0), default=50.0,
                   help="how long the oldest waiting request may wait for others to join its batch (default 50)")
    p.add_argument("--warm-up", action="store_true",
                   help="compile the decode program of the default text-to-image settings before serving "
                        "(a slower start instead of a pause on the first request)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="server log level (default warning; info also logs every HTTP request)")
    return p


def _stop(signum, frame):
    raise SystemExit(0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn  # the [serve] extra: only the server needs it

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lm = Lumina.load(Path(args.checkpoint or DEFAULT_CHECKPOINT), mesh=args.mesh, rules=args.rules,
                         dtype=args.dtype, quantize=args.quantize, kv_cache=args.kv_cache)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    work_dir = Path(tempfile.mkdtemp(prefix="lumina-serve-"))
    # Gradio keeps the files it serves in its cache: inside the work folder, so nothing outlives the server
    os.environ.setdefault("GRADIO_TEMP_DIR", str(work_dir / "gradio"))
    from lumina_jax.serve.app import build_app  # imports gradio, which reads GRADIO_TEMP_DIR once

    defaults = forms.defaults_for(lm, demo=args.checkpoint is None)
    batcher = Batcher(lm, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    service = Service(lm, batcher, defaults, str(args.checkpoint or "demo model (lumina_jax/demo_weights)"))
    # SIGTERM as an exception, so the finally block below runs. uvicorn shuts down on SIGINT / SIGTERM, then
    # raises the signal again under the handler it found: this one (SIGINT: KeyboardInterrupt)
    signal.signal(signal.SIGTERM, _stop)
    try:
        if args.warm_up:
            print("warming up: compiling the default text-to-image program ...", file=sys.stderr, flush=True)
            service.run(forms.t2i_job(lm, defaults, "warm-up"))
        base = f"http://{args.host}:{args.port}"
        app = build_app(service, work_dir / "answers", base)
        print(f"serving {service.checkpoint} on {base} (max batch {args.max_batch}, max wait {args.max_wait_ms:g} "
              "ms); Ctrl-C stops", file=sys.stderr, flush=True)
        # open streams (a page left open, an API client) would otherwise hold the shutdown forever
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        pass
    finally:
        batcher.close()
        shutil.rmtree(work_dir, ignore_errors=True)  # the page's answers and Gradio's copies of them
    return 0


if __name__ == "__main__":
    sys.exit(main())
