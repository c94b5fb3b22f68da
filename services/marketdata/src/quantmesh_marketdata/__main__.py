"""Entry point of `quantmesh-marketdata` and `python -m quantmesh_marketdata`."""

from __future__ import annotations

from quantmesh_common.runtime import run
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.service import MarketDataService


def main() -> None:
    """Run the marketdata stage until SIGTERM."""
    run(MarketDataService, MarketDataSettings)


if __name__ == "__main__":
    main()
