"""The dashboard page in a real headless Chromium, against a real API server process.

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser and its driver
(``make test`` installs them when missing); without them the test skips locally and fails in CI.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Platform,
    Runs,
    in_ci,
    make_platform,
    postgres_schema,
    stop_process,
    wait_for,
)
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tasks_platform.history import migrations
from tasks_platform.process import settings_env

CLI = [sys.executable, "-m", "tasks_platform"]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 30.0
FIXABLE, BROKEN = ("fixable-0", "fixable-1", "fixable-2"), ("broken-0", "broken-1")


def _environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")} | env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _request(port: int, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        connection.close()


@contextlib.contextmanager
def _api_server(env: dict[str, str], tmp_path: Path) -> Iterator[int]:
    port = _free_port()
    log = tmp_path / "api.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*CLI, "api", "--port", str(port)],
            env=_environment(env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the API exited ({process.returncode}):\n{log.read_text()}")
        try:
            return _request(port, "GET", "/api/v1/live")[0] == 200
        except OSError:
            return False

    try:
        wait_for(answering, 60, what="the API server", interval=0.2)
        yield port
    finally:
        stop_process(process, timeout=15, whole_group=True)


@contextlib.contextmanager
def _chromium() -> Iterator[webdriver.Chrome]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"{', '.join(missing)} missing (Debian packages chromium, chromium-driver)"
        if in_ci():
            pytest.fail(f"{message}; under CI a missing browser is a failure, not a skip")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


def _create_token(env: dict[str, str], role: str) -> str:
    made = subprocess.run(
        [*CLI, "token", "create", "--name", f"dashboard-{role}", "--role", role],
        env=_environment(env), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def _kill_jobs(platform: Platform, missing: Path) -> dict[str, str]:
    """Their ids by label: three jobs that die because the folder ``missing`` is (a fault an
    operator can fix, after which they can run), two that fail for good."""
    task, runs = platform.task("demo.work"), str(platform.runs().path)
    ids = {label: task.delay(label=label, record_to=str(missing / "runs.txt")).id
           for label in FIXABLE}  # fmt: skip
    ids |= {label: task.delay(label=label, fail_permanently=True, record_to=runs).id
            for label in BROKEN}  # fmt: skip
    wait_for(lambda: len(platform.dead_letters().list()) == 5, 60, what="five dead letters")
    return ids


def _text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def _row(driver: webdriver.Chrome, attribute: str, value: str) -> WebElement | None:
    rows = driver.find_elements(By.CSS_SELECTOR, f"tr[{attribute}='{value}']")
    return rows[0] if rows else None


def _click(driver: webdriver.Chrome, attribute: str, value: str, button: str) -> None:
    """Click ``button`` in the row whose ``attribute`` is ``value``; the page re-renders its
    tables when it refreshes, so a row found a moment ago may be gone: find it again."""

    def clicked(d: webdriver.Chrome) -> bool:
        row = _row(d, attribute, value)
        if row is None:
            return False
        row.find_element(By.CSS_SELECTOR, button).click()
        return True

    _until(driver, clicked, f"{button} in the row {attribute}={value}")


def _state(port: int, token: str, job_id: str) -> str:
    status, body = _request(port, "GET", f"/api/v1/jobs/{job_id}", token)
    assert status == 200, body
    return str(body["job"]["state"])


def _stored_token(driver: webdriver.Chrome) -> str | None:
    return driver.execute_script("return window.sessionStorage.getItem('tasks-platform.token')")


def _until(driver: webdriver.Chrome, condition: Any, what: str) -> Any:
    return WebDriverWait(driver, WAIT, ignored_exceptions=[StaleElementReferenceException]).until(
        condition, message=f"timed out after {WAIT:.0f}s waiting for {what}"
    )


def test_dashboard_replays_a_dead_letter_group_and_its_jobs_run(tmp_path: Path) -> None:
    with postgres_schema() as url, make_platform("redis", tmp_path, database_url=url) as platform:
        migrations.upgrade(platform.settings)
        env = settings_env(platform.settings)
        operator = _create_token(env, "operator")
        platform.worker()
        folder = tmp_path / "created-later"
        ids = _kill_jobs(platform, folder)
        groups = {group.exc_type: group for group in platform.dead_letters().groups()}
        assert set(groups) == {"FileNotFoundError", "SimulatedRejection"}, groups
        fixable, broken = groups["FileNotFoundError"], groups["SimulatedRejection"]
        assert sorted(fixable.task_ids) == sorted(ids[label] for label in FIXABLE)
        folder.mkdir()  # the operator fixes the fault

        with _api_server(env, tmp_path) as port, _chromium() as driver:
            driver.get(f"http://127.0.0.1:{port}/dashboard")
            assert "No token yet" in _text(driver, "token-state")
            driver.find_element(By.ID, "token").send_keys(operator)
            driver.find_element(By.ID, "token-save").click()

            _until(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
                "data-loaded"), "the page to load its tables")  # fmt: skip
            assert _row(driver, "data-group", fixable.fingerprint) is not None
            assert _row(driver, "data-group", broken.fingerprint) is not None
            assert _text(driver, "health-level") in ("healthy", "warning", "critical")
            assert _row(driver, "data-queue", "default") is not None
            failures = driver.find_element(By.ID, "failures-body").text
            assert all(ids[label] in failures for label in (*FIXABLE, *BROKEN)), failures
            assert _text(driver, "errors") == ""

            _click(driver, "data-group", fixable.fingerprint, "button.replay")
            replayed = f"replayed 3 job(s) of group {fixable.fingerprint}"
            _until(driver, lambda d: _text(d, "status") == replayed, "the replay to be reported")

            # the jobs of that group ran again, and finished; the other group did not move
            fixed = Runs(folder / "runs.txt")
            wait_for(lambda: sorted(r[0] for r in fixed.dones()) == list(FIXABLE),
                     60, what="the replayed jobs to finish")  # fmt: skip
            assert sorted(r[0] for r in fixed.starts()) == list(FIXABLE)
            assert sorted(r[0] for r in platform.runs().starts()) == list(BROKEN)
            assert {letter.task_id for letter in platform.dead_letters().list()} == {
                ids[label] for label in BROKEN
            }
            for label in FIXABLE:
                wait_for(lambda job_id=ids[label]: _state(port, operator, job_id) == "succeeded",
                         30, what=f"{label} to be recorded as succeeded")  # fmt: skip

            driver.find_element(By.ID, "refresh").click()
            _until(driver, lambda d: _row(d, "data-group", fixable.fingerprint) is None,
                   "the replayed group to leave the table")  # fmt: skip
            assert _row(driver, "data-group", broken.fingerprint) is not None

            # every error the API answers is shown: an operator may not purge
            _click(driver, "data-group", broken.fingerprint, "button.purge")
            driver.switch_to.alert.accept()
            _until(driver, lambda d: "POST /dlq/purge: HTTP 403 forbidden" in _text(d, "errors"),
                   "the refused purge to be shown")  # fmt: skip
            assert len(platform.dead_letters().list()) == 2  # nothing lost

            # pause and resume a queue from the page
            _click(driver, "data-queue", "email", "button.pause")
            _until(driver, lambda d: _text(d, "status") == "queue email paused", "the pause")
            _until(driver, lambda d: "paused" in _row(d, "data-queue", "email").text,
                   "the paused state")  # fmt: skip
            _click(driver, "data-queue", "email", "button.resume")
            _until(driver, lambda d: _text(d, "status") == "queue email resumed", "the resume")

            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert [e for e in severe if "/dlq/purge" not in e["message"]] == [], severe


def test_dashboard_without_a_valid_token_shows_the_api_error(tmp_path: Path) -> None:
    with postgres_schema() as url, make_platform("redis", tmp_path, database_url=url) as platform:
        migrations.upgrade(platform.settings)
        env = settings_env(platform.settings)
        with _api_server(env, tmp_path) as port, _chromium() as driver:
            driver.get(f"http://127.0.0.1:{port}/dashboard")
            driver.find_element(By.ID, "token").send_keys("not-a-token")
            driver.find_element(By.ID, "token-save").click()

            _until(driver, lambda d: "GET /queues: HTTP 401 invalid_token" in _text(d, "errors"),
                   "the refused token to be shown")  # fmt: skip
            assert "paste a valid token above" in _text(driver, "errors")
            assert _stored_token(driver) == "not-a-token"

            driver.find_element(By.ID, "token-forget").click()
            _until(driver, lambda d: d.find_element(By.ID, "token-state").is_displayed(),
                   "the token prompt")  # fmt: skip
            assert _stored_token(driver) is None
            assert _text(driver, "errors") == ""
