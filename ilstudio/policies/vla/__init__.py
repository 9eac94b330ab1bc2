"""VLA policy: vision tower + mm projector + causal LM + action head (see modeling.py)."""
