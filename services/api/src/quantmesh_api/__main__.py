"""Entry point of `quantmesh-api` and `python -m quantmesh_api`."""

from __future__ import annotations

from quantmesh_api.config import ApiSettings
from quantmesh_api.service import ApiService
from quantmesh_common.runtime import run


def main() -> None:
    """Run the api stage until SIGTERM."""
    run(ApiService, ApiSettings)


if __name__ == "__main__":
    main()
