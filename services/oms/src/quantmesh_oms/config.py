"""Configuration of the oms stage: the shared QM_* settings with the stage's own port."""

from __future__ import annotations

from pydantic import Field

from quantmesh_common.settings import ServiceSettings

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8104


class OmsSettings(ServiceSettings):
    """Settings of the oms stage: the shared ones; it has none of its own yet."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
