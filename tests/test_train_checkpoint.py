"""Training checkpoints: SIGKILL + restart continues with exactly the same losses, SIGTERM saves before exit,
a checkpoint written on fsdp=8 restores on data=2,tensor=4."""
import shutil
import signal

import numpy as np
import pytest

from lumina_jax.training import config as config_lib
from lumina_jax.training import trainer
from test_train_helpers import (TEST_OVERRIDES, TINY, checkpoint_steps, popen_train, read_losses, run_train,
                                wait_for_step)

# A long schedule so the run is still going when it is killed; each invocation stops via --max_steps.
LONG = ["total_steps=100000", "optimizer.warmup_steps=2", "checkpoint.save_interval_steps=3", *TEST_OVERRIDES]


def _cfg(out, *extra):
    return config_lib.load_config(TINY, [f"output_dir={out}", *LONG, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 11 steps on fsdp=8 (checkpoints kept: 10 and 11). A subprocess, so the
    later train.py runs of the same program read its compilation from the shared cache."""
    out = tmp_path_factory.mktemp("ref")
    rc = run_train(["--config", TINY, f"output_dir={out}", *LONG, "checkpoint.save_interval_steps=5",
                    "--max_steps", "11"], log_path=out.parent / "ref.log")
    assert rc == 0, (out.parent / "ref.log").read_text()[-3000:]
    assert checkpoint_steps(out) == [10, 11]
    return {"dir": out, "losses": read_losses(out)}


@pytest.mark.slow
def test_sigkill_restart_continues_with_the_same_losses(tmp_path, reference):
    out = tmp_path / "run"
    args = ["--config", TINY, f"output_dir={out}", *LONG]
    proc = popen_train(args, log_path=tmp_path / "first.log")
    try:
        wait_for_step(out, 7, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = checkpoint_steps(out)
    assert saved and max(saved) >= 3, saved  # a save still in flight at the kill is not a checkpoint
    resume_from = max(saved)
    rc = run_train(args + ["--max_steps", str(10 - resume_from)], log_path=tmp_path / "second.log")
    assert rc == 0, (tmp_path / "second.log").read_text()[-3000:]
    losses = read_losses(out)
    want = reference["losses"]
    assert sorted(losses) == list(range(1, 11))
    # bit-identical continuation (same program, same devices, state + data position + rng restored)
    assert [losses[s] for s in range(1, 11)] == [want[s] for s in range(1, 11)]
    assert losses[10] < losses[1]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_before_exit(tmp_path):
    out = tmp_path / "run"
    args = ["--config", TINY, f"output_dir={out}", *LONG, "checkpoint.save_interval_steps=1000"]
    proc = popen_train(args, log_path=tmp_path / "log")
    try:
        wait_for_step(out, 3, proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "log").read_text()
    assert rc == 0, log[-3000:]
    assert "stopped by signal" in log
    last = max(read_losses(out))
    assert checkpoint_steps(out) == [last]


def test_checkpoint_from_fsdp8_restores_on_data2_tensor4(tmp_path, reference):
    copy = tmp_path / "copy"
    shutil.copytree(reference["dir"], copy)
    shutil.rmtree(copy / "checkpoints" / "11")  # resume from step 10
    result = trainer.train(_cfg(copy, "parallel.mesh=data=2,tensor=4"), max_steps=1)
    run = result.run
    assert run.start_step == 10 and dict(run.ctx.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    kernel = result.params["lm_head"]["kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor") and len(kernel.sharding.device_set) == 8
    assert run.data.get_state() == {"next_batch": 11}
    # step 11 on the new mesh has the loss step 11 had on the old one
    (rec,) = result.history
    assert rec["step"] == 11
    np.testing.assert_allclose(rec["loss"], reference["losses"][11], rtol=1e-5)
