"""The quantisation table of docs/quantization.md: guided generation at 768 px (7B and 34B, 8 and 32 prompts,
v5e and v5p) with bf16 weights and cache, int8 weights, and int8 weights + an int8 KV cache, each compiled for
TPU with `python -m lumina_jax.aot --mode generate` on the smallest slice that fits (tensor-parallel mesh; with
more chips than KV heads, one chip per head and the prompt rows split over the rest: `mesh_spec`).

Per row: weights and KV cache per chip, the total per chip, the smallest slice (with why the next smaller
one was rejected), and two byte counts of one compiled decode step: its HBM reads and writes
(`lumina_jax.aot.hbm_traffic`, which leaves out the on-chip side of memory-space assignment's copies) and
XLA's cost analysis (which counts those copies and every fused operation's operands and results, several times
the HBM traffic). The roofline step is the HBM bytes at the chip's bandwidth. Both counts are also given as a
ratio to the bf16 row of the same model, batch and chip: per chip when both run on the same slice, else the
bytes of all chips of each slice (the work of one step wherever it runs).

    python benchmarks/aot_quantize.py --list                      # the rows and their keys
    python benchmarks/aot_quantize.py --only 7b-8-v5e-bf16,7b-8-v5e-int8+kv8
    python benchmarks/aot_quantize.py --cached-only --markdown    # the table from cached results

Results are cached as JSON under --cache-dir (one file per compile), so a rerun compiles only what is
missing. This is a planning tool: a fitting 7B/34B generate program takes minutes of CPU to compile; run one
at a time on a shared host (e.g. under `flock`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"7b": "configs/fpsft_7b_768.py", "34b": "configs/fpsft_34b_512.py"}  # generate mode reads the model
SLICES = {"v5e": ["v5e:2x2", "v5e:2x4", "v5e:4x4"], "v5p": ["v5p:2x2x1", "v5p:2x2x2"]}
OPTIONS = {"bf16": ("none", "none"), "int8": ("int8", "none"), "int8+kv8": ("int8", "int8")}
GiB = 1024 ** 3
TOPOLOGY_BANDWIDTH = {"v5e": 819e9, "v5p": 2765e9}  # HBM bytes/s per chip (lumina_jax.aot.topology)


def rows():
    """(key, model, batch, chip, option) in the order they are worth compiling."""
    out = []
    for batch in (8, 32):
        for chip in ("v5e", "v5p"):
            for model in ("7b", "34b"):
                for option in OPTIONS:
                    out.append((f"{model}-{batch}-{chip}-{option}", model, batch, chip, option))
    return out


def mesh_spec(model: str, topology: str) -> str:
    """Tensor parallelism over every chip of the slice, or, with more chips than the model has KV heads (the
    cache splits by head), over one chip per KV head with the prompt rows split over the rest."""
    from lumina_jax.aot.topology import parse_topology
    from lumina_jax.training.config import load_config

    chips = parse_topology(topology).num_chips
    heads = load_config(os.path.join(ROOT, CONFIGS[model]), []).model.num_kv_heads
    return "tensor=-1" if heads % chips == 0 else f"data={chips // heads},tensor={heads}"


def compile_one(model: str, batch: int, topology: str, option: str, cache_dir: str, cached_only: bool):
    """The aot tool's JSON report for one compile (cached), or None when not cached and `cached_only`."""
    weights, kv = OPTIONS[option]
    argv = ["--topology", topology, "--config", CONFIGS[model], "--mode", "generate",
            f"parallel.mesh={mesh_spec(model, topology)}",
            "parallel.rules=tensor", f"generate.batch_size={batch}", "generate.image_size=768",
            "generate.cfg_scale=4.0", f"generate.weight_quant={weights}", f"generate.kv_cache_quant={kv}"]
    key = hashlib.sha1(" ".join(argv).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{model}-{batch}-{topology.replace(':', '_')}-{option}-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if cached_only:
        return None
    print(f"compiling {model} batch {batch} {option} on {topology} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "lumina_jax.aot", *argv, "--json", path + ".tmp"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"aot failed ({proc.returncode}) for {argv}: {proc.stderr.strip()[-2000:]}")
    os.replace(path + ".tmp", path)
    with open(path) as f:
        return json.load(f)


def smallest_fit(model, batch, chip, option, cache_dir, cached_only):
    """(report of the smallest fitting slice or None, reasons the smaller ones were rejected)."""
    rejected = []
    for topology in SLICES[chip]:
        rep = compile_one(model, batch, topology, option, cache_dir, cached_only)
        if rep is None:
            return None, rejected + [f"{topology}: not compiled"]
        if rep["fits"]:
            return rep, rejected
        rejected.append(f"{topology}: needs {rep['total_bytes'] / GiB:.1f} GiB")
    return None, rejected


def analytic_rows(chips_wanted=("v5e", "v5p")):
    """Without compiling: weights and KV cache per chip from the abstract sharded inputs of the generate program
    (exact), the bytes of reading both once per step, that time at the chip's HBM bandwidth, and the smallest
    slice whose chips can hold weights + KV cache at all (a lower bound: temporaries and code come on top)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from lumina_jax import sharding
    from lumina_jax.aot.programs import device_bytes
    from lumina_jax.aot.topology import build_mesh, parse_topology, topology_devices
    from lumina_jax.models.attention import init_cache
    from lumina_jax.param_checkpoint import abstract_like
    from lumina_jax.state import abstract_params
    from lumina_jax.training.config import load_config
    from lumina_jax.unirep import unirep_length

    usable = {"v5e": 15.75 * GiB, "v5p": 95.74 * GiB}
    slots = 64 + unirep_length(768, 768) + 8  # the aot tool's prompt bucket + image + extra tokens
    lines = ["| model, prompts (rows) | chip | weights / KV cache | per chip on the smallest slice: weights, KV cache "
             "| bytes read per step (weights + KV) | at HBM bandwidth | smallest slice holding weights + KV |",
             "|---|---|---|---|---|---|---|"]
    rules = sharding.rule_set("tensor")

    def per_chip(model, batch, topology, weights, kv):
        mcfg = load_config(os.path.join(ROOT, CONFIGS[model]), []).model
        cfg = mcfg.replace(param_dtype="bfloat16", dtype="bfloat16", scan_layers=False, dropout=0.0,
                           weight_quant=weights, kv_cache_quant=kv)
        topo = parse_topology(topology)
        mesh = build_mesh(topo, topology_devices(topo), mesh_spec(model, topology))
        cache = jax.eval_shape(lambda: init_cache(cfg, 2 * batch, slots))
        return (device_bytes(abstract_params(cfg, mesh, rules)),
                device_bytes(abstract_like(cache, sharding.cache_shardings(cfg, mesh, rules))), topo)

    for batch in (8, 32):
        for chip in chips_wanted:
            for model in ("7b", "34b"):
                for option, (weights, kv) in OPTIONS.items():
                    for topology in SLICES[chip]:
                        w, k, topo = per_chip(model, batch, topology, weights, kv)
                        if w + k <= usable[chip]:
                            break
                    ratio = ""
                    if option != "bf16":  # against bf16 on the same slice
                        bw, bk, _ = per_chip(model, batch, topology, "none", "none")
                        ratio = f" ({(w + k) / (bw + bk):.2f}x bf16 on {topology})"
                    lines.append(f"| {model.upper()}, {batch} ({2 * batch}) | {chip} | {option} | {w / GiB:.2f} GiB, "
                                 f"{k / GiB:.2f} GiB | {(w + k) / GiB:.2f} GiB{ratio} | "
                                 f"{(w + k) / topo.chip.hbm_bandwidth * 1e3:.1f} ms | {topology} ({topo.num_chips}) |")
    return "\n".join(lines)


def table(results) -> str:
    head = ("| model, prompts (rows) | chip | weights / KV cache | slice (chips) | per chip: weights, KV cache, total | "
            "HBM bytes per decode step (vs bf16) | XLA cost-analysis bytes per step (vs bf16) | roofline step | "
            "smaller slice |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    bf16 = {}
    for (key, model, batch, chip, option), (rep, rejected) in results:
        if rep is None:
            lines.append(f"| {model.upper()}, {batch} ({2 * batch}) | {chip} | {option} | none of "
                         f"{', '.join(SLICES[chip])} | | | | | {'; '.join(rejected)} |")
            continue
        d = rep["decode"]
        step = d.get("step_bytes_accessed") or 0.0
        hbm = d.get("step_hbm_bytes") or 0.0
        topo = rep["topology"]
        if option == "bf16":
            bf16[(model, batch, chip)] = (hbm, step, rep["chips"], topo)
        base = bf16.get((model, batch, chip))

        def ratio(value, i):
            """Against bf16 per chip on the same slice; on another slice, the bytes of all chips together."""
            if option == "bf16" or not base or not base[i]:
                return ""
            if base[3] == topo:
                return f" ({value / base[i]:.2f}x)"
            return f" ({value * rep['chips'] / (base[i] * base[2]):.2f}x over all chips; bf16 on {base[3]})"

        lines.append(
            f"| {model.upper()}, {batch} ({2 * batch}) | {chip} | {option} | {topo} ({rep['chips']}) | "
            f"{d['param_bytes'] / GiB:.1f} GiB, {d['kv_cache_bytes'] / GiB:.1f} GiB, {rep['total_bytes'] / GiB:.1f} GiB | "
            f"{hbm / GiB:.2f} GiB{ratio(hbm, 0)} | {step / GiB:.2f} GiB{ratio(step, 1)} | "
            f"{hbm / TOPOLOGY_BANDWIDTH[chip] * 1e3:.1f} ms | {'; '.join(rejected) or '-'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated row keys (see --list); default all")
    p.add_argument("--list", action="store_true", help="print the row keys and exit")
    p.add_argument("--cached-only", action="store_true", help="compile nothing; use cached results only")
    p.add_argument("--markdown", action="store_true", help="print the markdown table at the end")
    p.add_argument("--analytic", action="store_true",
                   help="compile nothing: print weights / KV per chip and bytes per step from the abstract inputs")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "lumina_aot_quantize"),
                   help="where compile results are kept (default: lumina_aot_quantize in the temporary directory)")
    args = p.parse_args(argv)
    all_rows = rows()
    if args.analytic:
        print(analytic_rows())
        return 0
    if args.list:
        print("\n".join(r[0] for r in all_rows))
        return 0
    wanted = set(filter(None, args.only.split(",")))
    unknown = wanted - {r[0] for r in all_rows}
    if unknown:
        print(f"error: --only: unknown rows {sorted(unknown)} (see --list)", file=sys.stderr)
        return 2
    os.makedirs(args.cache_dir, exist_ok=True)
    results = []
    for row in all_rows:
        cached_only = args.cached_only or (wanted and row[0] not in wanted)
        res = smallest_fit(*row[1:], args.cache_dir, cached_only)
        if res[0] is not None or not cached_only:
            results.append((row, res))
    if args.markdown:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
