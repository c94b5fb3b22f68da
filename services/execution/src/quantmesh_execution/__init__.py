"""quantmesh execution stage: venue adapters (the simulated venue now; ccxt live later)."""
