"""Image generation speed: our jitted sampler vs a PyTorch baseline that follows the reference's design.

Both sides generate one 256x256 image (16x16 latent: 16 * 17 + 1 = 273 body tokens) with guidance 4 and
image top-k 2000, from the same random weights (a transformers Chameleon saved with `save_pretrained` and
converted with `python -m lumina_jax.convert chameleon`), vocabulary 65536, float32.

Baseline (the reference's design, docs/reference.md "Guidance" and "Batch-1 processors"): transformers'
`ChameleonModel` + `lm_head` with a `DynamicCache`, batch 1; the unconditional branch is a second, separate
forward with its own cache, run on every image step; the CFG / structure-forcing / interleaved top-k
processors run in Python per step (recounting image starts/ends over the whole sequence, as the reference
does), then softmax + multinomial.
Our sampler: prefill + one jitted `lax.while_loop`, cond and uncond rows in one forward, image-id-only
output projection and top-k inside images.

Both prompts end with the image header [<racm3:break>, h, w], so both sample exactly the 273 body tokens plus
one text token. Compilation is excluded (one warm-up run first). Prints tokens/s, images/s and the ratio of
wall-clock rates, plus the ratio of CPU seconds per token (all threads), which is steadier on a shared
machine (torch's thread count is chosen by a probe; XLA uses its own pool). The load average is printed too.

    python benchmarks/generate.py                     # small and medium shapes (~3-4 minutes on 2 cores)
    python benchmarks/generate.py --shapes small --batch 4
    python benchmarks/generate.py --shapes medium --jacobi-window 16 --baseline-tokens 32   # also SJD

With `--jacobi-window L` our sampler also runs speculative Jacobi decoding (coupled drafts) on the same prompt:
its model steps, tokens/s and the cost of one L-token step against a one-token step. Random weights accept
few drafts, so this shows the price of a step, not the speed-up of a trained model (benchmarks/jacobi.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

SHAPES = {  # hidden, layers, heads, MLP
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688),
    "medium": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=2816),
}
VOCAB = 65536
IMAGE_START, IMAGE_END, NEW_LINE, SIZE_BASE, EOT = 8197, 8196, 8803, 8804, 8710
IMG_LO, IMG_HI = 4, 8196


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small,medium", help="comma-separated shapes to run: small, medium")
    p.add_argument("--size", type=int, default=256, help="square image side in pixels (multiple of 32)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale")
    p.add_argument("--image-top-k", type=int, default=2000, help="top-k inside images")
    p.add_argument("--text-top-k", type=int, default=10, help="top-k outside images")
    p.add_argument("--prompt-len", type=int, default=32, help="text tokens in the prompt before the image header")
    p.add_argument("--baseline-tokens", type=int, default=0,
                   help="stop the baseline after this many tokens (0 = the whole image) and report its rate")
    p.add_argument("--batch", type=int, default=1,
                   help="also time our sampler with this many images in one batch (1 = only the batch-1 run)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the baseline (0 = whichever of 1 and 2 is faster on a 16-token probe; "
                        "on a busy machine torch's spinning thread pool can be 30x slower with 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of sampling")
    p.add_argument("--jacobi-window", type=int, default=0,
                   help="also run our sampler with speculative Jacobi decoding of this window (0 = not)")
    return p.parse_args(argv)


def vocabulary_map():
    names = {f"<reserved{i - 4:05d}>": i for i in range(IMG_HI, VOCAB)}
    names.update({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": IMAGE_END, "<racm3:break>": IMAGE_START})
    names.update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(i - IMG_LO)) + "Z": i
                  for i in range(IMG_LO, IMG_HI)})
    return names


def build_hf(shape: str, seed: int):
    import torch
    import transformers

    kw = SHAPES[shape]
    cfg = transformers.ChameleonConfig(
        vocab_size=VOCAB, num_key_value_heads=kw["num_attention_heads"], vocabulary_map=vocabulary_map(),
        max_position_embeddings=4096, vq_config=dict(base_channels=32, channel_multiplier=[1, 2], num_embeddings=64,
                                                     embed_dim=32, latent_channels=32, resolution=32), **kw)
    torch.manual_seed(seed)
    model = transformers.ChameleonForConditionalGeneration(cfg).eval().float()
    with torch.no_grad():  # peakier logits than the 0.02 init, so top-k and sampling see a realistic spread
        model.lm_head.weight.mul_(20.0)
    return model


# ---- the baseline: reference design in PyTorch -------------------------------------------------------------

class ReferenceProcessors:
    """CFG -> MultiModal -> InterleavedTopK of the reference, per step on the Python-side id list (batch 1)."""

    def __init__(self, model, cfg, image_top_k, text_top_k):
        import torch

        self.model, self.cfg, self.image_top_k, self.text_top_k = model, cfg, image_top_k, text_top_k
        self.suppress = torch.ones(VOCAB, dtype=torch.bool)
        self.suppress[IMG_LO:IMG_HI] = False
        self.uncond = None  # (cache, length)

    def uncond_logits(self, ids, s):
        import torch
        from transformers import DynamicCache

        if self.uncond is None:  # first guided step: [8197, h, w, ...] from position 0, own cache
            cache = DynamicCache()
            inp = torch.tensor([ids[s:]])
            out = self.model.model(input_ids=inp, past_key_values=cache, use_cache=True)
            self.uncond = (cache, inp.shape[1])
        else:
            cache, n = self.uncond
            inp = torch.tensor([[ids[-1]]])
            out = self.model.model(input_ids=inp, past_key_values=cache, use_cache=True,
                                   position_ids=torch.tensor([[n]]), cache_position=torch.tensor([n]))
            self.uncond = (cache, n + 1)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def __call__(self, ids, scores):
        import torch

        n_start, n_end = ids.count(IMAGE_START), ids.count(IMAGE_END)
        inside = n_start == n_end + 1
        if not inside:
            self.uncond = None
        else:
            s = len(ids) - 1 - ids[::-1].index(IMAGE_START)
            new = len(ids) - s - 1
            if new >= 2:
                if self.cfg != 1.0:
                    u = self.uncond_logits(ids, s)
                    scores = u + self.cfg * (scores - u)
                h, w = ids[s + 1] - SIZE_BASE, ids[s + 2] - SIZE_BASE
                t = len(ids) - s - 3
                W, H = 2 * w, 2 * h
                if (t + 1) % (W + 1) == 0:
                    scores = torch.full_like(scores, -float("inf"))
                    scores[:, NEW_LINE] = 0
                elif t + 1 == (W + 1) * H + 1:
                    scores = torch.full_like(scores, -float("inf"))
                    scores[:, IMAGE_END] = 0
                else:
                    scores = scores.masked_fill(self.suppress, -float("inf"))
        k = self.image_top_k if inside else self.text_top_k
        thr = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < thr, -float("inf"))


def run_baseline(model, prompt, max_new, args):
    import torch
    from transformers import DynamicCache

    torch.manual_seed(args.seed)
    procs = ReferenceProcessors(model, args.cfg, args.image_top_k, args.text_top_k)
    ids = list(prompt)
    cache = DynamicCache()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        for i in range(max_new):
            scores = model.lm_head(out.last_hidden_state[:, -1]).float()
            scores = procs(ids, scores)
            tok = int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
            ids.append(tok)
            if tok == EOT or i + 1 == max_new:
                break
            n = len(ids) - 1
            out = model.model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                              position_ids=torch.tensor([[n]]), cache_position=torch.tensor([n]))
    return ids[len(prompt):], time.perf_counter() - t0, time.process_time() - c0


# ---- ours ----------------------------------------------------------------------------------------------------

def load_ours(model, tmp):
    from lumina_jax import param_checkpoint
    from lumina_jax.config import ChameleonConfig
    from lumina_jax.convert.chameleon import convert
    from lumina_jax.models.chameleon import unstack_layers

    src = os.path.join(tmp, "hf")
    model.save_pretrained(src)
    cfg = convert(src, os.path.join(tmp, "ours"), dtype="float32", compute_dtype="float32",
                  mask_image_logits=False, progress=False)
    params = param_checkpoint.restore_params(os.path.join(tmp, "ours"))
    # decoding runs layer by layer: unstacked weights avoid slicing the stacked ones at every step
    return ChameleonConfig.from_dict(cfg.to_dict()).replace(scan_layers=False), unstack_layers(params)


def run_ours(cfg, params, prompts, max_new, args, jacobi=None):
    from lumina_jax.sampling import processors
    from lumina_jax.sampling.decode import ChameleonDecodeModel
    from lumina_jax.sampling.generate import generate_tokens
    from lumina_jax.tokenizer import SpecialIds

    s = processors.SamplingSettings(cfg_scale=args.cfg, image_top_k=args.image_top_k, text_top_k=args.text_top_k,
                                    max_new_tokens=max_new, constrain_size=False)
    ids = processors.TokenIds.from_special_ids(SpecialIds.from_layout(IMG_HI - IMG_LO, VOCAB), VOCAB)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = generate_tokens(ChameleonDecodeModel(cfg), params, prompts, seeds=list(range(len(prompts))),
                           settings=s, ids=ids, jacobi=jacobi)
    return rows, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    args = parse_args(argv)
    import jax
    import torch

    side = args.size // 32
    body = (2 * side) * (2 * side + 1) + 1
    max_new = body + 1
    rng = np.random.default_rng(args.seed)
    prompt = [0] + rng.integers(9000, 60000, args.prompt_len).tolist() + [EOT, IMAGE_START, SIZE_BASE + side,
                                                                          SIZE_BASE + side]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}; {args.size}x{args.size} image = {body} body tokens, "
          f"cfg {args.cfg}, image top-k {args.image_top_k}, vocabulary {VOCAB}")
    results = []
    for shape in args.shapes.split(","):
        model = build_hf(shape, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            cfg, params = load_ours(model, tmp)
        run_ours(cfg, params, [prompt], max_new, args)  # compile
        rows, t_ours, c_ours = run_ours(cfg, params, [prompt], max_new, args)
        n_ours = len(rows[0].tokens)
        assert rows[0].tokens[body - 1] == IMAGE_END, "our sampler did not close the image where expected"
        base_new = args.baseline_tokens or max_new
        threads = [args.threads] if args.threads else [1, 2]
        probe = {}
        for n in threads:  # warm-up, and pick the faster thread count
            torch.set_num_threads(n)
            run_baseline(model, prompt, 3, args)
            probe[n] = run_baseline(model, prompt, 16, args)[1]
        torch.set_num_threads(min(probe, key=probe.get))
        toks, t_base, c_base = run_baseline(model, prompt, base_new, args)
        assert len(toks) < body or toks[body - 1] == IMAGE_END, "baseline did not close the image where expected"
        ours_tps, base_tps = n_ours / t_ours, len(toks) / t_base
        line = (f"{shape:6s} ours {ours_tps:8.1f} tok/s {1 / t_ours:6.3f} img/s | baseline {base_tps:7.1f} tok/s "
                f"{base_tps / max_new:6.3f} img/s ({len(toks)} tokens timed, {torch.get_num_threads()} threads) | ratio "
                f"{ours_tps / base_tps:5.2f}x | CPU-time ratio {(c_base / len(toks)) / (c_ours / n_ours):5.2f}x")
        if args.batch > 1:
            run_ours(cfg, params, [prompt] * args.batch, max_new, args)  # compile
            jrows, t_b, _ = run_ours(cfg, params, [prompt] * args.batch, max_new, args)
            ntok = sum(len(r.tokens) for r in jrows)
            line += f" | ours batch {args.batch}: {ntok / t_b:8.1f} tok/s {args.batch / t_b:6.3f} img/s"
        if args.jacobi_window:
            from lumina_jax.sampling.jacobi import JacobiSettings

            sjd = JacobiSettings(args.jacobi_window)
            run_ours(cfg, params, [prompt], max_new, args, sjd)  # compile
            srows, t_sjd, _ = run_ours(cfg, params, [prompt], max_new, args, sjd)
            assert srows[0].tokens[body - 1] == IMAGE_END, "SJD did not close the image where expected"
            steps = srows[0].steps
            line += (f" | SJD L={sjd.window}: {steps} steps ({n_ours / steps:.2f} tok/step), "
                     f"{len(srows[0].tokens) / t_sjd:8.1f} tok/s, {(t_sjd / steps) / (t_ours / n_ours):5.2f}x "
                     f"the time of a one-token step")
        print(line, flush=True)
        results.append((shape, ours_tps, base_tps))
        del model
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
