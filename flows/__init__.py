"""Orchestration: the Prefect flow over the stage functions, its DVC bookkeeping, deployments.

Importing this package sets the environment Prefect reads at import time, before any
`import prefect` in this process: no anonymous usage analytics, and the `evit` loggers
forwarded to the run logs (so a stage's log lines show up in the Prefect UI). Values a
user already set win.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "evit")
# The ephemeral API server (no PREFECT_API_URL) creates its database on first use; on a busy
# 2-core machine that can take longer than Prefect's default 30 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# One INFO line per HTTP request to the Prefect API drowns the stage logs.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)
