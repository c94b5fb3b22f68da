"""quantmesh oms stage: order state machine, idempotency and TWAP/VWAP parents."""
