"""Per-rank weight files: slicing by the TP plan, the per-rank shard format, merging back,
format conversion, and the memory planner."""
