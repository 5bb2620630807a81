"""The ``reports`` family: ``reports.render`` writes a CSV file from its payload."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tasks_platform.domain.reports import render_csv
from tasks_platform.jobs.declaration import JobContext, job
from tasks_platform.jobs.retry import RetryPolicy

Cell = str | int | float | None


class RenderReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)
    columns: list[str] = Field(min_length=1, max_length=200)
    rows: list[list[Cell]] = Field(max_length=100_000)


@job(
    "reports.render",
    queue="reports",
    schema=RenderReport,
    retry=RetryPolicy(max_retries=3, transient=(OSError,)),
    soft_time_limit=120,
    time_limit=150,
    bind=True,
)
def render(context: JobContext, payload: RenderReport) -> dict[str, object]:
    """Render the report to ``<data dir>/reports/<job id>.csv``."""
    report = render_csv(
        title=payload.title,
        columns=payload.columns,
        rows=[list(row) for row in payload.rows],
        directory=context.settings.data_dir / "reports",
        stem=context.id,
    )
    return {"path": str(report.path), "rows": report.rows, "bytes": report.bytes}
