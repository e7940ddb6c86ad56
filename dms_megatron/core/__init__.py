"""Pure DMS math: gating, masks, losses, schedules and attention kernels. No Megatron imports here."""

from dms_megatron.core.attention import BACKENDS, KERNELS, DMSKernel, load_kernel, resolve_backend
from dms_megatron.core.gating import (
    apply_alpha_per,
    global_ids,
    gumbel_sigmoid,
    hard_decisions,
    logistic_noise,
    projection_decision_logits,
    qneuron_decision_logits,
    zero_borrowed_neuron,
)
from dms_megatron.core.compression import achieved_cr, cr_from_evicted_fraction, evicted_key_fraction
from dms_megatron.core.losses import (compression_loss, cr_at_step, kd_loss, masked_token_mean, target_evicted_fraction,
                                      token_kl)
from dms_megatron.core.masks import (
    causal_bias,
    decisions_to_key_logits,
    dms_hard_bias,
    dms_soft_bias,
    eviction_visibility,
)
from dms_megatron.core.norms import rms_norm
from dms_megatron.core.rope import LLAMA3_ROPE, apply_rope, rope_inv_freq
