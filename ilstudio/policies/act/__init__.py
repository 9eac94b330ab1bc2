"""ACT: action chunking with transformers (Zhao et al. 2023), a CVAE over action chunks."""
