"""Entry point of `quantmesh-signals` and `python -m quantmesh_signals`."""

from __future__ import annotations

from quantmesh_common.runtime import run
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.service import SignalsService


def main() -> None:
    """Run the signals stage until SIGTERM."""
    run(SignalsService, SignalsSettings)


if __name__ == "__main__":
    main()
