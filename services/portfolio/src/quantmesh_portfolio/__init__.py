"""quantmesh portfolio stage: positions, FIFO P&L, balances and equity."""
