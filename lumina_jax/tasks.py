"""Named prompt presets: text-to-image, image understanding, free chat and the Omni-SFT tasks.

Prompts and defaults are the reference's (docs/reference.md, 'Prompts' and 'Sampling defaults').

A preset turns the user's text (and input images) into the human message the model was trained on, and
carries the reference's sampling defaults for that task. For tasks whose answer is an image the prompt ends
with <racm3:break> (plus the size tokens when a size is requested), i.e. the image is opened for the model
rather than left to its first sampled token (a trained model opens it there anyway). The Omni prompts are the exact strings of the
reference demo (`demos/demo_image2image.py`), misspelling included, followed by " <|image|>".
"""
from __future__ import annotations

import dataclasses
from typing import Optional

IMAGE = "<|image|>"
T2I_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    name: str
    template: str  # human message; {prompt} = user text, {width}/{height} = requested size in px
    input_images: Optional[int]  # images the task takes (None = any number, matched to the placeholders)
    needs_text: bool  # whether the user must give text
    guidance: float  # classifier-free guidance scale default (1 = off)
    image_top_k: int  # image top-k default
    text_top_k: int = 10  # text top-k default
    answer_is_image: bool = False  # the answer opens with an image: the prompt ends with <racm3:break> (and size)
    description: str = ""

    def message(self, prompt: str | None, width: int | None = None, height: int | None = None) -> str:
        """The human message for `prompt` (checked against what the task needs)."""
        if self.needs_text and not (prompt and prompt.strip()):
            raise ValueError(f"task {self.name!r} needs a text prompt")
        if "{width}" in self.template and (width is None or height is None):
            raise ValueError(f"task {self.name!r} needs an image size (e.g. --size 512x512)")
        return self.template.format(prompt=prompt or "", width=width, height=height)


_OMNI = dict(input_images=1, guidance=1.0, image_top_k=200)
_OMNI_IMAGE = dict(_OMNI, answer_is_image=True)
TASKS: dict[str, TaskPreset] = {t.name: t for t in [
    TaskPreset("t2i", T2I_TEMPLATE, 0, True, guidance=4.0, image_top_k=2000, answer_is_image=True,
               description="text to image (README settings: cfg 4, image top-k 2000)"),
    TaskPreset("chat", "{prompt}", None, True, guidance=4.0, image_top_k=2000,
               description="the prompt as given; <|image|> marks each input image (understanding, free chat)"),
    TaskPreset("describe", "Describe the image in detail. " + IMAGE, 1, False, guidance=4.0, image_top_k=2000,
               description="image understanding (README prompt)"),
    TaskPreset("segmentation", "Segmentic segmentation. " + IMAGE, needs_text=False, **_OMNI_IMAGE,
               description="Omni: semantic segmentation (reference prompt, misspelling kept)"),
    TaskPreset("depth", "Depth estimation. " + IMAGE, needs_text=False, **_OMNI_IMAGE, description="Omni: depth map"),
    TaskPreset("surface-normal", "Surface normal estimation. " + IMAGE, needs_text=False, **_OMNI_IMAGE,
               description="Omni: surface normals"),
    TaskPreset("pose", "Human pose estimation. " + IMAGE, needs_text=False, **_OMNI_IMAGE,
               description="Omni: human pose"),
    TaskPreset("detection", "Detect: {prompt} " + IMAGE, needs_text=True, **_OMNI,
               description="Omni: detect the objects named in the prompt"),
    TaskPreset("editing", "{prompt} " + IMAGE, needs_text=True, **_OMNI_IMAGE,
               description="Omni: edit the input image as the prompt says"),
    TaskPreset("condition-to-image", "Generate an image according to the provided image, and according to the "
               "following caption:\n{prompt} " + IMAGE, needs_text=True, **_OMNI_IMAGE,
               description="Omni: image from a condition image (depth, edges, ...) and a caption"),
]}


def get_task(name: str) -> TaskPreset:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
