"""Entry point of `quantmesh-oms` and `python -m quantmesh_oms`."""

from __future__ import annotations

from quantmesh_common.runtime import run
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService


def main() -> None:
    """Run the oms stage until SIGTERM."""
    run(OmsService, OmsSettings)


if __name__ == "__main__":
    main()
