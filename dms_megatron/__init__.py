"""dms-megatron: Dynamic Memory Sparsification re-fitting on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core announces at import time that it falls back to torch for fused kernels of packages we never use on
# CPU (Apex) or import lazily (Transformer Engine), and torch warns on every dist-checkpoint load that megatron still
# uses ShardedTensor; none is actionable by a user, and a one-line error must not drown in them.
for _msg in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
             r".*full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_msg, category=UserWarning)
# torch 2.13 deprecates the collectives megatron-core calls for sequence parallelism and the distributed optimizer
# (every rank would print it once: 16 copies at tp 8 x pp 2).
for _msg in (r".*Please use DTensor instead.*", r".*`load_state_dict` is deprecated.*",
             r".*`torch.distributed.all_gather_into_tensor` is deprecated.*",
             r".*`torch.distributed.reduce_scatter_tensor` is deprecated.*"):
    warnings.filterwarnings("ignore", message=_msg, category=FutureWarning)
