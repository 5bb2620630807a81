"""Flower's command line and environment, built from the settings (no process started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks_platform.flower import FlowerError, flower_command
from tasks_platform.settings import Settings

SECRET = "s3cret-enough"


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(data_dir=tmp_path, **values)


def test_credentials_reach_flower_through_its_environment_never_its_command_line(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, flower_user="ops", flower_password=SECRET)

    command = flower_command(settings, port=5600, address="127.0.0.1")

    assert command.env["FLOWER_BASIC_AUTH"] == f"ops:{SECRET}"
    assert not any(SECRET in arg for arg in command.argv)
    assert SECRET not in repr(command)
    assert command.argv[1:6] == ["-m", "celery", "-A", "tasks_platform", "flower"]
    assert {"--port=5600", "--address=127.0.0.1"} <= set(command.argv)
    assert command.authenticated
    assert command.url == "http://127.0.0.1:5600/"


def test_without_credentials_flower_is_refused_with_the_variables_named(tmp_path: Path) -> None:
    with pytest.raises(FlowerError, match=r"TASKS_FLOWER_USER and TASKS_FLOWER_PASSWORD"):
        flower_command(_settings(tmp_path))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"flower_user": "ops"}, "TASKS_FLOWER_PASSWORD is not set"),
        ({"flower_password": SECRET}, "TASKS_FLOWER_USER is not set"),
        ({"flower_user": "ops", "flower_password": "short"}, "too short"),
        ({"flower_user": "ops", "flower_password": "long,enough"}, "must not contain a comma"),
        ({"flower_user": "o:ps", "flower_password": SECRET}, "colon, comma or space"),
        ({"flower_user": "", "flower_password": SECRET}, "colon, comma or space"),
    ],
)
def test_unusable_credentials_are_refused(
    tmp_path: Path, values: dict[str, str], message: str
) -> None:
    with pytest.raises(FlowerError, match=message):
        flower_command(_settings(tmp_path, **values))


def test_insecure_dev_runs_without_credentials_on_loopback_only(tmp_path: Path) -> None:
    settings = _settings(tmp_path)

    for address in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        command = flower_command(settings, address=address, insecure_dev=True)
        assert not command.authenticated
        assert "FLOWER_BASIC_AUTH" in command.unset  # an inherited one would not be ours
    for address in ("0.0.0.0", "", "192.0.2.7", "example.org"):
        with pytest.raises(FlowerError, match="only on a loopback address"):
            flower_command(settings, address=address, insecure_dev=True)


def test_insecure_dev_with_credentials_still_authenticates(tmp_path: Path) -> None:
    settings = _settings(tmp_path, flower_user="ops", flower_password=SECRET)

    command = flower_command(settings, address="0.0.0.0", insecure_dev=True)

    assert command.authenticated
    assert command.env["FLOWER_BASIC_AUTH"] == f"ops:{SECRET}"


def test_the_embedded_broker_is_named_in_a_note(tmp_path: Path) -> None:
    command = flower_command(_settings(tmp_path), insecure_dev=True)
    assert any(note.startswith("embedded broker:") for note in command.notes)


def test_rabbitmq_management_api_is_passed_in_the_environment(tmp_path: Path) -> None:
    api = "http://guest:guest@rabbit:15672/api/"
    settings = _settings(
        tmp_path,
        broker_url="amqp://guest:guest@rabbit//",
        flower_user="ops",
        flower_password=SECRET,
        flower_broker_api=api,
    )

    command = flower_command(settings)

    assert command.env["FLOWER_BROKER_API"] == api
    assert not any("15672" in arg for arg in command.argv)
    assert command.notes == []


def test_a_broker_api_that_is_not_an_http_url_is_refused(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, flower_user="ops", flower_password=SECRET, flower_broker_api="rabbit:15672"
    )
    with pytest.raises(FlowerError, match="management API URL"):
        flower_command(settings)


def test_url_prefix_is_passed_and_shown_in_the_url(tmp_path: Path) -> None:
    settings = _settings(tmp_path, flower_user="ops", flower_password=SECRET)

    command = flower_command(settings, port=5601, url_prefix="/flower/")

    assert "--url_prefix=flower" in command.argv
    assert command.url == "http://127.0.0.1:5601/flower/"
    with pytest.raises(FlowerError, match="--url-prefix"):
        flower_command(settings, url_prefix="a b")
