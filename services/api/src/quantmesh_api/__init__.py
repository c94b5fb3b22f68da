"""quantmesh api stage: the FastAPI gateway: REST and WebSocket, JWT and roles."""
