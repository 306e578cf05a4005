"""Pre-tokenize conversations with images into a tensorflow-datasets ArrayRecord dataset, resumably.

    python -m lumina_jax.data.pretokenize --input data.json --out DIR --target-size 512 \\
        --tokenizer ckpts/text_tokenizer.json --vqgan ckpts/vqgan [--shard I --num-shards N]

Input: the reference's JSON list of `{"conversations": [{"from": "human"|"gpt", "value": ...}, ...],
"image": [paths] | path}` (`"image"` optional: text-only items are kept). Output: DIR is a tfds dataset
directory (see `lumina_jax.data.records`), readable by `tfds.builder_from_directory(DIR)` and by the grain
pipeline, plus `pretokenize_report.json` listing every bad item with its id and reason.

Work is done in chunks of `--chunk-size` items: the images of a chunk are cropped, grouped by size and
encoded by the jitted VQGAN in batches; the chunk is written to its own ArrayRecord file under DIR/_work and
committed by atomically rewriting a progress file. A run killed at any point and started again with the same
arguments redoes only the uncommitted chunk, so the result equals an uninterrupted run. With `--num-shards N`
each shard (run separately, e.g. one per host) takes a contiguous 1/N of the items; the run that completes the
last shard assembles the dataset (renames the chunk files into tfds shards and writes the metadata).

Bad items (missing or unreadable image, placeholder count mismatch, malformed conversation, more tokens than
`--max-length`) are never replaced by another item: they are left out, counted, and listed in the report.
Differences from the reference: batched VQGAN encoding, centred crops unless `--random-crop` (seeded per item),
text-only items kept, no per-sample pickle files.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
import time

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from lumina_jax.conversation import IMAGE_PLACEHOLDER, ConversationError, encode_conversation
from lumina_jax.data import records
from lumina_jax.image_tokenizer import ImageTokenizer
from lumina_jax.param_checkpoint import CheckpointError
from lumina_jax.tokenizer import load_tokenizer
from lumina_jax.unirep import codes_to_unirep, crop_size_list, encode_arrays, prepare_image, target_size_flag
from lumina_jax.validation import SEED_MAX, int_flag, parse_json

WORK = "_work"
REPORT = "pretokenize_report.json"
COMMIT_DELAY_ENV = "LUMINA_PRETOKENIZE_COMMIT_DELAY_S"


class BadItem(Exception):
    """An item that cannot be tokenized; `kind` is the report category."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def shard_range(num_items: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous item range of a shard: [ceil(N/S)*r, min(ceil(N/S)*(r+1), N)) as the reference."""
    per = math.ceil(num_items / num_shards)
    return min(per * shard, num_items), min(per * (shard + 1), num_items)


def _image_paths(item: dict, image_root: str) -> list[str]:
    images = item.get("image", item.get("<|image|>"))
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadItem("malformed item", "'image' must be a path or a list of paths")
    return [p if os.path.isabs(p) else os.path.join(image_root, p) for p in images]


def _load_image(path: str):
    if not os.path.isfile(path):
        raise BadItem("missing image", path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
        raise BadItem("corrupt image", f"{path} ({type(e).__name__}: {e})") from None


class Pretokenizer:
    """Turns items into (tokens, labels); images are encoded per chunk in batches."""

    def __init__(self, tokenizer_path: str, vqgan_dir: str | None, target_size: int, max_length: int,
                 batch_size: int, random_crop: bool, seed: int, image_root: str, image_tokenizer=None,
                 num_workers: int = 4):

        self.tokenizer, self.special = load_tokenizer(tokenizer_path)
        self.crop_sizes = crop_size_list(target_size)
        self.vqgan_dir, self._image_tokenizer = vqgan_dir, image_tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.random_crop, self.seed, self.image_root = random_crop, seed, image_root
        self.num_workers = max(1, num_workers)

    @property
    def image_tokenizer(self):
        if self._image_tokenizer is None:
            if not self.vqgan_dir:
                raise ValueError("items have images but no --vqgan checkpoint directory was given")

            self._image_tokenizer = ImageTokenizer.from_checkpoint(self.vqgan_dir)
        return self._image_tokenizer

    def process_chunk(self, items: list[tuple[int, dict]]):
        """-> (good [(id, tokens, labels)], bad [(id, kind, detail)]) in item order."""

        def prepare(idx, item):
            if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
                raise BadItem("malformed item", "no 'conversations' list")
            paths = _image_paths(item, self.image_root)
            n_ph = sum(str(t.get("value") or "").count(IMAGE_PLACEHOLDER)
                       for t in item["conversations"] if isinstance(t, dict))
            if n_ph and n_ph != len(paths):
                raise BadItem("placeholder mismatch", f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s), {len(paths)} image(s)")
            rng = np.random.default_rng([self.seed, idx]) if self.random_crop else None  # per item: order-free
            return [prepare_image(_load_image(p), self.crop_sizes, rng, self.random_crop) for p in paths]

        prepared, bad = {}, {}
        # image decoding and resizing (PIL releases the GIL) overlap in threads; results keep item order
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            futures = [(idx, pool.submit(prepare, idx, item)) for idx, item in items]
            for idx, fut in futures:
                try:
                    prepared[idx] = fut.result()
                except BadItem as e:
                    bad[idx] = (e.kind, e.detail)
        flat = [a for idx, _ in items if idx in prepared for a in prepared[idx]]
        codes = encode_arrays(flat, self.image_tokenizer, self.batch_size) if flat else []
        good, k = [], 0
        for idx, item in items:
            if idx in bad:
                continue
            n = len(prepared[idx])
            unireps = [codes_to_unirep(c, self.special) for c in codes[k:k + n]]
            k += n
            try:
                tokens, labels = encode_conversation(item["conversations"], self.tokenizer, self.special, unireps)
            except ConversationError as e:
                kind = "placeholder mismatch" if "placeholder" in str(e) else "malformed conversation"
                bad[idx] = (kind, str(e))
                continue
            if self.max_length and tokens.size > self.max_length:
                bad[idx] = ("too long", f"{tokens.size} tokens > --max-length {self.max_length}")
                continue
            good.append((idx, tokens, labels))
        return good, sorted((i, kind, d) for i, (kind, d) in bad.items())


@contextlib.contextmanager
def _file_lock(path: str):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shard_dir(out: str, shard: int, num_shards: int) -> str:
    return os.path.join(out, WORK, f"shard{shard:05d}-of-{num_shards:05d}")


def run_shard(args, items: list, pretok: Pretokenizer) -> dict:
    """Process this shard's uncommitted chunks; returns its progress record."""

    sdir = _shard_dir(args.out, args.shard, args.num_shards)
    os.makedirs(sdir, exist_ok=True)
    start, end = shard_range(len(items), args.shard, args.num_shards)
    num_chunks = math.ceil((end - start) / args.chunk_size)
    progress_path = os.path.join(sdir, "progress.json")
    progress = records.read_json(progress_path) if os.path.exists(progress_path) else {"next_chunk": 0}
    done = progress["next_chunk"]
    bar = tqdm(total=end - start, initial=min(done * args.chunk_size, end - start), unit="item",
               desc=f"shard {args.shard}/{args.num_shards}", disable=args.quiet)
    for c in range(done, num_chunks):
        lo = start + c * args.chunk_size
        hi = min(lo + args.chunk_size, end)
        good, bad = pretok.process_chunk([(i, items[i]) for i in range(lo, hi)])
        w = records.RecordWriter(os.path.join(sdir, f"chunk{c:05d}.array_record"))
        for idx, tokens, labels in good:
            w.write(tokens, labels, idx)
        w.close()
        records.write_json_atomic(os.path.join(sdir, f"chunk{c:05d}.json"), {
            "ids": [g[0] for g in good], "lengths": [int(g[1].size) for g in good],
            "bad": [{"id": i, "item_id": _item_key(items[i]), "kind": k, "reason": d} for i, k, d in bad]})
        if COMMIT_DELAY_ENV in os.environ:  # test hook: widen the window between writing and committing a chunk
            time.sleep(float(os.environ[COMMIT_DELAY_ENV]))
        records.write_json_atomic(progress_path, {"next_chunk": c + 1, "num_chunks": num_chunks})
        bar.update(hi - lo)
    bar.close()
    progress = {"next_chunk": num_chunks, "num_chunks": num_chunks, "finished": True}
    records.write_json_atomic(progress_path, progress)
    return progress


def _item_key(item):
    return item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), (str, int)) else None


def finalize(out: str, num_shards: int, num_items: int) -> dict | None:
    """If every shard is finished, assemble the tfds dataset and the report (idempotent); else return None."""
    with _file_lock(os.path.join(out, WORK, "finalize.lock")):
        report_path = os.path.join(out, REPORT)
        if os.path.exists(report_path) and os.path.exists(os.path.join(out, "dataset_info.json")):
            return records.read_json(report_path)
        chunks = []
        for s in range(num_shards):
            sdir = _shard_dir(out, s, num_shards)
            p = os.path.join(sdir, "progress.json")
            if not (os.path.exists(p) and records.read_json(p).get("finished")):
                return None
            n = records.read_json(p)["num_chunks"]
            chunks += [os.path.join(sdir, f"chunk{c:05d}") for c in range(n)]
        metas = [records.read_json(c + ".json") for c in chunks]
        nonempty = [(c, m) for c, m in zip(chunks, metas) if m["ids"]]
        total = len(nonempty)
        for j, (c, _) in enumerate(nonempty):  # safe to repeat: a done rename leaves only the destination
            src, dst = c + ".array_record", os.path.join(out, records.shard_filename(j, total))
            if os.path.exists(src):
                os.replace(src, dst)
            elif not os.path.exists(dst):
                raise FileNotFoundError(f"{src}: chunk file vanished before it was moved to {dst}")
        ids = np.array([i for _, m in nonempty for i in m["ids"]], np.int64)
        lengths = np.array([n for _, m in nonempty for n in m["lengths"]], np.int64)
        if total:
            records.write_metadata(out, [len(m["ids"]) for _, m in nonempty], ids, lengths)
        bad = [b for m in metas for b in m["bad"]]
        kinds: dict[str, int] = {}
        for b in bad:
            kinds[b["kind"]] = kinds.get(b["kind"], 0) + 1
        report = {"num_items": num_items, "num_written": int(ids.size), "num_bad": len(bad), "bad_by_kind": kinds,
                  "num_tokens": int(lengths.sum()), "bad": bad}
        records.write_json_atomic(report_path, report)
        return report


def summary_line(report: dict, out: str) -> str:
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(report["bad_by_kind"].items()))
    return (f"pretokenized {report['num_items']} items: {report['num_written']} written "
            f"({report['num_tokens']} tokens), {report['num_bad']} bad" + (f" ({kinds})" if kinds else "")
            + f"; dataset {out}; report {os.path.join(out, REPORT)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lumina_jax.data.pretokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="input JSON list of items (the reference's format)")
    p.add_argument("--out", required=True,
                   help="output dataset directory (created; reused to resume; must not be a file or a non-empty "
                        "directory this command did not start)")
    p.add_argument("--target-size", type=target_size_flag, required=True,
                   help="resolution whose crop-size list is used (512, 768, 1024: a multiple of 32)")
    p.add_argument("--tokenizer", required=True,
                   help="text tokenizer: text_tokenizer.json, a Hugging Face tokenizer directory or a SentencePiece .model")
    p.add_argument("--vqgan", default=None, help="VQGAN checkpoint directory (needed when items have images)")
    p.add_argument("--shard", type=int_flag(0), default=0, help="index of this shard, 0..num-shards-1")
    p.add_argument("--num-shards", type=int_flag(1), default=1, help="number of shards the items are split into")
    p.add_argument("--chunk-size", type=int_flag(1), default=256,
                   help="items per committed chunk (the unit of resumption; >= 1)")
    p.add_argument("--batch-size", type=int_flag(1), default=16,
                   help="images per VQGAN encoder call (same-size images batched; >= 1)")
    p.add_argument("--num-workers", type=int_flag(1, 256), default=4, help="threads that read and crop images (1..256)")
    p.add_argument("--max-length", type=int_flag(0), default=0,
                   help="items with more tokens are reported as bad (0 = no limit)")
    p.add_argument("--image-root", default=None,
                   help="directory relative image paths start from (default: the input JSON's directory)")
    p.add_argument("--random-crop", action="store_true",
                   help="random crop offsets (seeded per item by --seed and the item index) instead of centred crops")
    p.add_argument("--seed", type=int_flag(0, SEED_MAX), default=0, help=f"seed of --random-crop (0..{SEED_MAX})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class PretokenizeError(Exception):
    """A problem with the arguments or the input files; printed as one line, exit status 1."""


# What a resumed run must share with the first one, and how a difference is named. --batch-size,
# --num-workers, --shard and --quiet do not change the records.
RESUME_KEYS = {
    "input_sha256": "--input content", "num_items": "--input item count", "tokenizer_sha256": "--tokenizer content",
    "vqgan_sha256": "--vqgan weights", "target_size": "--target-size", "num_shards": "--num-shards",
    "chunk_size": "--chunk-size", "max_length": "--max-length", "image_root": "--image-root",
    "random_crop": "--random-crop", "seed": "--seed", "format": "run-config format",
}
RUN_CONFIG_FORMAT = 2


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(path: str) -> str:
    """Content hash of the file `TextTokenizer.load(path)` reads (a directory's tokenizer.json or .model)."""
    if os.path.isdir(path):
        json_path = os.path.join(path, "tokenizer.json")
        path = json_path if os.path.exists(json_path) else os.path.join(path, "tokenizer.model")
    return file_sha256(path)


def image_tokenizer_sha256(tok) -> str:
    """Content hash of a VQGAN: its config and every parameter's path, dtype, shape and bytes.

    An image tokenizer passed to `main` without `config` and `params` (a stand-in) is known by its class.
    """

    if not (hasattr(tok, "config") and hasattr(tok, "params")):
        return hashlib.sha256(f"{type(tok).__module__}.{type(tok).__qualname__}".encode()).hexdigest()
    h = hashlib.sha256(json.dumps(tok.config.to_dict(), sort_keys=True).encode())
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tok.params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(kp)} {a.dtype} {a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_items(path: str) -> tuple[list, str]:
    """The input's items and its content hash; one PretokenizeError line for any problem."""
    if not os.path.isfile(path):
        raise PretokenizeError(f"--input {path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        items = parse_json(raw, f"--input {path}")
    except ValueError as e:
        raise PretokenizeError(str(e)) from None
    if not isinstance(items, list):
        raise PretokenizeError(f"--input {path}: top level must be a list of items, got {type(items).__name__}")
    if not items:
        raise PretokenizeError(f"--input {path}: holds no items (an empty list)")
    return items, hashlib.sha256(raw).hexdigest()


def _check_out(out: str) -> None:
    """OUT must be absent, empty, or a directory this command started (it holds _work/run_config.json)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise PretokenizeError(f"--out {out}: exists and is not a directory")
    if (os.path.isdir(out) and set(os.listdir(out)) - {WORK}
            and not os.path.isfile(os.path.join(out, WORK, "run_config.json"))):
        raise PretokenizeError(f"--out {out}: a non-empty directory that this command did not start; "
                               "choose a new or empty directory")


def _load_models(args, items: list, image_tokenizer) -> tuple["Pretokenizer", dict]:
    """The VQGAN and the tokenizer, loaded (and hashed) before anything is written."""
    if image_tokenizer is None and args.vqgan:
        try:
            image_tokenizer = ImageTokenizer.from_checkpoint(args.vqgan)
        except (CheckpointError, OSError, ValueError) as e:
            raise PretokenizeError(f"--vqgan {args.vqgan}: {e}") from None
    if image_tokenizer is None:
        lo, hi = shard_range(len(items), args.shard, args.num_shards)
        with_images = next((i for i in range(lo, hi) if isinstance(items[i], dict)
                            and (items[i].get("image") or items[i].get("<|image|>"))), None)
        if with_images is not None:
            raise PretokenizeError(f"--input {args.input}: item {with_images} has images but no --vqgan checkpoint "
                                   "directory was given")
    try:
        pretok = Pretokenizer(args.tokenizer, args.vqgan, args.target_size, args.max_length, args.batch_size,
                              args.random_crop, args.seed, args.image_root, image_tokenizer, args.num_workers)
    except (OSError, ValueError) as e:
        raise PretokenizeError(f"--tokenizer: {e}") from None
    return pretok, {"tokenizer_sha256": tokenizer_sha256(args.tokenizer),
                    "vqgan_sha256": None if image_tokenizer is None else image_tokenizer_sha256(image_tokenizer)}


def _others_running(out: str) -> bool:
    """Whether any run holds a shard lock of `out` (tested without waiting)."""
    work = os.path.join(out, WORK)
    for name in os.listdir(work):
        if not (name.startswith("shard") and name.endswith(".lock")):
            continue
        with open(os.path.join(work, name), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _anything_committed(out: str) -> bool:
    work = os.path.join(out, WORK)
    return os.path.exists(os.path.join(out, "dataset_info.json")) or any(
        os.path.exists(os.path.join(work, d, "progress.json")) for d in os.listdir(work))


def _short(value) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)


@contextlib.contextmanager
def _claim_shard(args, cfg: dict):
    """Checks the run config, then holds this shard's lock for the whole run.

    A resumed run must match the first one in everything that shapes the records (RESUME_KEYS): the first
    run records `cfg`; a later run with any difference is refused with one line naming each difference,
    unless nothing has been committed yet and no run is working (then the earlier, failed start is simply
    replaced). The shard lock (`_work/shardI-of-N.lock`, taken only once the config matched, so a refused
    run creates nothing) makes a second run of the same shard refuse instead of interleaving its writes.
    """
    path = os.path.join(args.out, WORK, "run_config.json")
    lock_path = _shard_dir(args.out, args.shard, args.num_shards) + ".lock"
    with _file_lock(os.path.join(args.out, WORK, "config.lock")):
        if os.path.exists(path):
            try:
                old = records.read_json(path)
            except (OSError, ValueError) as e:
                raise PretokenizeError(f"{path}: unreadable ({e}); start a new --out") from None
            diff = [k for k in RESUME_KEYS if old.get(k) != cfg.get(k)]
            if diff and (_anything_committed(args.out) or _others_running(args.out)):
                raise PretokenizeError(
                    f"--out {args.out} was started with different inputs or settings: "
                    + "; ".join(f"{RESUME_KEYS[k]} ({_short(old.get(k))} then, {_short(cfg.get(k))} now)" for k in diff)
                    + ". Resume with the original ones, or choose a new --out")
            if diff:
                records.write_json_atomic(path, cfg)
        else:
            records.write_json_atomic(path, cfg)
        lock = open(lock_path, "a+")  # taken under the config lock: no config change can slip in between
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise PretokenizeError(f"--out {args.out}: shard {args.shard}/{args.num_shards} is being written by "
                                   f"another run (it holds {lock_path}); wait for it to finish") from None
    try:
        yield
    finally:
        lock.close()  # releases the shard lock


def main(argv=None, image_tokenizer=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard >= args.num_shards:
        parser.error(f"--shard {args.shard} is not in 0..{args.num_shards - 1}")
    try:
        return _main(args, image_tokenizer)
    except PretokenizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main(args, image_tokenizer) -> int:
    t0 = time.time()
    items, input_sha256 = _read_items(args.input)
    args.image_root = os.path.abspath(args.image_root or os.path.dirname(os.path.abspath(args.input)))
    if not os.path.isdir(args.image_root):
        raise PretokenizeError(f"--image-root {args.image_root}: not a directory")
    _check_out(args.out)
    pretok, hashes = _load_models(args, items, image_tokenizer)
    cfg = {"format": RUN_CONFIG_FORMAT, "input_sha256": input_sha256, "num_items": len(items), **hashes,
           **{k: getattr(args, k) for k in ("target_size", "num_shards", "chunk_size", "max_length", "image_root",
                                             "random_crop", "seed")},
           "input": os.path.abspath(args.input), "tokenizer": os.path.abspath(args.tokenizer),
           "vqgan": args.vqgan and os.path.abspath(args.vqgan)}  # the paths are for reading, not compared
    try:
        os.makedirs(os.path.join(args.out, WORK), exist_ok=True)
    except OSError as e:
        raise PretokenizeError(f"--out {args.out}: cannot create it ({e.strerror})") from None
    with _claim_shard(args, cfg):
        run_shard(args, items, pretok)
        report = finalize(args.out, args.num_shards, len(items))
    if report is None:
        sdir = _shard_dir(args.out, args.shard, args.num_shards)
        metas = [records.read_json(os.path.join(sdir, f"chunk{c:05d}.json"))
                 for c in range(records.read_json(os.path.join(sdir, "progress.json"))["num_chunks"])]
        print(f"shard {args.shard}/{args.num_shards} finished in {time.time() - t0:.1f}s: "
              f"{sum(len(m['ids']) for m in metas)} written, {sum(len(m['bad']) for m in metas)} bad "
              f"(listed in {sdir}/chunk*.json); the dataset is assembled when every shard has finished")
    else:
        print(summary_line(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
