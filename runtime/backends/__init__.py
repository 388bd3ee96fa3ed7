"""Worker backends: MindSpore GraphCell (CPU) and MindSpore Lite (Ascend)."""
