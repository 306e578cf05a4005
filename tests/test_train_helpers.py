"""Shared pieces of the training tests (imported by test_train*.py; holds no tests itself)."""
import jax

from lumina_jax import sharding

RULES = sharding.FSDP_RULES


def make_mesh(spec: str):
    """A mesh over the first devices that the spec needs (no -1 axes)."""
    n = 1
    for part in spec.split(","):
        n *= int(part.split("=")[1])
    return sharding.make_mesh(spec, devices=jax.devices()[:n])

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.py")
# Small and fast: 32-token rows, 8 per step, synthetic data unless overridden.
TEST_OVERRIDES = ["data.seq_len=32", "data.global_batch_size=8", "loss.chunk_size=16", "log.every_steps=1",
                  "log.progress_bar=false", "log.tensorboard=false"]


# One persistent compilation cache for every train.py subprocess of this test session: a restarted or
# resumed run compiles the same programs again, and reads them from here instead.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="lumina_train_jit_cache_")


def train_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def popen_train(args: list[str], devices: int = 8, log_path=None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=str(REPO), env=train_env(devices),
                            stdout=out, stderr=subprocess.STDOUT)


def run_train(args: list[str], devices: int = 8, timeout: float = 240, log_path=None) -> int:
    proc = popen_train(args, devices, log_path)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_losses(output_dir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins: a restart re-runs steps)."""
    out = {}
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        out[rec["step"]] = rec["loss"]
    return out


def wait_for_step(output_dir, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        losses = read_losses(output_dir)
        if losses and max(losses) >= step:
            return max(losses)
        if proc.poll() is not None:
            raise RuntimeError(f"train.py exited with {proc.returncode} before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"train.py did not reach step {step} in {timeout}s")


def checkpoint_steps(output_dir) -> list[int]:
    d = Path(output_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []
