"""The Gradio page: text to image, the Omni image-to-image presets, and multi-turn chat with images.

Each form builds a job with `forms` (the library's checks) and waits for it through `Service.run`, which
feeds the progress bar with the tokens decoded toward what the answer needs. A refused value raises
`gr.Error` with the library's one-line message; the page shows it and keeps working.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from pathlib import Path
from typing import Callable

import gradio as gr

from lumina_jax.inference import IMAGE_PLACEHOLDER, InferenceError, Lumina, Result
from lumina_jax.serve import forms
from lumina_jax.serve.service import Service

TITLE = "Lumina-mGPT (JAX)"


@dataclasses.dataclass
class Conversation:
    """A chat so far: (question, answer) turns with <|image|> markers, their images in order, and the
    messages as the chat box shows them."""

    turns: list = dataclasses.field(default_factory=list)
    images: list = dataclasses.field(default_factory=list)
    messages: list = dataclasses.field(default_factory=list)


class Outputs:
    """Numbered folders for each answer's PNGs and settings JSON, under one directory of the server's."""

    def __init__(self, root: Path):
        self.root, self._count, self._lock = Path(root), itertools.count(), threading.Lock()

    def save(self, results: list[Result], form: dict) -> list[Path]:
        with self._lock:
            out = self.root / f"{next(self._count):06d}"
        return Lumina.save(results, out, run_info={"form": form})


def _progress_reporter(progress: gr.Progress) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if total:
            progress((done, total), desc="decoding", unit="tokens")
        else:
            progress(0.0, desc="waiting for the model")
    return report


def _refusal(e: InferenceError) -> gr.Error:
    """The page's message for a refused request: stays until closed; not logged (the server did nothing wrong)."""
    return gr.Error(str(e), duration=None, print_exception=False)


def _answer(service: Service, job, progress: gr.Progress) -> list[Result]:
    try:
        return service.run(job, _progress_reporter(progress))
    except InferenceError as e:
        raise _refusal(e) from None


def _images(paths: list[Path]) -> list[tuple[str, str]]:
    return [(str(p), p.stem) for p in paths if p.suffix == ".png"]


def build_page(service: Service, outputs: Outputs, api_base: str) -> gr.Blocks:
    """The three tabs plus a short API note; `api_base` (e.g. http://127.0.0.1:7860) goes into the example."""
    lm, d = service.lm, service.defaults
    sizes = forms.size_choices(lm)

    def text_to_image(prompt, size, guidance, floor, top_k, seed, num_images, progress=gr.Progress()):
        try:
            whole = isinstance(num_images, float) and num_images.is_integer()  # a slider may send 2.0
            job = forms.t2i_job(lm, d, prompt, size, guidance, floor, top_k, seed,
                                int(num_images) if whole else num_images)
        except InferenceError as e:
            raise _refusal(e) from None
        results = _answer(service, job, progress)
        form = {"prompt": prompt, "size": size, "guidance": guidance, "guidance_floor": floor,
                "image_top_k": top_k, "seed": seed, "num_images": num_images}
        paths = outputs.save(results, form)
        settings = {**results[0].settings, "seeds": [r.seed for r in results]}
        return _images(paths), [str(p) for p in paths], settings

    def image_to_image(task, upload, prompt, size, seed, progress=gr.Progress()):
        try:
            if not upload:
                raise InferenceError("upload an input image first")
            job = forms.image_job(lm, task, forms.load_image(upload), prompt, size, seed)
        except InferenceError as e:
            raise _refusal(e) from None
        results = _answer(service, job, progress)
        paths = outputs.save(results, {"task": task, "prompt": prompt, "size": size, "seed": seed})
        text = " ".join(part.strip() for part in results[0].text.split(IMAGE_PLACEHOLDER)).strip()
        return _images(paths), text, [str(p) for p in paths]

    def chat(message, conv: Conversation, seed, progress=gr.Progress()):
        message = message or {}
        text, files = message.get("text", ""), list(message.get("files") or [])
        try:
            images = [forms.load_image(f) for f in files]
            job = forms.chat_job(lm, conv.turns, conv.images, text, images, seed)
        except InferenceError as e:
            raise _refusal(e) from None
        r = _answer(service, job, progress)[0]
        paths = [p for p in outputs.save([r], {"message": text, "seed": seed}) if p.suffix == ".png"]
        answer_images = [im for im in r.images if not isinstance(im, str)]
        shown = [{"role": "user", "content": t} for t in [text] if t.strip()]
        shown += [{"role": "user", "content": {"path": str(f)}} for f in files]
        parts = r.text.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            if part.strip():
                shown.append({"role": "assistant", "content": part.strip()})
            if k < len(parts) - 1 and k < len(paths):
                shown.append({"role": "assistant", "content": {"path": str(paths[k])}})
        conv = Conversation(conv.turns + [(job.prompt[-1][0], r.text)], conv.images + images + answer_images,
                            conv.messages + shown)
        return conv, conv.messages, None

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"# {TITLE}\nModel `{service.checkpoint}`: target size {lm.target_size}, "
                    f"{len(sizes)} image sizes. Requests that arrive together share one decode batch.")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, max_length=forms.MAX_PROMPT_CHARS,
                                        placeholder="a red circle on a blue background", elem_id="t2i-prompt")
                    size = gr.Dropdown(sizes, value=d.size, label="Size (width x height, from the crop list)",
                                       allow_custom_value=True, elem_id="t2i-size")
                    with gr.Row():
                        guidance = gr.Number(d.guidance, label="Guidance (1 = off)", elem_id="t2i-guidance")
                        floor = gr.Number(d.guidance_floor, label="Guidance floor (0 = off)", elem_id="t2i-floor")
                        top_k = gr.Number(d.image_top_k, label="Image top-k", precision=0, elem_id="t2i-top-k")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed (image j: seed + j)", precision=0, elem_id="t2i-seed")
                        count = gr.Slider(1, forms.MAX_IMAGES, value=1, step=1, label="Number of images",
                                          elem_id="t2i-count")
                    run = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", format="png", columns=2, fit_columns=False, height=300,
                                         elem_id="t2i-gallery")
                    files = gr.File(label="Downloads: PNGs and settings JSON", file_count="multiple",
                                    elem_id="t2i-files")
                    with gr.Accordion("Settings used", open=False):
                        settings = gr.JSON(label="Settings", elem_id="t2i-settings")
            run.click(text_to_image, [prompt, size, guidance, floor, top_k, seed, count], [gallery, files, settings],
                      concurrency_limit=None, api_name="text_to_image")
        with gr.Tab("Image to image"):
            with gr.Row():
                with gr.Column():
                    task = gr.Dropdown(list(forms.OMNI_TASKS), value=forms.OMNI_TASKS[0], label="Task",
                                       elem_id="i2i-task")
                    upload = gr.File(label="Input image", file_types=["image"], type="filepath",
                                     elem_id="i2i-image")
                    i2i_prompt = gr.Textbox(label="Text (editing, detection, condition-to-image)",
                                            max_length=forms.MAX_PROMPT_CHARS, elem_id="i2i-prompt")
                    i2i_size = gr.Dropdown(["auto"] + sizes, value="auto", label="Output size (auto: sampled)",
                                           elem_id="i2i-size")
                    i2i_seed = gr.Number(0, label="Seed", precision=0, elem_id="i2i-seed")
                    i2i_run = gr.Button("Run", variant="primary", elem_id="i2i-run")
                with gr.Column():
                    i2i_gallery = gr.Gallery(label="Images", format="png", columns=2, fit_columns=False, height=300,
                                             elem_id="i2i-gallery")
                    i2i_text = gr.Textbox(label="Text answer", elem_id="i2i-text")
                    i2i_files = gr.File(label="Downloads", file_count="multiple", elem_id="i2i-files")
            i2i_run.click(image_to_image, [task, upload, i2i_prompt, i2i_size, i2i_seed],
                          [i2i_gallery, i2i_text, i2i_files], concurrency_limit=None, api_name="image_to_image")
        with gr.Tab("Chat"):
            conv = gr.State(Conversation())
            chatbox = gr.Chatbot(label="Chat", height=420, elem_id="chat-box")
            message = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", label="Message",
                                           placeholder="Message; attach images with the clip", elem_id="chat-input")
            with gr.Row():
                chat_seed = gr.Number(0, label="Seed", precision=0, elem_id="chat-seed")
                clear = gr.Button("New conversation", elem_id="chat-clear")
            message.submit(chat, [message, conv, chat_seed], [conv, chatbox, message], concurrency_limit=None,
                           api_name="chat")
            clear.click(lambda: (Conversation(), []), None, [conv, chatbox], api_name=False)
        with gr.Tab("API"):
            example = json.dumps({"prompt": "a red circle on a blue background", "size": d.size, "seed": 0})
            gr.Markdown(f"POST JSON to `{api_base}/api/t2i` for a PNG (or `\"format\": \"base64\"` for JSON); "
                        f"`GET {api_base}/api/info` lists the sizes and defaults.\n\n"
                        f"```bash\ncurl -s -X POST {api_base}/api/t2i -H 'Content-Type: application/json' "
                        f"-d '{example}' -o image.png\n```")
    page.queue(default_concurrency_limit=None)
    return page
