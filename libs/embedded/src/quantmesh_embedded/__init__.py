"""quantmesh in one process: every stage over the in-memory bus."""
