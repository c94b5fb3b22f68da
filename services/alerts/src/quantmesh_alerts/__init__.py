"""quantmesh alerts stage: notifies operators of rejects, fills, breaches and health."""
