"""quantmesh risk stage: pre-trade checks, sizing, kill switch and circuit breakers."""
