"""quantmesh shared library: schemas, topic registry, bus, service runtime and storage helpers."""

__version__ = "0.1.0"
