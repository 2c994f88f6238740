"""Persistence: safe file I/O, STAR adapters, and whole STAR checkpoints."""
