"""What the page and the API share: the loaded model, the batcher in front of it, and the form defaults."""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Optional

from lumina_jax.inference import Lumina, Result
from lumina_jax.serve.batching import Batcher, Job
from lumina_jax.serve.forms import Defaults

POLL_SECONDS = 0.25  # how often a waiting request reads its batch's progress


@dataclasses.dataclass
class Service:
    lm: Lumina
    batcher: Batcher
    defaults: Defaults
    checkpoint: str  # shown in the page and /api/info

    def run(self, job: Job, on_progress: Optional[Callable[[int, int], None]] = None) -> list[Result]:
        """Queues the job and waits for its results, passing (tokens done, tokens needed) to `on_progress`
        while its batch decodes; raises the job's `InferenceError`."""
        future = self.batcher.submit(job)
        while True:
            try:
                return future.result(timeout=POLL_SECONDS if on_progress else None)
            except concurrent.futures.TimeoutError:
                on_progress(*job.progress)
