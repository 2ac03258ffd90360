"""Test doubles that are real code: importable, typed, used by the unit tests."""
