"""The fields of a request (from the page or the API), checked and turned into a `Job` for the batcher.

Every check is the library's own (`Lumina.sampling_settings`, `Lumina.answer_header`, `Lumina.prompt_ids`,
`check_seed`), run before the job is queued, so a bad request fails alone with its `InferenceError` message
and never takes a batch down with it. The only limits added here are the server's own: images per request,
prompt length in characters, and input image files.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from PIL import Image

from lumina_jax.inference import DEMO_CFG_MIN_P, IMAGE_PLACEHOLDER, InferenceError, Lumina, check_seed, parse_size
from lumina_jax.sampling.generate import PROMPT_BUCKET
from lumina_jax.serve.batching import Job, Settings
from lumina_jax.tasks import TASKS, get_task
from lumina_jax.unirep import best_crop_size

MAX_IMAGES = 8  # images per request
MAX_PROMPT_CHARS = 2000  # characters of one prompt or chat message
TEXT_TOKENS = 256  # length limit of a text answer (chat, understanding), and of text after a generated image
MAX_INPUT_PIXELS = 4096 * 4096  # larger uploads are refused before decoding
OMNI_TASKS = tuple(name for name, t in TASKS.items() if t.input_images == 1 and name != "describe")


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Text-to-image values the page shows and the API uses for fields left out."""

    size: str  # "WxH"
    guidance: float
    guidance_floor: float
    image_top_k: int


def defaults_for(lm: Lumina, demo: bool) -> Defaults:
    """The largest square size and the t2i preset's sampling values; for the shipped demo model, the settings
    of `make demo` (guidance 3, floor 0.05, image top-k 16), with which it draws what the prompt asks."""
    w, h = best_crop_size(1, 1, lm.crop_sizes)
    if demo:
        return Defaults(f"{w}x{h}", 3.0, DEMO_CFG_MIN_P, 16)
    t2i = get_task("t2i")
    return Defaults(f"{w}x{h}", t2i.guidance, 0.0, t2i.image_top_k)


def size_choices(lm: Lumina) -> list[str]:
    """The model's crop list as "WxH" strings (widest first)."""
    return [f"{w}x{h}" for w, h in lm.crop_sizes]


def _check_count(num_images: Any) -> int:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES:
        raise InferenceError(f"number of images must be an integer from 1 to {MAX_IMAGES}, got {num_images!r}")
    return num_images


def _check_text(text: Any, what: str = "prompt") -> str:
    if not isinstance(text, str):
        raise InferenceError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise InferenceError(f"{what} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return text


def _size(size: Any) -> Optional[tuple[int, int]]:
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "auto")):
        return None
    return parse_size(size)


def _job(lm: Lumina, task: str, prompt: Any, images: Sequence[Image.Image], size, seed, num_images,
         max_new_tokens: int, **sampling) -> Job:
    """Runs the library's checks in the order a user fixes them and builds the job (its group key included)."""
    num_images = _check_count(num_images)
    seed = check_seed(seed, num_images)
    header = lm.answer_header(task, size)  # an off-list size fails here, naming the closest sizes
    settings = lm.sampling_settings(task, max_new_tokens=max_new_tokens, **sampling)
    ids = lm.prompt_ids(prompt, task, images, size)  # an empty prompt or a wrong image count fails here
    width = -(-(len(ids) + len(header)) // PROMPT_BUCKET) * PROMPT_BUCKET
    key = Settings(task=task, size=size, guidance=settings.cfg_scale, guidance_floor=settings.cfg_min_p,
                   image_top_k=settings.image_top_k, text_top_k=settings.text_top_k,
                   temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=max_new_tokens,
                   prompt_width=width)
    return Job(prompt=prompt, images=list(images), seed=seed, num_images=num_images, settings=key)


def t2i_job(lm: Lumina, defaults: Defaults, prompt: Any, size: Any = None, guidance: Any = None,
            guidance_floor: Any = None, image_top_k: Any = None, seed: Any = 0, num_images: Any = 1) -> Job:
    """Text to image at a size of the crop list (fields left as None take `defaults`); the answer's length
    limit is exactly the image plus end of turn."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    prompt = _check_text(prompt)
    size = _size(pick(size, defaults.size))
    guidance, guidance_floor = pick(guidance, defaults.guidance), pick(guidance_floor, defaults.guidance_floor)
    image_top_k = pick(image_top_k, defaults.image_top_k)
    if size is None:
        raise InferenceError("size is required for text to image (WIDTHxHEIGHT from the crop list)")
    return _job(lm, "t2i", prompt, [], size, seed, num_images, _answer_limit(lm, "t2i", size), guidance=guidance,
                cfg_min_p=guidance_floor, image_top_k=image_top_k)


def image_job(lm: Lumina, task: str, image: Image.Image, prompt: Any = "", size: Any = None, seed: Any = 0) -> Job:
    """One of the Omni tasks on one input image, with the task preset's sampling values."""
    if task not in OMNI_TASKS:
        raise InferenceError(f"task {task!r} is not an image-to-image task; choose one of {', '.join(OMNI_TASKS)}")
    prompt = _check_text(prompt or "")
    size = _size(size)
    return _job(lm, task, prompt, [image], size, seed, 1, _answer_limit(lm, task, size))


def chat_job(lm: Lumina, history: Sequence[tuple[str, str]], history_images: Sequence[Image.Image], text: Any,
             images: Sequence[Image.Image], seed: Any = 0) -> Job:
    """The next chat turn: earlier (question, answer) turns with their images, then the new message, whose
    images are appended as <|image|> markers after its text."""
    text = _check_text(text or "", "message")
    if not text.strip() and not images:
        raise InferenceError("the message is empty: type some text or attach an image")
    question = " ".join([text.strip()] + [IMAGE_PLACEHOLDER] * len(images)).strip()
    turns = [tuple(t) for t in history] + [(question, None)]
    return _job(lm, "chat", turns, list(history_images) + list(images), None, seed, 1,
                _answer_limit(lm, "chat", None))


def _answer_limit(lm: Lumina, task: str, size) -> int:
    """Length limit of an answer: exactly its image and end of turn when the answer is an image of a known
    size; else room for an image of the longest crop size plus `TEXT_TOKENS` of text."""
    if get_task(task).answer_is_image and size is not None:
        return lm.expected_new_tokens(size, len(lm.answer_header(task, size)), 2**31)
    return lm.expected_new_tokens(None, 1, 2**31) + TEXT_TOKENS


def load_image(path: str | os.PathLike, name: str | None = None) -> Image.Image:
    """An uploaded file as an RGB(A) PIL image; InferenceError naming the file when it is not an image."""
    name = name or os.path.basename(str(path))
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise InferenceError(f"{name}: {im.width}x{im.height} pixels is too large "
                                     f"(at most {MAX_INPUT_PIXELS} pixels)")
            im.load()
            return im.copy()
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise InferenceError(f"{name}: not an image file PIL can read ({type(e).__name__})") from None
