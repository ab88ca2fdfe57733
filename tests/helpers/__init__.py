"""Helpers shared by the tests: processes, waits, session files, the built package."""
