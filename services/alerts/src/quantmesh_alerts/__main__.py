"""Entry point of `quantmesh-alerts` and `python -m quantmesh_alerts`."""

from __future__ import annotations

from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.service import AlertsService
from quantmesh_common.runtime import run


def main() -> None:
    """Run the alerts stage until SIGTERM."""
    run(AlertsService, AlertsSettings)


if __name__ == "__main__":
    main()
