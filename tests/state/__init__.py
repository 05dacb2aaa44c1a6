"""Tests of the state stores (one contract suite over all of them) and the in-flight table."""
