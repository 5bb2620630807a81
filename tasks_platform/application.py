"""The Celery application: ``create_app()``; ``tasks_platform.app`` is the default one."""

from __future__ import annotations

from celery import Celery

from celeryconfig import celery_config
from tasks_platform import embedded  # noqa: F401 - registers the embedded:// broker
from tasks_platform.history import recorder
from tasks_platform.limits.mover import DeferredMover
from tasks_platform.liveness import WorkerLiveness
from tasks_platform.outbox.relay import OutboxRelay
from tasks_platform.settings import Settings, load_settings
from tasks_platform.topology import Topology
from tasks_platform.visibility import VisibilityLease
from tasks_platform.worker import DeclareDeadLetterQueues
from tasks_platform.worker_control import WorkerControl


class PlatformCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries its platform settings and topology."""

    settings: Settings
    topology: Topology


def create_app(settings: Settings | None = None, *, set_as_current: bool = True) -> PlatformCelery:
    """A configured Celery app. Nothing connects to a server until the app is used."""
    # celeryconfig imports this package's modules; importing it here keeps start-up ordered

    settings = settings or load_settings()
    topology = Topology(settings)
    if settings.embedded:
        for folder in settings.broker_folders().values():
            folder.mkdir(parents=True, exist_ok=True)
    app = PlatformCelery("tasks_platform", set_as_current=set_as_current)
    app.settings = settings
    app.topology = topology
    app.conf.update(celery_config(settings, topology))
    app.steps["consumer"].add(DeclareDeadLetterQueues)
    app.steps["consumer"].add(WorkerControl)  # durable queue pauses and cancellations
    app.steps["consumer"].add(DeferredMover)  # tenant limits: publishes deferred jobs
    app.steps["consumer"].add(VisibilityLease)  # Redis: held jobs are not handed out again
    app.steps["consumer"].add(WorkerLiveness)  # TASKS_WORKER_LIVENESS_FILE, for probes
    app.steps["consumer"].add(OutboxRelay)  # publishes jobs committed to the outbox
    if settings.history_enabled:
        recorder.install(app)
    return app
