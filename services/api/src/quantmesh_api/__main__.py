"""Entry point of `quantmesh-api` and `python -m quantmesh_api`."""

from __future__ import annotations

import asyncio

import uvloop

from quantmesh_api.config import ApiSettings
from quantmesh_api.service import ApiService
from quantmesh_common.runtime import run


def main() -> None:
    """Run the api stage until SIGTERM, on uvloop (uvicorn parses HTTP with httptools)."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    run(ApiService, ApiSettings)


if __name__ == "__main__":
    main()
