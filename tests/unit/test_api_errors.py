"""The admin API's answer to each kind of failed publish: what the client should do differs."""

from __future__ import annotations

import asyncio
import json

import pytest

from tasks_platform.api.handlers import _platform_error
from tasks_platform.errors import BrokerUnavailable, PlatformError, PublishNotConfirmed


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BrokerUnavailable("nothing was queued"), "broker_unavailable"),
        (PublishNotConfirmed("it may be queued or not"), "publish_not_confirmed"),
    ],
)
def test_a_failed_publish_is_a_503_that_says_whether_the_job_may_be_queued(
    error: PlatformError, code: str
) -> None:
    response = asyncio.run(_platform_error(None, error))

    assert response.status_code == 503
    body = json.loads(bytes(response.body))
    assert body["error"] == {"code": code, "message": str(error)}
