"""Runtimes execute a method's stages: in one process (serial) or one process per group (distributed)."""
