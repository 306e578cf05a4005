"""Concurrent requests grouped into one `Lumina.generate` call: jobs, their grouping key, and the batcher.

    batcher = Batcher(lm, max_batch=8, max_wait_ms=50)
    results = batcher.submit(job).result()      # from any thread; one worker thread calls generate

A job asks for `num_images` answers from one prompt with one seed. Jobs whose `Settings` are equal (task,
size, every sampling setting and the padded prompt length: what makes one compiled decode program) are
stacked into one call, one row per image, each row with its own seed. Every call runs on `max_batch` rows
(padded), so a row meets the same compiled program whether it is served alone or with others: with a row's
randomness drawn from its own seed, a job gets bit for bit what it would get alone.

The oldest waiting job decides the group served next; the batch starts when its group fills `max_batch` rows
or when that job has waited `max_wait_ms`, whichever comes first. A job larger than `max_batch` runs alone.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

from lumina_jax.inference import InferenceError, Lumina, Result

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything of a request that is shared by the rows of one `generate` call (hashable: the group key)."""

    task: str
    size: Optional[tuple[int, int]]  # (W, H) forced, or None (sampled from the crop list)
    guidance: Optional[float]  # None = the task's default
    guidance_floor: float
    image_top_k: Optional[int]
    text_top_k: Optional[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    prompt_width: int  # prompt length padded to the sampler's bucket: part of the compiled program's shape


@dataclasses.dataclass(eq=False)
class Job:
    """One request: `num_images` answers to `prompt` (and its input `images`), answer j with seed `seed + j`."""

    prompt: Any  # a string, or multi-turn [(question, answer or None), ...]
    images: list  # PIL input images, in placeholder order
    seed: int
    num_images: int
    settings: Settings
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    progress: tuple[int, int] = (0, 0)  # (tokens done, tokens needed) of the batch serving it, set by the worker
    submitted: float = dataclasses.field(default_factory=time.monotonic)


def generate_jobs(lm: Lumina, jobs: Sequence[Job], progress: Callable[[int, int], None] | None = None,
                  rows: int | None = None) -> list[list[Result]]:
    """One `Lumina.generate` call for jobs sharing `Settings`: one row per image, each with its own seed, the
    batch padded to a multiple of `rows`. The only place the server names `generate`'s keyword arguments.
    """
    s = jobs[0].settings
    prompts, images, seeds, owner = [], [], [], []
    for k, job in enumerate(jobs):
        for j in range(job.num_images):
            prompts.append(job.prompt)
            images.append(job.images)
            seeds.append(job.seed + j)
            owner.append(k)
    results = lm.generate(prompts, task=s.task, images=images, size=s.size, guidance=s.guidance,
                          cfg_min_p=s.guidance_floor, image_top_k=s.image_top_k, text_top_k=s.text_top_k,
                          temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                          seeds=seeds, num_images=1, progress=progress if progress is not None else False,
                          pad_rows_to=rows)
    out: list[list[Result]] = [[] for _ in jobs]
    for k, r in zip(owner, results):
        out[k].append(r)
    return out


class Batcher:
    """A queue in front of `generate`: a worker thread serves compatible waiting jobs together.

    `calls` counts `generate` calls, `jobs` the jobs they served, and `batch_rows` lists the rows asked for in
    each call (for tests, the load run and /api/info). `run(lm, jobs, progress, rows)` defaults to `generate_jobs`.
    """

    def __init__(self, lm: Lumina, max_batch: int = 8, max_wait_ms: float = 50.0,
                 run: Callable[..., list[list[Result]]] = generate_jobs):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 <= max_wait_ms < float("inf"):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms}")
        self.lm, self.max_batch, self.max_wait = lm, max_batch, max_wait_ms / 1000.0
        self.run = run
        self.calls = self.jobs = 0
        self.batch_rows: list[int] = []
        self._pending: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="lumina-batcher", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queues a job; its future resolves to the job's `Result`s (or its `InferenceError`)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            job.submitted = time.monotonic()
            self._pending.append(job)
            self._cv.notify()
        return job.future

    def close(self) -> None:
        """Stops the worker after the current batch; waiting jobs fail with a RuntimeError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._worker.join()
        for job in self._pending:
            job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()

    # ---- worker ------------------------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        """Waits for the next batch (the oldest job's group) and removes it from the queue; None when closed."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                if not self._pending:
                    self._cv.wait()
                    continue
                first = self._pending[0]
                group = [j for j in self._pending if j.settings == first.settings]
                rows = sum(j.num_images for j in group)
                left = first.submitted + self.max_wait - time.monotonic()
                if rows >= self.max_batch or left <= 0:
                    break
                self._cv.wait(timeout=left)
            batch, rows = [], 0
            for job in group:
                if batch and rows + job.num_images > self.max_batch:
                    break
                batch.append(job)
                rows += job.num_images
            self._pending = [j for j in self._pending if j not in batch]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if batch:
                self._serve(batch)

    def _serve(self, batch: list[Job]) -> None:
        """One `generate` call for the batch; resolves every job's future, whatever happens."""
        def report(done, total):
            for job in batch:
                job.progress = (done, total)

        self.calls += 1
        self.batch_rows.append(sum(j.num_images for j in batch))
        try:
            results = self.run(self.lm, batch, report, self.max_batch)
        except Exception as e:  # noqa: BLE001 - failures go to the waiting requests; the worker lives on
            if len(batch) > 1 and isinstance(e, InferenceError):
                for job in batch:  # one bad request must not fail the others: serve each alone
                    self._serve([job])
                return
            if not isinstance(e, InferenceError):
                log.exception("generate failed for %d request(s)", len(batch))
            for job in batch:
                job.future.set_exception(e)
            return
        self.jobs += len(batch)
        for job, res in zip(batch, results):
            job.future.set_result(res)
