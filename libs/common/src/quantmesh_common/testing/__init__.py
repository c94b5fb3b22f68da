"""Test helpers shared by every package's tests: stub factories for events."""
