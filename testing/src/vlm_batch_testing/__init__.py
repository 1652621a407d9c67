"""Test support for vlm-batch, installed only where the tests run: tiny checkpoints of every family's
real architecture (built locally, never downloaded), the tiny judge, and fault injection."""
