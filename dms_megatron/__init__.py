"""dms-megatron: Dynamic Memory Sparsification re-fitting on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core announces at import time that it falls back to torch for fused kernels of packages we never use on
# CPU (Apex) or import lazily (Transformer Engine), and torch warns on every dist-checkpoint load that megatron still
# uses ShardedTensor; none is actionable by a user, and a one-line error must not drown in them.
for _msg in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
             r".*full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_msg, category=UserWarning)
for _msg in (r".*Please use DTensor instead.*", r".*`load_state_dict` is deprecated.*"):
    warnings.filterwarnings("ignore", message=_msg, category=FutureWarning)
