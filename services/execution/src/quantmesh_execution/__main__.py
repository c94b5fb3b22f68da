"""Entry point of `quantmesh-execution` and `python -m quantmesh_execution`."""

from __future__ import annotations

from quantmesh_common.runtime import run
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.service import ExecutionService


def main() -> None:
    """Run the execution stage until SIGTERM."""
    run(ExecutionService, ExecutionSettings)


if __name__ == "__main__":
    main()
