"""Test helpers: real HTTP backends (servers.py)."""
