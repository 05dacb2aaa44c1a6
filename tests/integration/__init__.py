"""Integration tests: softlb and gunicorn in real subprocesses, in front of real backends."""
