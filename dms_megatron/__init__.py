"""dms-megatron: Dynamic Memory Sparsification re-fitting on megatron-core."""

__version__ = "0.1.0"
