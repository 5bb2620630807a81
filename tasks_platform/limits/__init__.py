"""Per-tenant limits, enforced across every worker, and the fairness they buy.

``TASKS_TENANT_LIMITS`` gives each tenant and job type a rate (``rate`` jobs per ``per``
seconds) and a concurrency (at most ``concurrency`` running at once); ``"*"`` supplies a
default for any tenant or any job type. A limit is always counted per tenant *and* job type:
``{"*": {"*": {"rate": 5}}}`` lets every tenant start five jobs of each type a second. Jobs of
a tenant (or job type) no entry matches are not limited, and cost no Redis call at all.

Three places enforce them, all sharing one Redis (:mod:`.store`):

* **intake** (:mod:`.pacing`, called by ``apply_async``): a job with a rate limit reserves
  the next start slot of its tenant (GCRA, no burst). Due now, it is published at once;
  due later, it waits in Redis (a sorted set of Celery signatures scored by their slot) and is
  recorded ``queued`` with ``deferred_until`` in the history. So a flood of one tenant enters
  the work queue at its rate, and the other tenants' jobs never queue behind its backlog;
* **the mover** (:mod:`.mover`, a worker bootstep): publishes the deferred jobs whose time
  has come, at least once: a worker that dies between publishing and forgetting a job leaves
  it to be published again, with the same id (the history and the job's idempotency handle
  the copy);
* **admission** (:mod:`.admission`, in the worker's main process, before the pool): a job
  takes a concurrency lease and an execution rate slot (a second GCRA bucket with a little
  burst tolerance, so that a backlog that piled up while no worker ran cannot start faster
  than the rate). Over a limit, the job is *deferred*, not failed: stored for later, then
  acknowledged, recorded with the reason, and no attempt is counted.

If Redis does not answer, no job is lost and none runs unlimited: ``apply_async`` raises
:class:`~tasks_platform.errors.LimitsUnavailable` (nothing queued) and a worker puts the
message back after ``limits_defer_delay`` seconds.
"""
