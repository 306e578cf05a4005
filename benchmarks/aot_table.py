"""The deployment tables of docs/aot.md: per stage, TPU generation and attention implementation (dense,
the splash kernel), the smallest slice where the real program compiles and fits, found by compiling
candidates (smallest first) with `python -m lumina_jax.aot`, and on that slice the largest micro-batch
that fits (tried from 8 sequences per batch shard down, so refusals, which are quick, come first).

    python benchmarks/aot_table.py                      # all rows; results cached in --cache-dir
    python benchmarks/aot_table.py --only 7b-512 --fresh
    python benchmarks/aot_table.py --only train --write docs/aot.md  # replace the tables between the markers

Train rows use the reference's per-device batch (8 sequences of data.seq_len per chip and optimizer step;
docs/reference.md, 'FP-SFT settings') reached by gradient accumulation; generation rows use guidance at 768 px on tensor-parallel meshes.
A candidate smaller than the first fitting one is listed with why it does not fit: the compiler's verdict,
or a lower bound: a train step holds fp32 weights, both Adam moments and fp32 gradients at once (16 bytes
per parameter), and when that alone exceeds the usable HBM the candidate is not compiled.
Train rows come in pairs, dense attention (the reference) beside the splash kernel, with the bytes each
step accesses by XLA's cost analysis. This is a planning tool, not a speed benchmark: it runs nothing, and
each compile of a 7B/34B program takes minutes on a 2-core host.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import hashlib
import subprocess
import tempfile
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKERS = {"train": ("<!-- aot-table:begin -->", "<!-- aot-table:end -->"),
           "generate": ("<!-- aot-gen-table:begin -->", "<!-- aot-gen-table:end -->")}
GiB = 1024 ** 3
HBM = {"v5e": 16 * GiB, "v5p": 95 * GiB, "v4": 32 * GiB, "v6e": 32 * GiB}
# HBM the TPU compiler lets a program use, where we have seen it state it (v5e: "available HBM (15.75G)").
USABLE = {"v5e": 15.75 * GiB}
PARAMS = {"7b": 7.013e9, "34b": 34.294e9}  # decoder parameters (docs/reference.md, 'Model sizes')
PER_DEVICE_BATCH = 8  # the reference: --batch_size 8 per GPU
MICRO_BATCHES = (8, 4, 2)  # micro-batches (sequences per batch shard) tried on the smallest slice, largest first


@dataclasses.dataclass(frozen=True)
class Candidate:
    topology: str
    mesh: str  # parallel.mesh per slice
    accum: int = 1  # parallel.grad_accum_steps (train)
    remat: str = "full"
    rules: str = "fsdp"
    extra: tuple = ()  # more key=value overrides


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    config: str
    mode: str
    model: str  # "7b" / "34b" (for the state-size bound)
    candidates: tuple  # Candidate, smallest slice first
    attention: str = "dense"  # model.attention_impl


def _chips(topology: str) -> int:
    n = 1
    for x in topology.split(":")[1].split("x"):
        n *= int(x)
    return n


TP4 = "fsdp=-1,tensor=4"
GEN = ("generate.batch_size=8",)
STAGES = (  # key, label, config, model
    ("7b-512", "7B FP-SFT 512", "configs/fpsft_7b_512.py", "7b"),
    # the 768 stage trains the same program as 512 (both data.seq_len=4096): the cache shares the compile
    ("7b-768", "7B FP-SFT 768", "configs/fpsft_7b_768.py", "7b"),
    ("7b-1024", "7B FP-SFT 1024", "configs/fpsft_7b_1024.py", "7b"),
    ("7b-omni", "7B Omni-SFT", "configs/omni_sft_7b.py", "7b"),
    ("34b-512", "34B FP-SFT 512", "configs/fpsft_34b_512.py", "34b"),
)
V5E_7B_DENSE = (Candidate("v5e:2x2", TP4, accum=16), Candidate("v5e:2x4", TP4, accum=32),
                Candidate("v5e:2x4", "tensor=-1", accum=64), Candidate("v5e:4x4", TP4, accum=32),
                Candidate("v5e:4x8", TP4, accum=32))
CANDIDATES = {  # (model, generation, attention) -> candidates, smallest slice first
    ("7b", "v5p", "dense"): (Candidate("v5p:2x2x1", "fsdp=-1", accum=8),),
    ("7b", "v5p", "splash"): (Candidate("v5p:2x2x1", "fsdp=-1", accum=8),),
    ("34b", "v5p", "dense"): (Candidate("v5p:2x2x1", "fsdp=-1", accum=8), Candidate("v5p:2x2x2", "fsdp=-1", accum=8),
                              Candidate("v5p:2x2x2", TP4, accum=32), Candidate("v5p:2x2x4", "fsdp=-1", accum=8)),
    ("34b", "v5p", "splash"): (Candidate("v5p:2x2x1", "fsdp=-1", accum=8), Candidate("v5p:2x2x2", "fsdp=-1", accum=8),
                               Candidate("v5p:2x2x4", "fsdp=-1", accum=8)),
    ("7b", "v5e", "dense"): V5E_7B_DENSE,
    # the kernel keeps no (T, T) scores: plain FSDP first, tensor parallelism only if that does not fit
    ("7b", "v5e", "splash"): (Candidate("v5e:2x2", "fsdp=-1", accum=8), Candidate("v5e:2x4", "fsdp=-1", accum=8),
                              Candidate("v5e:4x4", "fsdp=-1", accum=8), Candidate("v5e:4x4", TP4, accum=32)),
    ("34b", "v5e", "dense"): (Candidate("v5e:4x8", TP4, accum=32), Candidate("v5e:8x8", TP4, accum=32),
                              Candidate("v5e:8x8", "fsdp=-1,tensor=8", accum=64), Candidate("v5e:8x16", TP4, accum=32)),
    ("34b", "v5e", "splash"): (Candidate("v5e:4x8", "fsdp=-1", accum=8), Candidate("v5e:8x8", "fsdp=-1", accum=8),
                               Candidate("v5e:8x8", TP4, accum=32), Candidate("v5e:8x16", "fsdp=-1", accum=8)),
}
TRAIN_ROWS = tuple(
    Row(f"{key}-{gen}-{attention}", label, config, "train", model, CANDIDATES[(model, gen, attention)], attention)
    for gen in ("v5p", "v5e") for key, label, config, model in STAGES for attention in ("dense", "splash"))
GENERATE_ROWS = (
    Row("7b-gen-v5e", "7B generate 768, cfg 4, 8 prompts", "configs/fpsft_7b_768.py", "generate", "7b",
        (Candidate("v5e:2x2", "tensor=-1", remat="none", extra=GEN),)),
    Row("34b-gen-v5e", "34B generate 768, cfg 4, 8 prompts", "configs/fpsft_34b_512.py", "generate", "34b",
        (Candidate("v5e:2x4", "tensor=-1", remat="none", extra=GEN),)),
    Row("7b-gen-v5p", "7B generate 768, cfg 4, 8 prompts", "configs/fpsft_7b_768.py", "generate", "7b",
        (Candidate("v5p:2x2x1", "tensor=-1", remat="none", extra=GEN),)),
    Row("34b-gen-v5p", "34B generate 768, cfg 4, 8 prompts", "configs/fpsft_34b_512.py", "generate", "34b",
        (Candidate("v5p:2x2x1", "tensor=-1", remat="none", extra=GEN),)),
)
ROWS = TRAIN_ROWS + GENERATE_ROWS


def command(row: Row, c: Candidate, json_path: str) -> list[str]:
    cmd = [sys.executable, "-m", "lumina_jax.aot", "--topology", c.topology, "--config", row.config,
           "--mode", row.mode, "--json", json_path, f"parallel.mesh={c.mesh}", f"parallel.rules={c.rules}",
           f"model.attention_impl={row.attention}"]
    if row.mode == "train":
        cmd += ["--per-device-batch", str(PER_DEVICE_BATCH), f"parallel.grad_accum_steps={c.accum}",
                f"model.remat_policy={c.remat}"]
    return cmd + list(c.extra)


def state_bound(row: Row, c: Candidate) -> str:
    """Why a candidate cannot fit without compiling it, or "" when it might."""
    if row.mode != "train":
        return ""
    per_chip = 16 * PARAMS[row.model] / _chips(c.topology)
    gen = c.topology.split(":")[0]
    hbm = USABLE.get(gen, HBM[gen])
    if per_chip > hbm:
        return f"weights + Adam + gradients alone {per_chip / GiB:.2f} GiB > {hbm / GiB:.2f} GiB usable"
    return ""


def program_key(row: Row, c: Candidate) -> str:
    """Names the compiled program: the effective config (minus names and paths), topology and mode."""
    from lumina_jax.training.config import load_config

    cmd = command(row, c, "")
    overrides = [a for a in cmd if "=" in a and not a.startswith("generate.")]
    cfg = load_config(os.path.join(ROOT, row.config), overrides)
    p = cfg.parallel
    program = [dataclasses.asdict(cfg.model), cfg.data.seq_len, dataclasses.asdict(cfg.loss),
               dataclasses.asdict(cfg.optimizer), p.mesh, p.rules, p.grad_accum_steps]
    blob = json.dumps([program, row.mode, c.topology, list(c.extra), PER_DEVICE_BATCH], sort_keys=True)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    return f"{row.mode}_{row.model}_{c.topology.replace(':', '-')}_{digest}"


_locks: dict = {}
_locks_guard = threading.Lock()


def evaluate(row: Row, c: Candidate, cache_dir: str, fresh: bool, log) -> dict:
    name = program_key(row, c)
    with _locks_guard:
        lock = _locks.setdefault(name, threading.Lock())
    with lock:  # two rows with the same program compile it once
        return _evaluate(row, c, name, cache_dir, fresh and name not in _done, log)


_done: set = set()
CACHED_ONLY = False  # set by --cached-only


def _evaluate(row: Row, c: Candidate, name: str, cache_dir: str, fresh: bool, log) -> dict:
    path = os.path.join(cache_dir, name + ".json")
    _done.add(name)
    if os.path.exists(path) and not fresh:
        with open(path) as f:
            return json.load(f)
    bound = state_bound(row, c)
    if CACHED_ONLY and not bound:
        return {"fits": False, "pending": True}
    if bound:
        result = {"fits": False, "reason": bound, "topology": c.topology}
    else:
        if os.path.exists(path + ".tmp"):  # left by an interrupted run of this script
            os.remove(path + ".tmp")
        cmd = command(row, c, path + ".tmp")
        log(" ".join(cmd[1:]))
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode not in (0, 3) or not os.path.exists(path + ".tmp"):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"{name}: exit {proc.returncode}: " + " | ".join(tail))
        with open(path + ".tmp") as f:
            result = json.load(f)
        os.remove(path + ".tmp")
        result["wall_seconds"] = time.time() - t0
        result["report_text"] = proc.stdout
    result["command"] = "python " + " ".join(command(row, c, "r.json")[1:]).replace(" --json r.json", "")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def gib(n) -> str:
    return f"{n / GiB:.1f} GiB"


TRAIN_COLUMNS = ("stage", "attention", "topology (chips)", "mesh", "batch / accumulation / remat",
                 "per chip: params + opt state, temporaries, total", "headroom", "bytes accessed per chip and step",
                 "largest micro-batch on this slice (accumulation): total", "step at 40% MFU", "smaller slice")
GENERATE_COLUMNS = ("stage", "topology (chips)", "mesh", "batch", "per chip: weights, temporaries, total", "HBM",
                    "headroom", "decode step", "smaller slice")


def _where(fit: dict) -> list[str]:
    mesh = ", ".join(f"{k}={v}" for k, v in fit["mesh"].items() if v > 1) or "1 device"
    return [f"{fit['topology']} ({fit['chips']})", mesh]


def train_cells(row: Row, fit: dict, smaller: str, micro: str) -> list[str]:
    wl, inputs = fit["workload"], fit["inputs"]
    state = inputs.get("parameters", 0) + inputs.get("optimizer state", 0)
    accessed = fit.get("xla_bytes_accessed_per_device")
    return [row.label, row.attention, *_where(fit),
            f"{wl['global batch']}, {wl['per device']} per chip / {wl['grad accumulation']} / {wl['remat']}",
            f"{gib(state)}, {gib(fit['temp_bytes'])}, {gib(fit['total_bytes'])}", gib(fit["headroom_bytes"]),
            gib(accessed) if accessed else "-", micro, f"{fit['step_seconds']:.1f} s", smaller]


def generate_cells(row: Row, fit: dict, smaller: str, micro: str) -> list[str]:
    wl = fit["workload"]
    return [row.label, *_where(fit),
            f"{wl['prompts']} prompts ({wl['rows (with guidance)']} rows), {wl['new tokens']} new tokens",
            f"{gib(fit['inputs']['parameters'])} (bf16 weights), {gib(fit['temp_bytes'])} (KV cache "
            f"{gib(fit['decode']['kv_cache_bytes'])}), {gib(fit['total_bytes'])}",
            gib(fit["hbm_bytes"]), gib(fit["headroom_bytes"]), f"{fit['step_seconds'] * 1e3:.1f} ms / token", smaller]


TABLES = {"train": (TRAIN_COLUMNS, train_cells), "generate": (GENERATE_COLUMNS, generate_cells)}


def table(results: list, mode: str) -> str:
    """The markdown table of `mode`'s rows; (row, fit, smaller, micro) per row, fit None when nothing fits."""
    columns, cells = TABLES[mode]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row, fit, smaller, micro in results:
        if fit is None:
            head = [row.label] + ([row.attention] if mode == "train" else [])
            verdict = "not compiled yet" if "not compiled yet" in smaller else "none of the candidates fits"
            out = head + [verdict] + [""] * (len(columns) - len(head) - 2) + [smaller]
        else:
            out = cells(row, fit, smaller, micro)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def largest_micro_batch(row: Row, c: Candidate, fit: dict, evaluate_fn) -> str:
    """On the slice of the fitting candidate `c` (one sequence per batch shard and micro-step), the largest
    micro-batch in MICRO_BATCHES that also fits, tried largest first; "1" when none does."""
    for mb in MICRO_BATCHES:
        if c.accum % mb or c.accum // mb < 1:
            continue
        r = evaluate_fn(row, dataclasses.replace(c, accum=c.accum // mb))
        if r.get("pending"):
            return f"not compiled yet ({mb} and below)"
        if r["fits"]:
            return f"{mb} ({c.accum // mb}): {gib(r['total_bytes'])}"
    return f"1 ({c.accum}): {gib(fit['total_bytes'])}"


def adopt_cached(cache_dir: str) -> None:
    """Files cached under another key (e.g. before a config gained an unrelated field) are renamed to the
    current key of the candidate whose command they record."""
    wanted = {}
    for row in ROWS:
        micro = [dataclasses.replace(c, accum=c.accum // mb) for c in row.candidates for mb in MICRO_BATCHES
                 if row.mode == "train" and c.accum % mb == 0]
        for c in row.candidates + tuple(micro):
            cmd = "python " + " ".join(command(row, c, "r.json")[1:]).replace(" --json r.json", "")
            wanted.setdefault(cmd, program_key(row, c))
    for fname in os.listdir(cache_dir):
        if not fname.endswith(".json"):
            continue
        with open(os.path.join(cache_dir, fname)) as f:
            cmd = json.load(f).get("command")
        key = wanted.get(cmd)
        if key and fname != key + ".json" and not os.path.exists(os.path.join(cache_dir, key + ".json")):
            os.rename(os.path.join(cache_dir, fname), os.path.join(cache_dir, key + ".json"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None,
                   help="row keys to run (prefix match, e.g. 7b-512 34b-gen 7b-omni-v5p-splash) or a mode (train, generate)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "lumina_aot_results"),
                   help="where each compile's JSON report is kept, so a rerun only compiles what is missing")
    p.add_argument("--fresh", action="store_true", help="ignore cached results and compile again")
    p.add_argument("--cached-only", action="store_true",
                   help="compile nothing: build the table from cached results (candidates not compiled yet are marked)")
    p.add_argument("--jobs", type=int, default=3, help="rows compiled at the same time (each compile is one process)")
    p.add_argument("--write", default="",
                   help="markdown file whose tables between the aot-table (train) and aot-gen-table (generate) markers "
                        "are replaced, for the modes that the selected rows cover")
    args = p.parse_args(argv)
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    os.makedirs(args.cache_dir, exist_ok=True)
    adopt_cached(args.cache_dir)
    rows = [r for r in ROWS if args.only is None or any(r.key.startswith(o) or r.mode == o for o in args.only)]
    bar = tqdm(total=len(rows), desc="rows", unit="row")

    def evaluate_fn(row: Row, c: Candidate) -> dict:
        return evaluate(row, c, args.cache_dir, args.fresh, tqdm.write)

    def do_row(row: Row):
        fit, smaller, micro = None, "-", "-"
        for c in row.candidates:
            try:
                r = evaluate(row, c, args.cache_dir, args.fresh, tqdm.write)
            except RuntimeError as e:  # a compiler or tool error: report it in the row, go on with the others
                tqdm.write(str(e))
                smaller = f"{c.topology}: error ({str(e)[-120:]})"
                break
            if r["fits"]:
                fit = r
                if row.mode == "train":
                    try:
                        micro = largest_micro_batch(row, c, r, evaluate_fn)
                    except RuntimeError as e:
                        tqdm.write(str(e))
                        micro = f"error ({str(e)[-120:]})"
                break
            if r.get("pending"):
                smaller = f"{c.topology}: not compiled yet" + (f"; before it {smaller}" if smaller != "-" else "")
                break
            need = r.get("compiler_need_bytes") if r.get("temp_bytes") is None else None
            why = r.get("reason") or (f"needs {gib(need or r['total_bytes'])}" + ("+" if need else ""))
            smaller = f"{c.topology}: {why}"
        if fit is not None and smaller == "-" and row.mode == "train":
            smaller = "smallest slice of the generation"
        bar.update(1)
        return row, fit, smaller, micro

    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(do_row, rows))
    bar.close()
    tables = {mode: table([r for r in results if r[0].mode == mode], mode)
              for mode in TABLES if any(r[0].mode == mode for r in results)}
    for text in tables.values():
        print(text)
    if args.write:
        with open(args.write) as f:
            doc = f.read()
        for mode, text in tables.items():
            begin, end = MARKERS[mode]
            if begin not in doc or end not in doc:
                raise SystemExit(f"{args.write}: no {begin} ... {end} markers")
            head, rest = doc.split(begin, 1)
            _, tail = rest.split(end, 1)
            doc = head + begin + "\n" + text + "\n" + end + tail
        with open(args.write, "w") as f:
            f.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
