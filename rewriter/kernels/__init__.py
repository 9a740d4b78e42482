"""Attention kernels: torch custom ops and blockwise math, and the ONNX subgraph builders.

Names both kinds share live here, so the ONNX builders import without torch.
"""

FEATURE_MAPS = ("favor_softmax", "relu", "elu_plus_one", "identity")  # linear-attention feature maps φ
