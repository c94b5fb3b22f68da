"""quantmesh signals stage: runs strategies over market data and emits signals and order intents."""
