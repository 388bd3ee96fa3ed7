"""Shared foundations: errors, JSON reading, atomic files, dtypes, option parsing, CLI error path.

The lowest layer: imports nothing else of dsflow."""
