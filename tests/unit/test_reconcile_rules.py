"""Small rules behind reconcile, poison messages and visibility leases (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks_platform.reconcile import Finding, Report, Verdict, _redacted
from tasks_platform.settings import Settings
from tasks_platform.visibility import renewal_interval


def test_message_limit_below_the_payload_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TASKS_MAX_MESSAGE_BYTES"):
        Settings(data_dir=tmp_path, max_payload_bytes=8192, max_message_bytes=4096)
    assert Settings(data_dir=tmp_path).max_message_bytes == 4 * 1_048_576


def test_redaction_marks_are_found_wherever_the_history_wrote_them() -> None:
    payload = {"account": "a", "password": "[redacted]", "nested": [{"key": "[too deep]"}]}
    assert sorted(_redacted(payload)) == ["nested[0].key", "password"]
    assert list(_redacted(["[redacted]"], "args")) == ["args[0]"]
    assert list(_redacted({"note": "redacted, but only in words"})) == []


def test_only_lost_jobs_not_queued_again_are_unresolved() -> None:
    def finding(verdict: Verdict) -> Finding:
        return Finding("id", "demo.work", "default", "queued", 1.0, verdict)

    settled = Report(0, 3, 0, [finding(v) for v in (Verdict.REQUEUED, Verdict.SKIPPED,
                                                    Verdict.UNKNOWN)])  # fmt: skip
    assert settled.unresolved == 0
    lost = Report(0, 3, 0, [finding(v) for v in (Verdict.LOST, Verdict.UNRECOVERABLE,
                                                 Verdict.FAILED)])  # fmt: skip
    assert lost.unresolved == 3
    assert lost.as_dict()["counts"]["unrecoverable"] == 1


def test_leases_are_renewed_four_times_per_visibility_timeout_but_never_in_a_busy_loop() -> None:
    assert renewal_interval(3600) == 900
    assert renewal_interval(1) == 0.5
