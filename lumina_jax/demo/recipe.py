"""The demo model's whole recipe as one deterministic command: data, VQGAN, vocabulary, decoder, checkpoint.

    python -m lumina_jax.demo.recipe --out runs/demo [--seed 0] [--preset full|smoke] [--vqgan DIR]

Stages (each one a subprocess, so its wall and CPU time are measured on their own):
  1. shapes      the synthetic set (`lumina_jax.demo.shapes`) at the two target sizes (64 then 128 px)
  2. vqgan       a small VQGAN of Chameleon's layout (`lumina_jax.demo.vqgan`); `--vqgan DIR`
                 copies an existing checkpoint instead (its codebook size decides the image ids)
  3. tokenizer   a SentencePiece vocabulary of the prompts with Chameleon's special layout
                 (`lumina_jax.tokenizer_train`) and only as many image tokens as VQGAN codes
  4. pretokenize both sets (`lumina_jax.data.pretokenize`); image-only items are then cut to start at the
                 image-start token, which is exactly the context of the unconditional branch of guidance
  5. stage1      `train.py --config configs/demo_stage1.py` on the 64-px set, exported in float32
  6. stage2      `train.py --config configs/demo_stage2.py` on the 128-px set, starting from stage 1
  7. assemble    OUT/model: the inference directory (`lumina_jax.inference.Lumina.load`) with the decoder
                 and the VQGAN stored in bfloat16, the tokenizer and lumina.json

OUT/recipe_report.json lists every stage's wall and CPU seconds. `make demo-weights` runs this and copies
OUT/model to lumina_jax/demo_weights/.

Vocabulary layout (what the code supports, checked by tests/test_demo_recipe.py): `SpecialIds` finds every
special token by name, so with a 512-code VQGAN the image codes take ids 4..515, `<eoss>` 516,
`<racm3:break>` 517 and the reserved names follow (end of turn = `<reserved08706>`, sizes `<reserved088NN>`);
the decoder's vocabulary is ~1.4k ids instead of 65536, and `image_token_start/end` are set from the
tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sentencepiece import sentencepiece_model_pb2

from lumina_jax import param_checkpoint
from lumina_jax.data.records import PretokenizedDataset, write_dataset
from lumina_jax.demo import vqgan as demo_vqgan
from lumina_jax.tokenizer import load_tokenizer
from lumina_jax.validation import SEED_MAX, int_flag

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT = "recipe_report.json"
STAGES = ("shapes", "vqgan", "tokenizer", "pretokenize", "stage1", "stage2", "assemble")


@dataclasses.dataclass(frozen=True)
class RecipePreset:
    """Sizes of one recipe run (the decoder's other settings live in configs/demo_stage*.py)."""

    items_stage1: int  # synthetic items at target size 64
    items_stage2: int  # synthetic items at target size 128
    vqgan_flags: tuple[str, ...]  # extra flags of `python -m lumina_jax.demo.vqgan`
    text_vocab_size: int  # learned SentencePiece pieces on top of the special block
    stage1_overrides: tuple[str, ...]  # train.py overrides of stage 1
    stage2_overrides: tuple[str, ...]  # train.py overrides of stage 2


PRESETS = {
    # The shipped model: 82 CPU-min, 55 min wall on 2 cores (docs/demo_recipe.md has the stage times).
    "full": RecipePreset(items_stage1=6000, items_stage2=12000, vqgan_flags=("--steps", "3000", "--batch-pixels", "16384", "--n-embed", "512", "--ch", "32",
                                      "--norm-groups", "8", "--codebook-update", "ema",
                                      "--eval-target-sizes", "128", "--eval-per-size", "2"),
                         text_vocab_size=512,
                         stage1_overrides=(), stage2_overrides=()),
    # A smoke run of every stage (tests/test_demo_recipe.py): tiny and meaningless weights.
    "smoke": RecipePreset(items_stage1=24, items_stage2=16,
                          vqgan_flags=("--steps", "3", "--ch", "32", "--n-embed", "64", "--train-sizes", "64x64",
                                       "--batch-pixels", "8192", "--warmup-steps", "1", "--no-eval",
                                       "--log-every", "1", "--restart-every", "0"),
                          text_vocab_size=300,
                          stage1_overrides=("total_steps=2", "data.global_batch_size=2", "model.hidden_size=32",
                                            "model.intermediate_size=64", "model.num_layers=1", "model.num_kv_heads=2",
                                            "model.num_heads=2", "model.head_dim=16", "log.every_steps=1",
                                            "log.tensorboard=false", "log.progress_bar=false"),
                          stage2_overrides=("total_steps=2", "data.global_batch_size=2", "log.every_steps=1",
                                            "log.tensorboard=false", "log.progress_bar=false")),
}
RESERVED_END = 8820  # reserved names up to <reserved08815>: size tokens for up to 15 patches (128 px needs 8)
MAX_LENGTH = 512  # longest pre-tokenized item (a 256x64 image plus its prompt is ~110 tokens)


class RecipeError(RuntimeError):
    """A stage failed; the message names it."""


def _timed(name: str, fn, report: dict) -> None:
    """Runs `fn()`, records wall and CPU seconds (this process plus finished children) under `name`."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    report["stages"][name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    print(f"[recipe] {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _run(args: list[str], log: Path) -> None:
    """Runs a command (stdout+stderr appended to `log`, and echoed); raises RecipeError naming it on failure."""
    print("[recipe] $ " + " ".join(args), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, env=_child_env())
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RecipeError(f"command failed with status {proc.returncode}: {' '.join(args)}\n  "
                          + "\n  ".join(tail) + f"\n(full log: {log})")


def _child_env() -> dict:
    """The environment of the stages: unbuffered output, and the machine's real devices (a forced host
    device count, as the test suite sets, would change the decoder's mesh and batch split)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def trim_image_only(src: Path, dst: Path, data_json: Path, image_start: int) -> dict:
    """Copies the pre-tokenized dataset `src` to `dst`, cutting every image-only item (meta.image_only in
    `data_json`) to start at its image-start token; returns counts."""


    with open(data_json, encoding="utf-8") as f:
        meta = [it.get("meta", {}) for it in json.load(f)]
    ds = PretokenizedDataset(str(src))
    items, cut = [], 0
    for i in range(len(ds)):
        r = ds[i]
        tokens, labels = r["tokens"], r["labels"]
        if meta[r["id"]].get("image_only"):
            k = int(np.argmax(tokens == image_start))
            if tokens[k] != image_start:
                raise RecipeError(f"{src}: image-only item {r['id']} has no image-start token {image_start}")
            tokens, labels = tokens[k:], labels[k:]
            cut += 1
        items.append((tokens, labels))
    write_dataset(str(dst), items, description=f"{src.name} with image-only items cut to the image start")
    return {"items": len(items), "image_only": cut}


def check_vqgan_run(directory: Path, seed: int, flags: tuple[str, ...]) -> None:
    """Warns unless `directory`'s train_report.json shows the training settings this recipe would use (the
    evaluation settings aside), i.e. unless reusing it equals running the VQGAN stage."""

    report = directory / demo_vqgan.REPORT_FILE
    if not report.is_file():
        print(f"[recipe] warning: {report} missing; cannot check that {directory} is this recipe's VQGAN", flush=True)
        return
    ns = demo_vqgan.build_parser().parse_args(["--out", "x", "--seed", str(seed), *flags])
    want = {k: v for k, v in vars(ns).items() if k in json.loads(report.read_text())["config"]}
    got = json.loads(report.read_text())["config"]
    diff = {k: (got[k], v) for k, v in want.items() if not k.startswith("eval_") and got[k] != v}
    if diff:
        print(f"[recipe] warning: {directory} was trained with other settings (theirs, ours): {diff}", flush=True)
    else:
        print(f"[recipe] {directory}: same training settings as this recipe's VQGAN stage", flush=True)


def assemble(out: Path, decoder_dir: Path, vqgan_dir: Path, tokenizer_model: Path, target_size: int) -> None:
    """Writes the inference directory `out` (lumina.json, decoder/, vqgan/, tokenizer/) with bf16 weights."""


    def to_bf16(tree):
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            tree)

    with param_checkpoint.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "decoder").mkdir()
        param_checkpoint.save_params(tmp / "decoder", to_bf16(param_checkpoint.restore_params(decoder_dir)))
        shutil.copyfile(decoder_dir / "config.json", tmp / "decoder" / "config.json")
        (tmp / "vqgan").mkdir()
        param_checkpoint.save_params(tmp / "vqgan", to_bf16(param_checkpoint.restore_params(vqgan_dir)))
        shutil.copyfile(vqgan_dir / "vqgan_config.json", tmp / "vqgan" / "vqgan_config.json")
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(tokenizer_model, tmp / "tokenizer" / "tok.model")
        param_checkpoint.write_json(tmp, "lumina.json", {
            "format": 1, "decoder": "decoder", "vqgan": "vqgan", "tokenizer": "tokenizer/tok.model",
            "target_size": int(target_size), "sources": {"recipe": "python -m lumina_jax.demo.recipe"},
            "mask_image_logits": False})
    strip_machine_paths(out)


def strip_machine_paths(model_dir: Path) -> None:
    """Removes the paths of the machine that built `model_dir`, so the shipped copy names none.

    Orbax's `commit_success.txt` markers name the directory they were written to, and a SentencePiece
    model records its training inputs and output prefix. Neither is read back: the markers' presence is
    what counts, and the trainer settings are informational.
    """

    for marker in Path(model_dir).rglob("commit_success.txt"):
        marker.write_text("Checkpoint commit was successful")
    for tok in Path(model_dir).rglob("*.model"):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tok.read_bytes())
        del proto.trainer_spec.input[:]
        proto.trainer_spec.model_prefix = tok.stem
        tok.write_bytes(proto.SerializeToString())


def claim_work_dir(out: Path, vqgan: str | None = None) -> None:
    """Makes `out` the recipe's work directory, refusing one it did not start: reruns replace its stage folders
    (vqgan/, tokenizer/, data/, runs/, export/, model/), which must never be a user's own files or --vqgan."""

    try:
        param_checkpoint.check_outside_inputs(out, [vqgan])
    except param_checkpoint.CheckpointError as e:
        raise RecipeError(f"--out {e}") from None
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out}: exists and is not a directory")
    marker = out / param_checkpoint.OUTPUT_MARKER
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise RecipeError(f"--out {out}: a non-empty directory that this recipe did not start (it has no "
                          f"{param_checkpoint.OUTPUT_MARKER}); choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        param_checkpoint.write_json(out, param_checkpoint.OUTPUT_MARKER, {"written_by": "lumina-jax demo recipe"})


def run_recipe(out: Path, seed: int = 0, preset: str = "full", vqgan: str | None = None,
               start_at: str = STAGES[0], python: str = sys.executable) -> dict:
    """Runs the stages from `start_at` on into `out` (earlier stages' outputs must be there already);
    returns the report (also written to OUT/recipe_report.json)."""
    if preset not in PRESETS:
        raise RecipeError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    if start_at not in STAGES:
        raise RecipeError(f"--start-at {start_at!r} is not one of {STAGES}")
    p = PRESETS[preset]
    out = out.absolute()
    claim_work_dir(out, vqgan)
    log = out / "recipe.log"
    report: dict = {"seed": seed, "preset": preset, "stages": {}}
    sets = {64: out / "shapes64", 128: out / "shapes128"}
    counts = {64: p.items_stage1, 128: p.items_stage2}

    def shapes():
        for size, d in sets.items():
            _run([python, "-m", "lumina_jax.demo.shapes", "--out", str(d), "--target-size", str(size),
                  "--num-items", str(counts[size]), "--seed", str(seed + size), "--overwrite", "--quiet"], log)

    def train_vqgan():
        if vqgan:
            check_vqgan_run(Path(vqgan), seed, p.vqgan_flags)
            shutil.rmtree(out / "vqgan", ignore_errors=True)
            shutil.copytree(vqgan, out / "vqgan")
        else:
            _run([python, "-m", "lumina_jax.demo.vqgan", "--out", str(out / "vqgan"), "--overwrite",
                  "--seed", str(seed), *p.vqgan_flags], log)

    def tokenizer():
        n_embed = json.loads((out / "vqgan" / "vqgan_config.json").read_text())["n_embed"]
        shutil.rmtree(out / "tokenizer", ignore_errors=True)  # a rerun of this stage: tokenizer_train never replaces
        (out / "tokenizer").mkdir()
        _run([python, "-m", "lumina_jax.tokenizer_train", "--input", str(sets[64] / "corpus.txt"),
              str(sets[128] / "corpus.txt"), "--out-prefix", str(out / "tokenizer" / "tok"),
              "--text-vocab-size", str(p.text_vocab_size), "--num-image-codes", str(n_embed),
              "--reserved-end", str(RESERVED_END), "--seed", str(seed)], log)

    def pretokenize():
        _, sp = load_tokenizer(str(out / "tokenizer" / "tok.model"))
        for size, d in sets.items():
            raw = out / "data" / f"raw{size}"
            shutil.rmtree(raw, ignore_errors=True)
            _run([python, "-m", "lumina_jax.data.pretokenize", "--input", str(d / "data.json"), "--out", str(raw),
                  "--target-size", str(size), "--tokenizer", str(out / "tokenizer" / "tok.model"),
                  "--vqgan", str(out / "vqgan"), "--max-length", str(MAX_LENGTH), "--quiet"], log)
            final = out / "data" / f"stage{size}"
            shutil.rmtree(final, ignore_errors=True)
            report.setdefault("data", {})[str(size)] = trim_image_only(raw, final, d / "data.json", sp.image_start)
            (out / "data" / f"stage{size}.yaml").write_text(f"META:\n  - path: {final}\n")

    def model_overrides() -> list[str]:
        tok, sp = load_tokenizer(str(out / "tokenizer" / "tok.model"))
        # exactly the tokenizer's size: a padded id could be sampled as text and then not decode
        return [f"model.vocab_size={tok.vocab_size}", f"model.image_token_start={sp.image_token_start}",
                f"model.image_token_end={sp.image_token_end}"]

    def stage(n: int, size: int, init_from: Path | None, overrides: tuple[str, ...]):
        def go():
            run_dir = out / "runs" / f"stage{n}"
            shutil.rmtree(run_dir, ignore_errors=True)
            export = out / "export" / f"stage{n}"
            shutil.rmtree(export, ignore_errors=True)
            args = [python, str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / "configs" / f"demo_stage{n}.py"),
                    f"output_dir={run_dir}", f"data.config_path={out / 'data' / f'stage{size}.yaml'}",
                    f"seed={seed}", f"data.seed={seed}", *model_overrides(), *overrides,
                    "--export_dir", str(export), "--export_dtype", "float32"]
            if init_from is not None:
                args.insert(4, f"checkpoint.init_from={init_from}")
            _run(args, log)
        return go

    def assemble_stage():
        assemble(out / "model", out / "export" / "stage2", out / "vqgan", out / "tokenizer" / "tok.model", 128)

    previous = out / REPORT
    if start_at != STAGES[0] and previous.is_file():  # keep the times of the stages not rerun
        report["stages"].update(json.loads(previous.read_text())["stages"])
    steps = {"shapes": shapes, "vqgan": train_vqgan, "tokenizer": tokenizer, "pretokenize": pretokenize,
             "stage1": stage(1, 64, None, p.stage1_overrides),
             "stage2": stage(2, 128, out / "export" / "stage1", p.stage2_overrides), "assemble": assemble_stage}
    for name in STAGES[STAGES.index(start_at):]:
        _timed(name, steps[name], report)
    report["stages"] = {k: report["stages"][k] for k in STAGES if k in report["stages"]}
    report["total"] = {"wall_s": round(sum(t["wall_s"] for t in report["stages"].values()), 1),
                       "cpu_s": round(sum(t["cpu_s"] for t in report["stages"].values()), 1)}
    report["model"] = str(out / "model")
    with open(out / REPORT, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.demo.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work directory; the inference directory is written to OUT/model")
    p.add_argument("--seed", type=int_flag(0, SEED_MAX - 128), default=0,
                   help="seed of every stage (data, VQGAN, vocabulary, decoder); the shapes sets use seed + 64 "
                        "and seed + 128")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS),
                   help="full: the shipped model; smoke: every stage at toy size (for tests)")
    p.add_argument("--start-at", default=STAGES[0], choices=STAGES,
                   help="rerun from this stage on, reusing the earlier stages' outputs in OUT")
    p.add_argument("--vqgan", default=None,
                   help="use this VQGAN checkpoint directory (params/ + vqgan_config.json) instead of training one")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.vqgan and not os.path.isfile(os.path.join(args.vqgan, "vqgan_config.json")):
        print(f"error: --vqgan {args.vqgan}: no vqgan_config.json there", file=sys.stderr)
        return 2
    try:
        report = run_recipe(Path(args.out), args.seed, args.preset, args.vqgan, args.start_at)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t = report["total"]
    print(f"[recipe] done in {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU; "
          f"inference directory {report['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
