"""arq worker settings and job functions (thin adapters over JobRunner)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from arq import Worker, func
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError as RedisWatchError

from shared import rcmd, scratch
from shared.config import Settings
from shared.keys import Keys
from shared.outage import RedisUnavailable
from shared.queue import FUNCTIONS, function_timeouts, redis_settings
from shared.reaper import Reaper
from worker.pitr import PitrService
from worker.runner import JobRunner, ensure_engines
from worker.scheduler import Scheduler

log = logging.getLogger("safehold.worker")
WORKER_BEAT = 10.0  # seconds between worker-liveness beats and reaper sweeps


async def run_job(ctx: dict[str, Any], job_id: str) -> dict[str, Any]:
    """Every job kind: the job record says what to do (one arq function name per kind, so
    each gets its own timeout)."""
    runner: JobRunner = ctx["runner"]
    return await runner.run(job_id)


async def _housekeeping(runner: JobRunner) -> None:
    """Announce this worker as live and reap orphaned jobs of dead workers."""
    keys, w = runner.keys, runner.settings.worker
    reaper = Reaper(runner.reaper_outcomes, runner.catalog, w)
    while True:
        try:
            await runner.redis.zadd(keys.workers, {runner.worker_id: time.time()})
            await rcmd.hset(runner.redis, keys.worker_keys,
                                    runner.worker_id, runner.transport_recipient)
            await reaper.sweep()
            await asyncio.to_thread(scratch.sweep)  # what killed processes left on this host
        except (RedisError, OSError, RedisUnavailable) as exc:  # an outage: the poll loop
            log.debug("housekeeping: Redis unreachable (%s)", type(exc).__name__)  # says it
        except Exception:  # keep beating through anything else, loudly
            log.exception("housekeeping failed")
        await asyncio.sleep(reaper.next_pass_in(min(WORKER_BEAT, w.orphan_after / 2)))


SCHEDULER_TICK = 15.0  # seconds; a slot starts within this (plus its jitter) of its time


async def _schedule_forever(scheduler: Scheduler) -> None:
    """Every worker ticks; deterministic job ids make the extra ticks no-ops."""
    while True:
        try:
            await scheduler.tick()
        except (RedisError, OSError) as exc:  # Redis down: the next tick catches up
            log.debug("scheduler tick: Redis unreachable (%s)", type(exc).__name__)
        except Exception:
            log.exception("scheduler tick failed")
        await asyncio.sleep(SCHEDULER_TICK)


async def _sweep_temps(runner: JobRunner) -> None:
    """Remove what crashed jobs left (temp files, unfinished multipart uploads), keeping
    those of jobs still running."""
    try:
        keep: set[str] = set()
        for job_id in await runner.store.running_ids():
            keep.add(job_id)
            job = await runner.store.find(job_id)
            keep.update((job.temp_handles or "").split() if job else ())
        removed = await runner.catalog.sweep_temps(keep)
    except Exception:
        log.exception("sweeping temp files failed")
        return
    if removed:
        log.warning("swept %d stale temp file(s) or upload(s): %s", len(removed),
                    ", ".join(removed))


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
    runner = JobRunner(settings, ctx["redis"], worker_id)
    ctx["runner"] = runner
    ctx["sweep"] = asyncio.create_task(_sweep_temps(runner))  # a slow bucket: not a wait
    scheduler = Scheduler(settings, ctx["redis"], runner.store, runner.notifier, runner.audit)
    runner.after_backup = scheduler.after_backup
    ctx["scheduler"] = asyncio.create_task(_schedule_forever(scheduler))
    ctx["housekeeping"] = asyncio.create_task(_housekeeping(runner))
    ctx["pitr"] = asyncio.create_task(PitrService(
        settings, ctx["redis"], runner.catalog, runner.notifier, worker_id).run())
    log.info("worker %s ready (targets: %s)", worker_id, ", ".join(settings.targets))


async def on_shutdown(ctx: dict[str, Any]) -> None:
    for name in ("pitr", "housekeeping", "sweep", "scheduler"):
        if task := ctx.get(name):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    runner: JobRunner | None = ctx.get("runner")
    if runner:
        await runner.redis.zrem(runner.keys.workers, runner.worker_id)
        await rcmd.hdel(runner.redis, runner.keys.worker_keys, runner.worker_id)
        await runner.close()
        await runner.catalog.close()


class ResilientWorker(Worker):
    """arq's Worker, riding out Redis outages: a poll that cannot reach Redis is logged
    (once per outage) and retried with backoff instead of ending the process; jobs already
    running carry on (their own Redis writes retry), and polling resumes when Redis is
    back."""

    _outage_since: float | None = None
    stop_reason = "stop requested"  # what serve_worker was told (SIGTERM…), for the log

    def handle_sig(self, signum: int) -> None:
        """arq's close() calls this with SIGUSR1 when it does not handle signals itself
        (and logs `shutdown on SIGUSR1`): say the real reason instead."""
        log.info("worker stopping (%s): %d job(s) complete, %d failed, %d to cancel",
                 self.stop_reason, self.jobs_complete, self.jobs_failed,
                 sum(not t.done() for t in self.tasks.values()))
        for task in self.tasks.values():
            if not task.done():
                task.cancel()
        if self.main_task:
            self.main_task.cancel()
        if self.on_stop:
            self.on_stop(signal.Signals(signum))
    doorbell: str = ""  # Keys.doorbell: waited on between polls (arq's own sleep is 0)
    idle_s: float = 0.2  # the longest wait between two polls
    _doorbell_off_until: float = 0.0  # after Redis refused BLPOP: poll until then

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            await self._wait_for_work()
        except (RedisConnectionError, RedisTimeoutError, RedisWatchError, OSError) as exc:
            # (redis-py raises WatchError for a connection lost while arq's job pick holds
            # a WATCH: an outage too — it once ended the poll loop, and the worker with it)
            now = time.monotonic()
            if self._outage_since is None:
                self._outage_since = now
                log.warning("Redis is unreachable (%s: %s); running jobs go on, polling "
                            "again with backoff", type(exc).__name__, exc)
            await asyncio.sleep(min(5.0, 0.5 + (now - self._outage_since) / 4))
            return
        if self._outage_since is not None:
            log.warning("Redis is reachable again after %.0fs; picking jobs",
                        time.monotonic() - self._outage_since)
            self._outage_since = None

    async def _wait_for_work(self) -> None:
        """Until a job is queued (the doorbell) or `idle_s` passes; a worker that cannot
        take a job now just waits. When Redis refuses BLPOP (an ACL, the key taken by
        something else, LOADING…) the worker polls for a minute, then tries again."""
        can_take = self.allow_pick_jobs and self.job_counter < self.max_jobs
        if can_take and self.doorbell and time.monotonic() >= self._doorbell_off_until:
            try:
                # bounded client-side too: a half-open connection never answers (an
                # OSError then, handled as an outage; the connection is dropped).
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the
                # cancellation that stops the worker when BLPOP answers at that moment
                async with asyncio.timeout(self.idle_s + 5):
                    await self.pool.execute_command("BLPOP", self.doorbell,
                                                    max(0.01, self.idle_s))
                return
            except RedisResponseError as exc:
                if not self._doorbell_off_until:  # said once, not every minute
                    log.warning("waiting on the doorbell %s failed (%s); polling every "
                                "%.2fs instead, trying again each minute", self.doorbell,
                                exc, self.idle_s)
                self._doorbell_off_until = time.monotonic() + 60
        await asyncio.sleep(self.idle_s)


def build_worker(settings: Settings, *, redis_pool: ArqRedis | None = None,
                 burst: bool = False, poll_delay: float | None = None) -> Worker:
    """An arq Worker for these settings; signals are handled by `serve_worker`/the CLI."""
    ensure_engines(settings)
    w = settings.worker
    keys = Keys(settings.redis.prefix)
    worker = ResilientWorker(
        functions=[
            # backups publish nothing until complete, restores must never re-run: one try each;
            # an interrupted job is failed `interrupted` and can be resubmitted.
            func(run_job, name=FUNCTIONS[kind], timeout=timeout, max_tries=1)
            for kind, timeout in function_timeouts(w).items()
        ],
        queue_name=keys.queue,
        redis_settings=redis_settings(settings.redis.url),
        redis_pool=redis_pool,
        ctx={"settings": settings},
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=w.max_jobs,
        keep_result=60,
        health_check_interval=30,
        allow_abort_jobs=True,
        job_completion_wait=int(w.shutdown_grace),
        handle_signals=False,
        burst=burst,
        poll_delay=0,  # ResilientWorker waits on the doorbell between polls instead
    )
    worker.doorbell = keys.doorbell
    worker.idle_s = w.poll_delay if poll_delay is None else poll_delay
    return worker


async def stop_gracefully(worker: Worker, grace: float,
                          main: asyncio.Task[None] | None = None) -> None:
    """Stop picking jobs, let running ones finish for `grace` seconds, stop the poll loop
    (`main`, the task running `worker.main()`), then cancel what is left and close."""
    worker.allow_pick_jobs = False
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_tasks_done(worker), grace)
    if main is not None:  # before close(): a poll must not be mid-read on a closed pool
        while not main.done():  # again if a cancellation was lost (3.11's wait_for can)
            main.cancel()
            await asyncio.wait({main}, timeout=1)
        await asyncio.gather(main, return_exceptions=True)
    for task in worker.tasks.values():
        task.cancel()
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    worker.tasks.clear()  # arq's close() gathers them again and would re-raise cancellations
    await worker.close()


async def _tasks_done(worker: Worker) -> None:
    while any(not t.done() for t in worker.tasks.values()):
        await asyncio.sleep(0.2)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena; the pipeline's threads
    (compression, encryption, file and S3 writes) each keep freed 1 MiB buffers in theirs.
    Two arenas cut the worker's peak RSS by 10-30 MiB per backup (bench/storage.py) at no
    measurable cost. The same as MALLOC_ARENA_MAX=2; a no-op off glibc."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


async def serve_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT (or `stop`), then shut down gracefully."""
    limit_malloc_arenas()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        stop.reason = sig.name  # type: ignore[attr-defined]  # said in the shutdown log
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    worker = build_worker(settings)
    main = asyncio.create_task(worker.main())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if main in done:  # the poll loop ended by itself: say why, then let jobs finish
        stopper.cancel()
        if main.cancelled() or main.exception() is not None:
            log.error("the worker's poll loop stopped unexpectedly; stopping the worker",
                      exc_info=None if main.cancelled() else main.exception())
        if isinstance(worker, ResilientWorker):
            worker.stop_reason = "its poll loop stopped"
        await stop_gracefully(worker, settings.worker.shutdown_grace)
        main.result()
        return
    if isinstance(worker, ResilientWorker):
        worker.stop_reason = getattr(stop, "reason", worker.stop_reason)
    log.info("stopping (%s): waiting up to %.0fs for running jobs",
             getattr(stop, "reason", "stop requested"), settings.worker.shutdown_grace)
    await stop_gracefully(worker, settings.worker.shutdown_grace, main)
