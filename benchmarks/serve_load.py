"""Load run of the web server on loopback: batching on (--max-batch 8) against batching off (--max-batch 1).

For each setting a fresh `python -m lumina_jax.serve` (the shipped demo model unless --checkpoint) starts on a
free 127.0.0.1 port with --warm-up, so compilation is excluded. Then --clients threads each send their share
of --requests text-to-image requests (POST /api/t2i, 128x128, the page's defaults, one image, distinct seeds
and shape prompts) one after another, and the script prints requests/s, p50 / p95 latency, the generate calls
the server made (from /api/info; wall/call approximates one call's time, as the worker is never idle under
this load) and the ratio of the two settings' rates. Every request must answer 200.
The run is bounded: a fixed number of requests, each with a timeout, and a deadline per setting.

    JAX_PLATFORMS=cpu python benchmarks/serve_load.py                  # 32 requests from 8 clients (~2-4 min)
    JAX_PLATFORMS=cpu python benchmarks/serve_load.py --requests 64 --clients 16 --max-batch 16

The load average (1 / 5 / 15 min) is printed before and after: the machine is shared, and the figures move
with it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_jax.demo.shapes import COLOURS, SHAPES  # noqa: E402
from lumina_jax.testing.serve import ServerProcess  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32, help="requests per setting (default 32)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, each sending in turn (default 8)")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the batching server (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="--max-wait-ms of both servers (default 50)")
    p.add_argument("--size", default="128x128", help="image size of every request (default 128x128)")
    p.add_argument("--checkpoint", default=None, help="model directory (default: the shipped demo model)")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="deadline in seconds for one setting's requests (default 1200); each request gets 300")
    return p.parse_args(argv)


def prompts(n: int) -> list[str]:
    """n captions of the shapes set (all of one prompt-length bucket, so one compiled program serves them)."""
    combos = [(shape, colour, bg) for colour in COLOURS for bg in COLOURS if bg != colour for shape in SHAPES]
    return [f"a {c} {s} on a {b} background" for s, c, b in (combos[i % len(combos)] for i in range(n))]


def run_setting(max_batch: int, args) -> dict:
    """Starts a server with `max_batch`, sends the load, stops it; returns the figures."""
    flags = ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--warm-up"]
    if args.checkpoint:
        flags += ["--checkpoint", args.checkpoint]
    log = Path(tempfile.mkdtemp(prefix="serve-load-")) / f"server_batch{max_batch}.log"
    bodies = [dict(prompt=p, size=args.size, seed=i) for i, p in enumerate(prompts(args.requests))]
    with ServerProcess(flags, log_path=log) as server:
        before = server.info()["served"]

        def client(k: int) -> list[tuple[int, float]]:
            out = []
            for body in bodies[k::args.clients]:
                t = time.perf_counter()
                status = server.t2i(**body)[0]
                out.append((status, time.perf_counter() - t))
            return out

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(client, k) for k in range(args.clients)]
            done, pending = concurrent.futures.wait(futures, timeout=args.timeout)
            if pending:
                server.stop()  # unblocks the waiting clients
                raise SystemExit(f"max batch {max_batch}: the load did not finish within {args.timeout:.0f} s")
        wall = time.perf_counter() - start
        after = server.info()["served"]
    results = [r for f in futures for r in f.result()]
    bad = [s for s, _ in results if s != 200]
    if bad:
        raise SystemExit(f"max batch {max_batch}: {len(bad)} request(s) failed with status {sorted(set(bad))}; "
                         f"server log: {log}")
    lat = np.asarray([t for _, t in results])
    calls = after["generate_calls"] - before["generate_calls"]
    return {"max_batch": max_batch, "wall": wall, "rps": len(results) / wall, "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "calls": calls, "rows_per_call": len(results) / max(calls, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.requests < 1 or args.clients < 1 or args.max_batch < 2:
        raise SystemExit("--requests and --clients must be >= 1 and --max-batch >= 2")
    load0 = os.getloadavg()
    print(f"{args.requests} requests from {args.clients} clients, {args.size}, max wait {args.max_wait_ms:g} ms; "
          f"load average before: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}", flush=True)
    rows = [run_setting(args.max_batch, args), run_setting(1, args)]
    load1 = os.getloadavg()
    print(f"{'setting':>22} {'requests/s':>11} {'p50 s':>8} {'p95 s':>8} {'wall s':>8} {'calls':>6} {'req/call':>9} "
          f"{'wall/call s':>12}")
    for r in rows:
        name = f"batching (max {r['max_batch']})" if r["max_batch"] > 1 else "no batching (max 1)"
        print(f"{name:>22} {r['rps']:>11.2f} {r['p50']:>8.2f} {r['p95']:>8.2f} {r['wall']:>8.1f} {r['calls']:>6d} "
              f"{r['rows_per_call']:>9.2f} {r['wall'] / max(r['calls'], 1):>12.3f}")
    print(f"ratio (batching / none): requests/s {rows[0]['rps'] / rows[1]['rps']:.2f}x, "
          f"p50 latency {rows[0]['p50'] / rows[1]['p50']:.2f}x, p95 latency {rows[0]['p95'] / rows[1]['p95']:.2f}x")
    print(f"load average after: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
