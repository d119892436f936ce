"""WatchTrainingJob without a thread per watcher: one poller per watched job, shared by all of its watchers.

A poller reads its job from the database (in a worker thread) every `interval` seconds and publishes each change;
the watchers of that job wait on the event loop and each gets every change it has not seen yet, then the final
state. However many clients watch a job, the database sees one read per interval. Jobs that are not final are
few (the workers plus the queue), so the pollers are few too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from training_service.jobs import Job

POLL_SECONDS = 0.25


def _change_key(job: Job) -> tuple[object, ...]:
    return job.state, job.stage, round(job.progress, 4), job.error, job.model_id


class _Feed:
    """The latest state of one job, a version that grows with each change, and the poller that updates them."""

    def __init__(self) -> None:
        self.job: Job | None = None
        self.error: BaseException | None = None
        self.version = 0
        self.watchers = 0
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    @property
    def over(self) -> bool:
        return self.error is not None or (self.job is not None and self.job.final)


class JobWatches:
    """Fan-out of job changes to watchers; `read(job_id)` returns the job or raises a domain error (NotFound,
    Unavailable). All methods run on the server's event loop."""

    def __init__(self, read: Callable[[str], Job], interval: float = POLL_SECONDS) -> None:
        self._read = read
        self._interval = interval
        self._feeds: dict[str, _Feed] = {}

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then each time it changes, ending after a final state; an error reading it is raised."""
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = _Feed()
            feed.task = asyncio.create_task(self._poll(job_id, feed), name=f"watch-job-{job_id}")
        feed.watchers += 1
        seen = [0]  # the version this watcher has had

        def news() -> bool:
            return feed.version > seen[0] or feed.over

        try:
            while True:
                async with feed.changed:
                    await feed.changed.wait_for(news)
                    version, job, error = feed.version, feed.job, feed.error
                if version > seen[0] and job is not None:
                    seen[0] = version
                    yield job
                if error is not None:
                    raise error
                if job is not None and job.final:
                    return
        finally:
            feed.watchers -= 1
            if feed.watchers == 0:
                if self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]
                if feed.task is not None:
                    feed.task.cancel()

    async def _poll(self, job_id: str, feed: _Feed) -> None:
        last: tuple[object, ...] | None = None
        while True:
            try:
                job = await asyncio.to_thread(self._read, job_id)
            except Exception as exc:
                async with feed.changed:
                    feed.error = exc
                    feed.changed.notify_all()
                self._forget(job_id, feed)
                return
            key = _change_key(job)
            if key != last:
                last = key
                async with feed.changed:
                    feed.job = job
                    feed.version += 1
                    feed.changed.notify_all()
            if job.final:
                self._forget(job_id, feed)
                return
            await asyncio.sleep(self._interval)

    def _forget(self, job_id: str, feed: _Feed) -> None:
        """A feed that has ended takes no new watchers; they start a fresh one."""
        if self._feeds.get(job_id) is feed:
            del self._feeds[job_id]
