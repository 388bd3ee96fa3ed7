"""Checkpoint formats: one reader over safetensors, PyTorch .bin (restricted unpickler),
MindSpore .ckpt with MindFormers names; and the HF directory writer."""
