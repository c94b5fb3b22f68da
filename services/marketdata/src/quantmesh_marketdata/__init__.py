"""quantmesh marketdata stage: ticks, bars and books from venues, replays and a synthetic feed."""
