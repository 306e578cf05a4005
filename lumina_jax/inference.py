"""Python API for inference from one assembled model directory (see `python -m lumina_jax.convert assemble`).

    from lumina_jax.inference import Lumina
    lm = Lumina.load("ckpts/lumina-7b-768", mesh="tensor=8")
    results = lm.generate(["a red fox in the snow"], task="t2i", size=(768, 768), seed=0, num_images=2)
    lm.save(results, "out/")            # PNGs + one JSON sidecar per result

    lm.generate(["What is in this picture? <|image|>"], task="chat", images=[[PIL.Image.open("x.png")]])
    lm.generate([[("Draw a cat.", "<|image|>"), ("Now make it blue.", None)]], images=[[cat]])   # multi-turn

Every prompt x image index is one row of a single batch (conditional and unconditional rows together);
row j of a prompt uses seed `seed + j` (as the reference's generate script), or `seeds[i] + j` for prompt i
when per-prompt seeds are given, so a result does not depend on which other prompts share its batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from lumina_jax import param_checkpoint, sharding as S
from lumina_jax.config import KV_CACHE_QUANT_MODES, WEIGHT_QUANT_MODES, ChameleonConfig
from lumina_jax.conversation import ConversationError, build_prompt
from lumina_jax.image_tokenizer import ImageTokenizer
from lumina_jax.models.quantization import check_kv_backend
from lumina_jax.sampling import processors
from lumina_jax.sampling.decode import ChameleonDecodeModel
from lumina_jax.sampling.generate import decode_images, generate_tokens, size_table_from_crops, split_generation
from lumina_jax.sampling.jacobi import JacobiSettings
from lumina_jax.state import restore_params
from lumina_jax.tasks import get_task
from lumina_jax.tokenizer import SpecialIds, TextTokenizer
from lumina_jax.unirep import crop_size_list, images_to_unirep, unirep_length
from lumina_jax.validation import SEED_MAX, check_float, check_int

# The shipped demo model (`python -m lumina_jax.demo.recipe`), used when no checkpoint is given.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "demo_weights"
# The guidance floor the shipped demo model samples with (`make demo`, the server's defaults, its evaluation).
DEMO_CFG_MIN_P = 0.05

MANIFEST = "lumina.json"
IMAGE_PLACEHOLDER = "<|image|>"
MAX_SEED = SEED_MAX  # PRNG keys keep a seed's low 32 bits, so larger seeds would repeat smaller ones


class InferenceError(ValueError):
    """A problem with the user's request or files (one line, naming the value, file or field)."""


@dataclasses.dataclass
class Result:
    """One generated answer."""

    prompt: Any  # the user's prompt (string or list of (question, answer) turns)
    task: str
    seed: int
    text: str  # decoded answer; <|image|> marks each generated image
    images: list  # PIL images (a string explains an image whose layout was invalid)
    token_ids: list[int]
    stopped: str  # "end_of_turn" or "length"
    unfinished_image: Optional[dict]  # set when the length limit cut an image: {"h", "w", "body_tokens"}
    settings: dict  # every sampling setting used
    steps: int = 0  # model steps of the decode loop that produced the answer (one per token without SJD)
    accepted: Optional[list[int]] = None  # speculative Jacobi decoding: tokens accepted at each step

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "task": self.task, "seed": self.seed, "text": self.text,
                "num_images": len(self.images), "num_tokens": len(self.token_ids), "stopped": self.stopped,
                "unfinished_image": self.unfinished_image, "settings": self.settings,
                "decode": {"steps": self.steps, "tokens_accepted_per_step": self.accepted}}


def writable_output_dir(out: str | os.PathLike) -> Path:
    """Checks that `out` is (or can be created as) a writable directory, before any work is done."""
    out = Path(out)
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise InferenceError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InferenceError(f"--out {out}: {existing} is not writable")
    return out


def load_image_file(path: str | os.PathLike) -> "Image.Image":
    """An input image file, fully decoded; a missing, truncated, oversized or non-image file is one line naming it."""

    if not os.path.isfile(path):
        raise InferenceError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InferenceError(f"image file {path}: unreadable ({e})") from None


def parse_size(text: str) -> tuple[int, int]:
    """'768x512' -> (768, 512) (width x height in pixels)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise InferenceError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))


def add_placement_flags(p) -> None:
    """--mesh, --rules, --dtype, --quantize, --kv-cache: where and how `Lumina.load` places a model (infer.py and
    the server)."""
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. tensor=8 or data=4,tensor=2 (axes data, fsdp, tensor; default: one device)")
    p.add_argument("--rules", default="tensor", choices=["tensor", "fsdp"],
                   help="parameter layout on the mesh: tensor parallel or FSDP (default tensor)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype override (default: the decoder's config.json)")
    p.add_argument("--quantize", default=None, choices=["none", "int8"],
                   help="int8: weights of every projection and the output head stored int8 with one scale per output "
                        "channel, computed in the compute dtype (half the weight bytes read per decode step; "
                        "docs/quantization.md). Default: as stored (none, or int8 for a directory written by "
                        "`python -m lumina_jax.convert quantize`)")
    p.add_argument("--kv-cache", default=None, choices=["none", "int8", "fp8"],
                   help="KV cache storage: int8 or fp8 (e4m3) values with one float32 scale per slot and head, "
                        "about half the cache bytes; fp8 only where the backend supports it (default none: the "
                        "compute dtype)")


def quantized_config(cfg, quantize: str | None, kv_cache: str | None, source: str):
    """`cfg` with the requested weight / KV cache quantisation (None keeps `cfg`'s); InferenceError names the
    value. A quantised checkpoint (weight_quant="int8" in `source`) cannot be loaded unquantised."""

    if quantize is not None and quantize not in WEIGHT_QUANT_MODES:
        raise InferenceError(f"quantize={quantize!r} is unknown; known: {list(WEIGHT_QUANT_MODES)}")
    if kv_cache is not None and kv_cache not in KV_CACHE_QUANT_MODES:
        raise InferenceError(f"kv_cache={kv_cache!r} is unknown; known: {list(KV_CACHE_QUANT_MODES)}")
    if quantize == "none" and cfg.weight_quant != "none":
        raise InferenceError(f"{source}: the decoder is stored {cfg.weight_quant}-quantised; it cannot load unquantised")
    cfg = cfg.replace(weight_quant=quantize or cfg.weight_quant, kv_cache_quant=kv_cache or cfg.kv_cache_quant)
    try:
        check_kv_backend(cfg.kv_cache_quant)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    return cfg


def task_preset(task: str):
    """The preset of a task name; an unknown name is an InferenceError listing the tasks."""
    try:
        return get_task(task)
    except ValueError as e:
        raise InferenceError(str(e)) from None


def add_jacobi_flags(p) -> None:
    """--jacobi-window, --jacobi-coupling/--no-jacobi-coupling (infer.py, the demo evaluation)."""
    p.add_argument("--jacobi-window", type=int, default=0,
                   help="speculative Jacobi decoding of image bodies: L >= 2 tokens per model step, 1..L accepted, "
                        "the same distribution as one token per step (0 = off, the default)")
    p.add_argument("--jacobi-coupling", action=argparse.BooleanOptionalAction, default=True,
                   help="with --jacobi-window: keep each position's draft noise fixed across steps (coupled drafts, "
                        "more tokens accepted per step; default) or draw it afresh (plain SJD)")


def jacobi_settings(window: int, coupling: bool = True):
    """`JacobiSettings` for a window of `window` tokens per model step, or None for 0 (autoregressive)."""

    try:
        window = check_int("jacobi_window", window, 0)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if window == 1:  # a window of one token is one token per step: say 0
        raise InferenceError(f"jacobi_window must be 0 (off) or an integer >= 2, got {window!r}")
    return JacobiSettings(int(window), bool(coupling)) if window else None


def check_seed(seed: Any, num_images: int = 1) -> int:
    """`seed` as an int; its answers use seed .. seed + num_images - 1, which must all lie in [0, SEED_MAX]."""
    try:
        seed = check_int("seed", seed, 0, SEED_MAX)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if seed + num_images - 1 > SEED_MAX:  # row j uses seed + j; larger seeds would repeat smaller ones
        raise InferenceError(f"seed {seed} with num_images {num_images}: seeds up to {seed + num_images - 1} "
                             f"are needed but they must lie in [0, {SEED_MAX}]")
    return seed


class Lumina:
    """A loaded model directory: decoder, VQGAN, tokenizer and crop list, optionally on a device mesh."""

    def __init__(self, directory, decoder_config, params, image_tokenizer, tokenizer, special, target_size,
                 mesh=None, rules=None):

        self.directory, self.config, self.params = directory, decoder_config, params
        self.image_tokenizer, self.tokenizer, self.special = image_tokenizer, tokenizer, special
        self.target_size, self.mesh, self.rules = target_size, mesh, rules
        self.crop_sizes = crop_size_list(target_size)
        self.model = ChameleonDecodeModel(decoder_config)
        self.ids = processors.TokenIds.from_special_ids(special, decoder_config.vocab_size)

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike, mesh: str | Any = None, rules: str = "tensor",
             dtype: str | None = None, target_size: int | None = None, quantize: str | None = None,
             kv_cache: str | None = None) -> "Lumina":
        """Loads an assembled directory. `mesh`: None (one device), a spec like "tensor=8" or "data=4,tensor=2",
        or a jax Mesh; `rules`: "tensor" or "fsdp" parameter layout; `dtype`: compute dtype override.
        `quantize="int8"`: int8 weights with per-output-channel scales (quantised after the restore, or restored
        as stored from a directory written by `python -m lumina_jax.convert quantize`); `kv_cache`: "int8" or
        "fp8" stores the KV cache quantised (docs/quantization.md). None keeps the directory's own setting."""
        directory = Path(directory)
        if not directory.is_dir():
            raise InferenceError(f"{directory}: checkpoint directory "
                                 f"{'is a file, not a directory' if directory.exists() else 'does not exist'}")
        try:
            rule_set = S.rule_set(rules)
        except ValueError as e:
            raise InferenceError(str(e)) from None
        # the request's own values first, so their mistakes are not reported as an unreadable checkpoint
        if target_size is not None:
            try:
                check_int("target_size", target_size, 1)
                crop_size_list(target_size)
            except ValueError as e:
                raise InferenceError(str(e)) from None
        try:
            if mesh is None:
                mesh_obj = S.make_mesh("data=1", devices=jax.devices()[:1])
            else:
                mesh_obj = S.make_mesh(mesh) if isinstance(mesh, str) else mesh
        except ValueError as e:
            raise InferenceError(f"mesh {mesh!r}: {e}") from None
        try:
            manifest = param_checkpoint.read_json(directory, MANIFEST)
        except (param_checkpoint.CheckpointError, json.JSONDecodeError) as e:
            raise InferenceError(f"{directory}: not an assembled model directory ({e}); "
                                 "build one with `python -m lumina_jax.convert assemble`") from None
        try:
            dec_dir = directory / manifest["decoder"]
            cfg = ChameleonConfig.from_dict(param_checkpoint.read_json(dec_dir, "config.json"))
            cfg = cfg.replace(scan_layers=False, **({"dtype": dtype} if dtype else {}))
            cfg = quantized_config(cfg, quantize, kv_cache, str(dec_dir / "config.json"))
            tok = TextTokenizer.load(str(directory / manifest["tokenizer"]))
            special = SpecialIds.from_tokenizer(tok)
            try:  # the decoder config's image range and vocabulary must agree with the tokenizer's ids
                special.check_image_range(cfg.image_token_start, cfg.image_token_end, str(dec_dir / "config.json"))
                processors.TokenIds.from_special_ids(special, cfg.vocab_size)
            except ValueError as e:
                raise InferenceError(f"{directory}: decoder and tokenizer disagree: {e}") from None
            params = restore_params(dec_dir, cfg, mesh_obj, rule_set)
            vq = ImageTokenizer.from_checkpoint(directory / manifest["vqgan"])
        except (param_checkpoint.CheckpointError, KeyError, TypeError, ValueError, FileNotFoundError, OSError) as e:
            if isinstance(e, InferenceError):
                raise
            raise InferenceError(f"{directory}: unreadable checkpoint ({type(e).__name__}: "
                                 f"{param_checkpoint.one_line(e)})") from None
        if vq.config.n_embed != special.num_image_codes:
            raise InferenceError(f"{directory}: VQGAN has {vq.config.n_embed} codes but the tokenizer has "
                                 f"{special.num_image_codes} image tokens")
        target = target_size or manifest.get("target_size", 512)
        try:
            crop_size_list(check_int("target_size", target, 1))
        except ValueError as e:
            raise InferenceError(f"{directory / MANIFEST}: {e}") from None
        return cls(directory, cfg, params, vq, tok, special, int(target), mesh_obj, rule_set)

    # ---- prompts ---------------------------------------------------------------------------------------------
    def size_to_patches(self, size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) px -> (h, w) patches, checked against the crop list of the target size."""
        if tuple(size) not in self.crop_sizes:
            near = sorted(self.crop_sizes, key=lambda c: abs(c[0] / c[1] - size[0] / max(size[1], 1)))[:4]
            raise InferenceError(f"size {size[0]}x{size[1]} is not on the crop list for target size "
                                 f"{self.target_size} ({len(self.crop_sizes)} sizes; closest aspect: "
                                 f"{', '.join(f'{w}x{h}' for w, h in near)})")
        return size[1] // 32, size[0] // 32

    def encode_images(self, images: Sequence[Any]) -> list[list[int]]:
        """PIL images or paths -> UniRep token ids (center crop to the closest crop size, VQGAN in batches)."""

        pils = [load_image_file(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
        if not pils:
            return []
        return [t.tolist() for t in images_to_unirep(pils, self.image_tokenizer, self.crop_sizes, self.special)]

    def prompt_ids(self, prompt: Any, task: str, images: Sequence[Any] = (), size=None) -> list[int]:
        """Token ids of one prompt: `[bos, ..., 8710]` (a string, or multi-turn (question, answer) pairs)."""

        preset = task_preset(task)
        if isinstance(prompt, str) or prompt is None:
            w, h = size if size is not None else (None, None)
            try:
                turns = [(preset.message(prompt, w, h), None)]
            except ValueError as e:
                raise InferenceError(str(e)) from None
        else:
            turns = [(q, a) for q, a in prompt]
        if preset.input_images is not None and len(images) != preset.input_images:
            raise InferenceError(f"task {task!r} takes {preset.input_images} input image(s), got {len(images)}")
        try:
            return build_prompt(turns, self.tokenizer, self.special, self.encode_images(images))
        except ConversationError as e:
            raise InferenceError(str(e)) from None

    # ---- generation ------------------------------------------------------------------------------------------
    def sampling_settings(self, task: str = "t2i", *, guidance: float | None = None, cfg_min_p: float = 0.0,
                          image_top_k: int | None = None, text_top_k: int | None = None, temperature: float = 1.0,
                          top_p: float = 1.0, max_new_tokens: int = 8192,
                          constrain_size: bool = True) -> processors.SamplingSettings:
        """The task preset's sampling defaults with the given overrides, checked (InferenceError names the value)."""
        preset = task_preset(task)
        try:
            for name, value in (("guidance", guidance), ("cfg_min_p", cfg_min_p), ("temperature", temperature),
                                ("top_p", top_p)):
                if value is not None:
                    check_float(name, value)
            for name, value in (("image_top_k", image_top_k), ("text_top_k", text_top_k),
                                ("max_new_tokens", max_new_tokens)):
                if value is not None:
                    check_int(name, value)
            return processors.SamplingSettings(
                cfg_scale=preset.guidance if guidance is None else float(guidance), cfg_min_p=float(cfg_min_p),
                image_top_k=preset.image_top_k if image_top_k is None else int(image_top_k),
                text_top_k=preset.text_top_k if text_top_k is None else int(text_top_k),
                temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                constrain_size=constrain_size)
        except ValueError as e:
            raise InferenceError(str(e)) from None

    def generate(self, prompts: Sequence[Any], *, task: str = "t2i", images: Sequence[Sequence[Any]] | None = None,
                 size: tuple[int, int] | str | None = None, guidance: float | None = None, cfg_min_p: float = 0.0,
                 image_top_k: int | None = None, text_top_k: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, seeds: Sequence[int] | None = None, num_images: int = 1,
                 max_new_tokens: int = 8192, constrain_size: bool = True, open_image: bool | None = None,
                 progress: bool | Callable[[int, int], None] = True, decode_images: bool = True,
                 pad_rows_to: int | None = None, jacobi_window: int = 0,
                 jacobi_coupling: bool = True) -> list[Result]:
        """Generates `num_images` answers per prompt in one batch; returns them prompt-major.

        Answer j of prompt i uses seed `seed + j`, or `seeds[i] + j` when `seeds` (one per prompt) is given:
        a row's tokens depend only on its prompt, settings and seed, so callers may batch unrelated requests.
        `size` (W, H) forces the size tokens (and fills the t2i template); without it t2i uses the square target
        size and other tasks limit the size tokens to the crop list of the target size (`constrain_size=False`:
        unconstrained, as the reference). Prompts must be shorter than the model's context.
        `guidance` (the classifier-free guidance scale, 1 = off), `image_top_k`, `text_top_k` default to the
        task preset's values. `cfg_min_p` > 0 limits guided image steps to codes with conditional probability
        >= cfg_min_p x the top one's (`SamplingSettings`).
        `open_image` (default: the preset's `answer_is_image`) ends the prompt with <racm3:break> (and the size
        tokens when `size` is given); `token_ids` and `text` of the results include those tokens.
        `progress`: a progress bar on stderr (True), none (False), or `fn(tokens_done, tokens_total)` called
        from the decode loop, where the total is what the answers need once the image size is known.
        `pad_rows_to`: run the decode loop on a multiple of this many rows (padded with copies of the first row,
        whose results are dropped) and the VQGAN decoder on one image at a time. Different batch shapes round
        differently (about 1e-5 in the logits), so a caller that batches unrelated requests passes a fixed
        value: each row then comes out bit-identical whichever rows share its call, and one decode program is
        compiled, not one per batch size.
        `jacobi_window` L >= 2 samples image bodies by speculative Jacobi decoding: L tokens per model step, 1..L
        of them accepted, the same distribution as one token per step (`lumina_jax.sampling.jacobi`);
        `jacobi_coupling` keeps each position's draft noise fixed across steps (more accepted; False = plain
        SJD). Each result records its model steps and tokens accepted per step.
        """
        if isinstance(size, str):
            size = parse_size(size)
        if size is None and "{width}" in task_preset(task).template:  # the prompt names a size: the square target size
            size = (self.target_size, self.target_size)
        forced = self.size_to_patches(size) if size is not None else None
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise InferenceError(f"{len(images)} image lists for {len(prompts)} prompts")
        try:
            check_int("num_images", num_images, 1)
            if pad_rows_to is not None:
                check_int("pad_rows_to", pad_rows_to, 1)
        except ValueError as e:
            raise InferenceError(str(e)) from None
        seeds = [seed] * len(prompts) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise InferenceError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        for s in seeds:
            check_seed(s, num_images)
        jacobi = jacobi_settings(jacobi_window, jacobi_coupling)
        settings = self.sampling_settings(task, guidance=guidance, cfg_min_p=cfg_min_p, image_top_k=image_top_k,
                                          text_top_k=text_top_k, temperature=temperature, top_p=top_p,
                                          max_new_tokens=max_new_tokens, constrain_size=constrain_size)
        header = self.answer_header(task, size, open_image)
        base = [self.prompt_ids(p, task, im, size) + header for p, im in zip(prompts, images)]
        context = self.config.max_position_embeddings
        for i, ids in enumerate(base):
            if len(ids) >= context:
                raise InferenceError(f"prompt {i} is {len(ids)} tokens; the model's context is {context} tokens "
                                     "(max_position_embeddings of decoder/config.json), answer included")
        rows = [(i, j) for i in range(len(prompts)) for j in range(num_images)]
        total = self.expected_new_tokens(size, len(header), settings.max_new_tokens)
        out_rows = self._run([base[i] for i, _ in rows], [int(seeds[i]) + j for i, j in rows],
                             [forced] * len(rows), settings, progress, total, pad_rows_to or 1, jacobi)
        results = []
        for (i, j), r in zip(rows, out_rows):
            r.tokens = header + r.tokens
            results.append(self._result(prompts[i], task, int(seeds[i]) + j, r, settings, size, jacobi))
        if decode_images:
            self._decode_all(results, one_at_a_time=pad_rows_to is not None)
        return results

    def answer_header(self, task: str, size: tuple[int, int] | None, open_image: bool | None = None) -> list[int]:
        """Tokens fed after the prompt: <racm3:break> when the answer opens with an image (`open_image`, default:
        the task preset's), then its two size tokens when `size` (W, H) is forced; else none."""
        if not (task_preset(task).answer_is_image if open_image is None else open_image):
            return []
        if size is None:
            return [self.ids.image_start]
        h, w = self.size_to_patches(size)
        return [self.ids.image_start, self.ids.size_base + h, self.ids.size_base + w]

    def expected_new_tokens(self, size: tuple[int, int] | None, header_fed: int, max_new_tokens: int) -> int:
        """Tokens an answer needs: an opened image of `size` (W, H) with `header_fed` of its tokens already in
        the prompt, then end-of-turn; the largest crop size when the size is sampled; else `max_new_tokens`."""

        if not header_fed:
            return max_new_tokens
        sizes = [size] if size is not None else self.crop_sizes
        return min(max_new_tokens, max(unirep_length(w, h) for w, h in sizes) - header_fed + 1)

    def _run(self, prompts, seeds, forced, settings, progress, total=None, row_multiple=1, jacobi=None):
        n = len(prompts)
        # a multiple of row_multiple rows, which (with the guidance twins) split evenly over the mesh's batch axes
        shards = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp")]))
        rows = -(-n // row_multiple) * row_multiple
        pad = rows - n + (-rows) % shards
        prompts = list(prompts) + [prompts[0]] * pad
        seeds, forced = list(seeds) + [seeds[0]] * pad, list(forced) + [forced[0]] * pad
        report = progress if callable(progress) else None
        count = {"done": 0, "total": total or settings.max_new_tokens}  # tokens of the longest row so far / needed
        bar = tqdm(total=count["total"], desc="generating", unit="tok", disable=progress is not True, file=sys.stderr)

        def tick(step):
            if step > count["total"]:  # the answer went on past its image (e.g. text after it)
                count["total"] = bar.total = settings.max_new_tokens
            count["done"] = max(count["done"], step)
            bar.update(count["done"] - bar.n)
            if report is not None:
                report(count["done"], count["total"])

        kw = dict(seeds=seeds, settings=settings, ids=self.ids, size_table=size_table_from_crops(self.crop_sizes),
                  forced_hw=forced, progress=tick if progress else None, jacobi=jacobi)
        try:
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            with S.sharding_context(self.mesh, self.rules):
                rows = generate_tokens(self.model, self.params, prompts, input_sharding=replicated, **kw)
            done = max(len(r.tokens) for r in rows)
            count["total"] = bar.total = done  # finished: the bar ends full, at the tokens really generated
            if progress:
                tick(done)
        finally:
            bar.close()
        return rows[:n]

    def _result(self, prompt, task, seed, row, settings, size, jacobi=None) -> Result:
        """A `Result` from a row whose tokens already start with the answer header."""

        segs = split_generation(row.tokens, self.ids, placeholder=-1)
        parts, text_ids = [], []
        for t in segs.text_ids + [None]:
            if t == -1 or t is None:
                parts.append(self.tokenizer.decode(text_ids) if text_ids else "")
                text_ids = []
            else:
                text_ids.append(t)
        text = IMAGE_PLACEHOLDER.join(parts)
        unfinished = row.unfinished_image
        s = dataclasses.asdict(settings)
        s.update(size=None if size is None else f"{size[0]}x{size[1]}", target_size=self.target_size,
                 jacobi_window=jacobi.window if jacobi else 0, jacobi_coupling=bool(jacobi and jacobi.coupled))
        res = Result(prompt, task, seed, text, segs.images, row.tokens, row.stopped, unfinished, s, row.steps,
                     row.accepted)
        return res

    def _decode_all(self, results: list[Result], one_at_a_time: bool = False) -> None:
        """Replaces each result's image token lists by PIL images: one VQGAN batch per size over all results, or
        one image per call (the same shape for every image, so its pixels do not depend on the others)."""

        flat = [t for r in results for t in r.images]
        pics = decode_images(flat, self.image_tokenizer, self.special, **({"max_batch": 1} if one_at_a_time else {}))
        k = 0
        for r in results:
            r.images = pics[k:k + len(r.images)]
            k += len(r.images)

    # ---- output ----------------------------------------------------------------------------------------------
    @staticmethod
    def save(results: Sequence[Result], out_dir: str | os.PathLike, run_info: dict | None = None) -> list[Path]:
        """Writes `NNN_seedS_K.png` per image and `NNN_seedS.json` per result; returns the paths written.

        NNN continues after the highest number already in `out_dir`, and every file is created exclusively
        (written under a temporary name, then hard-linked into place), so no earlier output is ever replaced,
        even by a run writing into the same directory at the same time.
        """
        out = writable_output_dir(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for m in (re.match(r"(\d+)_seed", p.name) for p in out.iterdir()) if m]
        n = max(taken, default=-1) + 1
        written = []
        for r in results:
            while True:
                try:
                    written += _save_result(r, out, n, run_info)
                    break
                except FileExistsError:  # a name already taken: this result moves to the next number
                    n += 1
            n += 1
        return written


def _save_result(r: Result, out: Path, n: int, run_info: dict | None) -> list[Path]:
    """One result's PNGs and JSON sidecar under number `n`; raises FileExistsError (leaving nothing) if taken."""
    stem = f"{n:03d}_seed{r.seed}"
    made: list[Path] = []
    try:
        files = []
        for k, im in enumerate(r.images):
            if isinstance(im, str):
                files.append(im)
                continue
            made.append(_create_new(out / f"{stem}_{k}.png", lambda f, im=im: im.save(f, format="PNG")))
            files.append(made[-1].name)
        meta = r.to_json()
        meta["images"] = files
        if run_info:
            meta["run"] = run_info
        text = json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        made.append(_create_new(out / f"{stem}.json", lambda f: f.write(text.encode("utf-8"))))
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        raise
    return made


def _create_new(path: Path, write) -> Path:
    """Writes `path` through a temporary file and links it into place; FileExistsError if `path` exists."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: an exclusive create, then the bytes
            with open(path, "xb") as dst, open(tmp, "rb") as src:
                shutil.copyfileobj(src, dst)
    finally:
        os.unlink(tmp)
    return path

