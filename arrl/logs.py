"""structlog set-up: one JSON line per event, with `stage` and `experiment_id` bound.

Event names are dotted verbs (`proposal.created`, `experiment.aborted`) with structured fields.
`bind_experiment` binds the context for one job or message; `ExperimentFileSink` also appends
each event that carries an experiment id to that experiment's own JSONL file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars, merge_contextvars

bind_experiment = bound_contextvars


class ExperimentFileSink:
    """A processor that appends events with an `experiment_id` to `<directory>/<id>.jsonl`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        exp_id = event_dict.get("experiment_id")
        if isinstance(exp_id, str) and exp_id.isalnum():
            with (self.directory / f"{exp_id}.jsonl").open("a") as f:
                f.write(json.dumps(event_dict, default=str) + "\n")
        return event_dict


def configure(stage: str, level: str = "info", experiment_dir: Path | None = None, stream=None) -> None:
    """JSON to stdout (or `stream`), bound to `stage`; call once at a process's start."""
    processors: list[Any] = [
        merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.dict_tracebacks,
    ]
    if experiment_dir is not None:
        processors.append(ExperimentFileSink(experiment_dir))
    processors.append(structlog.processors.JSONRenderer(default=str))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(stage=stage)


def stdlib_formatter() -> logging.Formatter:
    """Routes standard-library logs (rq's) through structlog, so everything is one JSON format."""
    return structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(default=str),
        foreign_pre_chain=[
            merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
    )
