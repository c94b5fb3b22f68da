"""The built-in strategies, registered as entry points in the signals package's pyproject."""
