"""Entry point of `quantmesh-portfolio` and `python -m quantmesh_portfolio`."""

from __future__ import annotations

from quantmesh_common.runtime import run
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService


def main() -> None:
    """Run the portfolio stage until SIGTERM."""
    run(PortfolioService, PortfolioSettings)


if __name__ == "__main__":
    main()
