"""Entry point of `quantmesh-risk` and `python -m quantmesh_risk`."""

from __future__ import annotations

from quantmesh_common.runtime import run
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import RiskService


def main() -> None:
    """Run the risk stage until SIGTERM."""
    run(RiskService, RiskSettings)


if __name__ == "__main__":
    main()
