"""The workflows: each a Python function first, the CLI a thin layer over it."""
