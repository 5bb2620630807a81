"""A schemathesis run against the OpenAPI document the served API publishes: no 5xx, ever.

Its own deployment (Redis, a fresh PostgreSQL schema, the API in its own process), since the
generated requests pause queues, purge dead letters and clean the history at random. The run is
bounded: a few examples per operation, one worker process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from api_server import make_token, serve_api
from conftest import make_platform, postgres_schema

from tasks_platform.history import migrations

MAX_EXAMPLES = 6


def test_generated_requests_never_get_a_server_error(tmp_path: Path) -> None:
    with postgres_schema() as url, make_platform("redis", tmp_path, database_url=url) as platform:
        migrations.upgrade(platform.settings)
        _, secret = make_token(platform.settings, "admin")
        with serve_api(platform.settings, tmp_path / "api.log") as api:
            run = subprocess.run(
                [
                    sys.executable, "-m", "schemathesis.cli", "run", f"{api.url}/openapi.json",
                    "--checks", "not_a_server_error",
                    "--max-examples", str(MAX_EXAMPLES),
                    "--phases", "examples,coverage,fuzzing",
                    "--workers", "1",
                    "--seed", "4",
                    "--request-timeout", "30",
                    "--header", f"Authorization: Bearer {secret}",
                    "--suppress-health-check", "all",
                    "--no-color",
                ],
                capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path,
            )  # fmt: skip
            log = api.log()
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{output[-6000:]}\n--- API log ---\n{log[-4000:]}"
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts, output[-3000:]
    assert int(counts[1]) == int(counts[2]) > 100
    assert "unexpected error" not in log
