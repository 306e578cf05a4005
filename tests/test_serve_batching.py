"""The batcher's grouping rules with a stand-in for `generate` (no model): which jobs share a call, in what
order, how many rows, and that one bad request never fails the others. Plus the server command's flags."""
import threading

import pytest

from lumina_jax.inference import InferenceError
from lumina_jax.serve import __main__ as serve_cli
from lumina_jax.serve.batching import Batcher, Job, Settings

WAIT_FOREVER_MS = 3_600_000  # batches then start only when full (or when the worker frees up with jobs waiting)


def settings(**kw):
    base = dict(task="t2i", size=(128, 128), guidance=3.0, guidance_floor=0.05, image_top_k=16, text_top_k=10,
                temperature=1.0, top_p=1.0, max_new_tokens=74, prompt_width=64)
    return Settings(**{**base, **kw})


class FakeGenerate:
    """Records each call's jobs; answers job k with [(prompt, seed + j) for each image j]. `hold` blocks the
    first call until released, so jobs can be queued behind it deterministically."""

    def __init__(self, hold=False, refuse=()):
        self.calls, self.rows = [], []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()
        self.refuse = set(refuse)

    def __call__(self, lm, jobs, progress, rows):
        self.calls.append([j.prompt for j in jobs])
        self.rows.append(rows)
        self.entered.set()
        self.release.wait()
        bad = [j.prompt for j in jobs if j.prompt in self.refuse]
        if bad:
            raise InferenceError(f"refused {bad[0]}")
        progress(3, 4)
        return [[(j.prompt, j.seed + i) for i in range(j.num_images)] for j in jobs]


def job(prompt, seed=0, n=1, **kw):
    return Job(prompt=prompt, images=[], seed=seed, num_images=n, settings=settings(**kw))


def queue_behind_a_running_call(fake, batcher, jobs):
    """Starts one blocking call, queues `jobs` behind it, then lets everything run; returns the futures."""
    first = batcher.submit(job("first"))
    assert fake.entered.wait(60)
    futures = [batcher.submit(j) for j in jobs]
    fake.release.set()
    first.result(60)
    return futures


def test_compatible_waiting_jobs_share_one_call_each_with_its_own_seeds():
    fake = FakeGenerate(hold=True)
    b = Batcher(None, max_batch=8, max_wait_ms=0, run=fake)
    futures = queue_behind_a_running_call(fake, b, [job("a", 5, 2), job("b", 9), job("c", 0, 3)])
    assert [f.result(60) for f in futures] == [[("a", 5), ("a", 6)], [("b", 9)], [("c", 0), ("c", 1), ("c", 2)]]
    assert fake.calls == [["first"], ["a", "b", "c"]]
    assert fake.rows == [8, 8]  # every call asks for the same fixed row count
    assert (b.calls, b.jobs, b.batch_rows) == (2, 4, [1, 6])
    b.close()


def test_jobs_with_different_settings_are_never_mixed_and_the_oldest_goes_first():
    fake = FakeGenerate(hold=True)
    b = Batcher(None, max_batch=8, max_wait_ms=0, run=fake)
    jobs = [job("small", size=(64, 256)), job("square"), job("small2", size=(64, 256)), job("hot", guidance=5.0),
            job("square2")]
    futures = queue_behind_a_running_call(fake, b, jobs)
    for f in futures:
        f.result(60)
    assert fake.calls == [["first"], ["small", "small2"], ["square", "square2"], ["hot"]]
    b.close()


def test_a_batch_holds_at_most_max_batch_rows_and_a_larger_job_runs_alone():
    fake = FakeGenerate(hold=True)
    b = Batcher(None, max_batch=4, max_wait_ms=0, run=fake)
    futures = queue_behind_a_running_call(fake, b, [job("a", n=3), job("b", n=2), job("c", n=1), job("big", n=6)])
    assert [len(f.result(60)) for f in futures] == [3, 2, 1, 6]
    assert fake.calls == [["first"], ["a"], ["b", "c"], ["big"]]
    b.close()


def test_a_full_batch_starts_without_waiting_out_max_wait():
    fake = FakeGenerate()
    b = Batcher(None, max_batch=2, max_wait_ms=WAIT_FOREVER_MS, run=fake)
    f1 = b.submit(job("a"))
    f2 = b.submit(job("b"))
    assert f1.result(60) == [("a", 0)] and f2.result(60) == [("b", 0)]
    assert fake.calls == [["a", "b"]]
    b.close()


def test_a_lone_job_waits_for_company_until_closed():
    fake = FakeGenerate()
    b = Batcher(None, max_batch=2, max_wait_ms=WAIT_FOREVER_MS, run=fake)
    f = b.submit(job("a"))
    b.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        f.result(60)
    assert fake.calls == []


def test_a_refused_job_fails_alone_and_the_others_are_served():
    fake = FakeGenerate(hold=True, refuse={"bad"})
    b = Batcher(None, max_batch=8, max_wait_ms=0, run=fake)
    good1, bad, good2 = queue_behind_a_running_call(fake, b, [job("a"), job("bad"), job("b")])
    assert good1.result(60) == [("a", 0)] and good2.result(60) == [("b", 0)]
    with pytest.raises(InferenceError, match="refused bad"):
        bad.result(60)
    assert fake.calls[1] == ["a", "bad", "b"] and sorted(map(tuple, fake.calls[2:])) == [("a",), ("b",), ("bad",)]
    b.close()


def test_progress_reaches_every_job_of_the_batch():
    fake = FakeGenerate(hold=True)
    b = Batcher(None, max_batch=8, max_wait_ms=0, run=fake)
    jobs = [job("a"), job("b")]
    for f in queue_behind_a_running_call(fake, b, jobs):
        f.result(60)
    assert [j.progress for j in jobs] == [(3, 4), (3, 4)]
    b.close()


@pytest.mark.parametrize("kw", [dict(max_batch=0), dict(max_wait_ms=float("nan")), dict(max_wait_ms=-1)])
def test_batcher_refuses_bad_limits(kw):
    with pytest.raises(ValueError):
        Batcher(None, run=FakeGenerate(), **kw)


# ---- the command -------------------------------------------------------------------------------------------
def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        serve_cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--mesh", "--rules", "--dtype", "--host", "--port", "--max-batch", "--max-wait-ms",
                 "--warm-up", "--log-level"):
        assert flag in text
    assert "default 127.0.0.1" in text


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--max-wait-ms", "nan"], "--max-wait-ms must be a finite number >= 0, got nan"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--checkpoint", "/nonexistent/model"], "checkpoint directory does not exist"),
])
def test_bad_flags_exit_with_one_line_before_serving(argv, message, capsys):
    assert serve_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
