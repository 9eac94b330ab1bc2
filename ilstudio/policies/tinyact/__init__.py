"""TinyACT: ACT's action chunks with a CPU-sized keypoint image encoder (see modeling.py)."""
