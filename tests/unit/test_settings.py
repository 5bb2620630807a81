"""Settings: TASKS_* variables, broker kinds, and the combinations that cannot work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks_platform.application import create_app
from tasks_platform.errors import ConfigurationError
from tasks_platform.settings import BrokerKind, Settings, load_settings


def test_unit_tests_see_no_platform_variables() -> None:
    assert not [name for name in os.environ if name.startswith("TASKS_")]


def test_defaults_run_on_the_embedded_file_broker(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.broker_kind is BrokerKind.FILESYSTEM
    assert settings.embedded
    assert settings.effective_broker_url == "embedded://localhost//"
    assert settings.result_backend is None
    assert (settings.max_retries, settings.max_deliveries, settings.prefetch_multiplier) == (
        5,
        3,
        1,
    )
    assert settings.time_limit > settings.soft_time_limit


def test_default_data_dir_is_under_the_home_directory() -> None:
    assert Settings().data_dir == Path.home() / ".local" / "share" / "tasks-platform"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (None, BrokerKind.FILESYSTEM),
        ("filesystem://localhost//", BrokerKind.FILESYSTEM),
        ("embedded://localhost//", BrokerKind.FILESYSTEM),
        ("redis://localhost:6379/0", BrokerKind.REDIS),
        ("rediss://:secret@cache.example.com:6380/0", BrokerKind.REDIS),
        ("REDIS://LOCALHOST:6379/0", BrokerKind.REDIS),
        ("redis+socket:///run/redis.sock", BrokerKind.REDIS),
        ("amqp://guest:guest@localhost:5672//", BrokerKind.RABBITMQ),
        ("amqps://user:pw@mq.example.com:5671/vhost", BrokerKind.RABBITMQ),
        ("pyamqp://guest@localhost//", BrokerKind.RABBITMQ),
    ],
)
def test_broker_kind_follows_the_url_scheme(url: str | None, kind: BrokerKind) -> None:
    settings = load_settings(broker_url=url)
    assert settings.broker_kind is kind
    assert settings.effective_broker_url == (url or "embedded://localhost//")


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("TASKS_BROKER_URL", "amqp://guest@localhost//", "broker_kind", BrokerKind.RABBITMQ),
        ("TASKS_BROKER_URL", "redis://localhost/0", "broker_kind", BrokerKind.REDIS),
        ("TASKS_MAX_RETRIES", "7", "max_retries", 7),
        ("TASKS_BACKOFF_BASE", "0.25", "backoff_base", 0.25),
        ("TASKS_QUEUE_PREFIX", "ci_42-", "queue_prefix", "ci_42-"),
        ("TASKS_DATA_DIR", "/srv/tasks", "data_dir", Path("/srv/tasks")),
        ("TASKS_MAX_PAYLOAD_BYTES", "4096", "max_payload_bytes", 4096),
    ],
)
def test_settings_are_read_from_tasks_variables(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(Settings(), field) == expected


def test_explicit_values_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKS_BROKER_URL", "redis://localhost/0")
    monkeypatch.setenv("TASKS_MAX_RETRIES", "7")
    settings = load_settings(broker_url="amqp://guest@localhost//", max_retries=2)
    assert settings.broker_kind is BrokerKind.RABBITMQ
    assert settings.max_retries == 2


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ValidationError, match="frozen"):
        settings.max_retries = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "scheme"),
    [("http://localhost", "http"), ("mongodb://db/tasks", "mongodb"), ("sqs://", "sqs")],
)
def test_unknown_broker_scheme_is_a_configuration_error_naming_it(url: str, scheme: str) -> None:
    with pytest.raises(ConfigurationError, match=f"scheme '{scheme}'") as caught:
        load_settings(broker_url=url)
    for known in ("amqp", "filesystem", "redis", "rediss"):
        assert known in str(caught.value)
    assert "TASKS_BROKER_URL" in str(caught.value)


def test_unknown_broker_scheme_from_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKS_BROKER_URL", "kafka://broker:9092")
    with pytest.raises(ConfigurationError, match="'kafka'"):
        load_settings()


@pytest.mark.parametrize(("soft", "hard"), [(300.0, 300.0), (300.0, 200.0), (10.0, 9.99)])
def test_time_limit_must_exceed_the_soft_time_limit(soft: float, hard: float) -> None:
    with pytest.raises(ConfigurationError, match=r"TASKS_TIME_LIMIT \(.*\) must be greater than"):
        load_settings(soft_time_limit=soft, time_limit=hard)


def test_time_limit_just_above_the_soft_limit_is_accepted() -> None:
    settings = load_settings(soft_time_limit=10.0, time_limit=10.5)
    assert settings.time_limit == 10.5


@pytest.mark.parametrize(
    ("backoff_max", "visibility_timeout"), [(3600.0, 3600.0), (4000.0, 3600.0), (60.0, 30.0)]
)
def test_redis_refuses_backoff_max_reaching_the_visibility_timeout(
    backoff_max: float, visibility_timeout: float
) -> None:
    with pytest.raises(ConfigurationError, match="TASKS_VISIBILITY_TIMEOUT"):
        load_settings(
            broker_url="redis://localhost/0",
            backoff_max=backoff_max,
            visibility_timeout=visibility_timeout,
        )


def test_redis_backoff_check_applies_to_environment_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKS_BROKER_URL", "rediss://cache:6380/0")
    monkeypatch.setenv("TASKS_BACKOFF_MAX", "4000")
    with pytest.raises(ConfigurationError, match="TASKS_BACKOFF_MAX"):
        load_settings()


@pytest.mark.parametrize("url", [None, "amqp://guest@localhost//"])
def test_backoff_max_beyond_visibility_timeout_is_fine_off_redis(url: str | None) -> None:
    settings = load_settings(broker_url=url, backoff_max=4000.0, visibility_timeout=3600.0)
    assert settings.backoff_max == 4000.0


def test_redis_backoff_below_the_visibility_timeout_is_accepted() -> None:
    settings = load_settings(
        broker_url="redis://localhost/0", backoff_max=3599.0, visibility_timeout=3600.0
    )
    assert settings.broker_kind is BrokerKind.REDIS


@pytest.mark.parametrize("prefix", ["a b", "ci.1", "ci/1", "ci:1", "x*", "tâche", "a\n"])
def test_queue_prefix_with_bad_characters_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="queue_prefix"):
        load_settings(queue_prefix=prefix)


@pytest.mark.parametrize("prefix", ["", "ci_", "run-42_", "ABC123"])
def test_queue_prefix_of_letters_digits_dash_underscore_is_accepted(prefix: str) -> None:
    assert load_settings(queue_prefix=prefix).queue_prefix == prefix


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": -1},
        {"backoff_base": 0},
        {"backoff_max": -1.0},
        {"max_deliveries": 0},
        {"prefetch_multiplier": 0},
        {"max_payload_bytes": 1023},
        {"visibility_timeout": 0},
        {"polling_interval": 0},
    ],
    ids=repr,
)
def test_out_of_range_numbers_are_refused(options: dict[str, object]) -> None:
    (field,) = options
    with pytest.raises(ConfigurationError, match=field):
        load_settings(**options)


def test_unknown_setting_passed_as_keyword_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="brokr_url"):
        load_settings(brokr_url="redis://localhost/0")


def test_configuration_error_keeps_the_validation_error_as_cause() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(max_retries=-1)
    assert isinstance(caught.value.__cause__, ValidationError)


def test_effective_database_url_defaults_to_sqlite_under_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.effective_database_url == f"sqlite:///{tmp_path.resolve() / 'history.db'}"


def test_effective_database_url_is_absolute_for_a_relative_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=Path("state"))
    assert settings.effective_database_url == f"sqlite:///{tmp_path.resolve() / 'state/history.db'}"


def test_configured_database_url_is_used_as_is(tmp_path: Path) -> None:
    url = "postgresql+psycopg://tasks:secret@db:5432/tasks"
    assert Settings(data_dir=tmp_path, database_url=url).effective_database_url == url


def test_broker_folders_are_queue_control_processed_under_data_dir(tmp_path: Path) -> None:
    folders = Settings(data_dir=tmp_path).broker_folders()
    root = tmp_path.resolve() / "broker"
    assert folders == {
        "queue": root / "queue",
        "control": root / "control",
        "processed": root / "processed",
    }
    assert not root.exists(), "settings never touch the disk"


def test_create_app_creates_the_embedded_broker_folders(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    create_app(settings, set_as_current=False)
    assert all(folder.is_dir() for folder in settings.broker_folders().values())


def test_explicit_filesystem_url_is_embedded_and_gets_its_folders(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="filesystem://localhost//")
    create_app(settings, set_as_current=False)
    assert all(folder.is_dir() for folder in settings.broker_folders().values())
    assert settings.embedded
