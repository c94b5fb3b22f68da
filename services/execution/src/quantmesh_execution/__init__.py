"""quantmesh execution stage: venue adapters (simulated venue, ccxt live) with rate limits."""
