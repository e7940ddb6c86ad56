"""``dms-dryrun``: what a re-fit config would do on its GPU cluster layout, without starting training.

Takes the same overrides as ``dms-refit`` (e.g. ``dms-dryrun parallel=h100_256 model=qwen3-8b train=paper
dms=paper``), validates them and the layout against the model (the same one-line errors as the trainer), and prints
which global ranks form each tensor / pipeline / data-parallel group (megatron-core's rank order), a per-GPU memory
estimate for the configured precision and optimizer, whether it fits the GPU (``--gpu-memory-gib``, default 80: an
H100) and the tokens per optimizer step, and the evaluation stage (which runs at the same layout, forward-only). Creates no process group and no run directory. Exit status: 0 fits, 1 does
not fit, 2 bad input.

  dms-dryrun [--gpu-memory-gib 141] OVERRIDES...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from megatron.core.parallel_state import RankGenerator

from dms_megatron.config import ConfigError, RefitConfig
from dms_megatron.config.run import resolved_precision
from dms_megatron.core.attention import resolve_backend_name
from dms_megatron.launch.hydra_cli import fail, preflight, register_schema
from dms_megatron.megatron.distributed import validate_model_layout
from dms_megatron.training.inputs import refit_config

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the busiest pipeline stage."""

    student_params: int
    grads: int
    optimizer: int
    teacher_params: int
    activations: int
    logits: int = 0  # the last stage's logits / KL buffers of one micro batch
    checkpoint: int = 0  # bytes one save writes per GPU (host memory staging copy with train.async_save)

    @property
    def total(self) -> int:
        return (self.student_params + self.grads + self.optimizer + self.teacher_params + self.activations
                + self.logits)

    @property
    def eval_peak(self) -> int:
        """An upper bound of the evaluation stage (forward-only at the training layout): weights, grads and optimizer
        state stay resident, the training activations are freed, the last stage's logits buffers are those of the
        train step less their gradient."""
        return self.total - self.activations


def layer_params(mc, dms) -> int:
    """Parameters of one decoder layer (attention, SwiGLU MLP, norms, DMS adapter)."""
    h, hd, nh, ng, f = mc.hidden_size, mc.kv_channels, mc.num_attention_heads, mc.num_query_groups, mc.ffn_hidden_size
    qkv = h * (nh + 2 * ng) * hd + ((nh + 2 * ng) * hd if mc.add_qkv_bias else 0)
    n = qkv + nh * hd * h + 2 * h * f + f * h + 2 * h + (2 * hd if mc.qk_layernorm else 0)
    if dms is not None and dms.alpha_source == "adapter":
        n += h + h * ng
    return n


def stage_params(mc, dms, tp: int, pp: int) -> int:
    """Parameters held by one GPU of the largest pipeline stage (tensor-parallel share; norms are replicated)."""
    vocab = mc.padded_vocab_size(tp) * mc.hidden_size
    layers = mc.num_layers // pp * layer_params(mc, dms) // tp
    first = layers + vocab // tp
    last = layers + mc.hidden_size + vocab // tp  # with pp > 1 a tied output layer is a copy on the last stage
    return max(first, last) if pp > 1 else layers + mc.hidden_size + (1 if mc.tie_embeddings else 2) * vocab // tp


def activation_bytes(cfg, tp: int, pp: int, dp: int, bytes_per: int = 4, device: str = "cuda") -> int:
    """Stored activations of the busiest stage: per layer ~ s*b*h*34 16-bit bytes without recompute (Korthikanti et
    al. 2022; the 5*a*s^2 attention-score term only for a backend that materialises scores, i.e. dense), scaled to
    ``bytes_per`` and divided by tp (all of it with sequence parallel, the attention/MLP part without), plus the DMS
    dense bias [b, heads, s, s] when the backend is dense; 1F1B keeps up to pp micro batches in flight on the first
    stage. The teacher runs without grad (one layer's buffers, not counted)."""
    mc, t, s, b = cfg.model, cfg.train, cfg.train.seq_length, cfg.train.micro_batch_size
    h, a = mc.hidden_size, mc.num_attention_heads
    dense = resolve_backend_name(cfg.dms.backend, device) == "dense"
    per_layer_16 = s * b * h * 34 + (5 * a * s * s * b if dense else 0)
    if cfg.parallel.sequence_parallel:
        per_layer_16 //= tp
    else:
            per_layer_16 = s * b * h * 10 + (s * b * h * 24 + (5 * a * s * s * b if dense else 0)) // tp
    per_layer = per_layer_16 * bytes_per // 2
    if dense:
        per_layer += b * (a // tp) * s * s * bytes_per
    num_micro = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    return per_layer * (mc.num_layers // pp) * min(pp, num_micro)


def logits_bytes(cfg, tp: int, bytes_per: int) -> int:
    """The last stage's loss buffers of one micro batch [s, b, V/tp]: student and teacher logits and the student
    logits' gradient in the train precision, their fp32 log-softmax (two) and the per-element KL term (fp32)."""
    t = cfg.train
    n = t.seq_length * t.micro_batch_size * cfg.model.padded_vocab_size(tp) // tp
    return n * (3 * bytes_per + 3 * 4)


def precision_on(cfg, device: str = "cuda") -> str:
    """The parameters' precision the trainer resolves ``train.precision`` to on ``device`` ("cuda" or "cpu")."""
    return resolved_precision(cfg.train.precision, cuda=device == "cuda")


def estimate(cfg, dp: int, device: str = "cuda") -> MemoryEstimate:
    """The trainer's dtypes on ``device`` ("cuda", the GPU cluster; "cpu", a CPU rehearsal, where
    ``train.precision=auto`` is fp32 and ``dms.backend=auto`` the dense kernel): parameters (student and teacher) in
    the train precision; fp32 gradient buffers; Adam moments and, with bf16 parameters, fp32 main parameters in the
    optimizer, sharded over dp with ``train.distributed_optimizer``."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    pbytes = 2 if precision_on(cfg, device) == "bf16" else 4
    student = stage_params(cfg.model, cfg.dms, tp, pp)
    trainable = student if cfg.train.mode == "full" else (
        cfg.model.num_layers // pp * (cfg.model.hidden_size + cfg.model.hidden_size * cfg.model.num_query_groups // tp))
    teacher = stage_params(cfg.model, None, tp, pp)
    optim = (8 + (4 if pbytes == 2 else 0)) * trainable // (dp if cfg.train.distributed_optimizer else 1)
    return MemoryEstimate(student_params=pbytes * student, grads=4 * trainable, optimizer=optim,
                          teacher_params=pbytes * teacher,
                          activations=activation_bytes(cfg, tp, pp, dp, pbytes, device),
                          logits=logits_bytes(cfg, tp, pbytes), checkpoint=pbytes * student + optim)


def rank_groups(tp: int, pp: int, dp: int) -> dict:
    """Global ranks of every tp / pp / dp group, in megatron-core's default order (tp fastest, then dp, then pp)."""
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    return {k: gen.get_ranks(k) for k in ("tp", "pp", "dp")}


def _size(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB // 4 else f"{n / 1024 ** 2:8.2f} MiB"


def _fmt_groups(groups, limit: int = 4) -> str:
    shown = ", ".join(str(g) for g in groups[:limit])
    return shown + (f", ... ({len(groups)} groups)" if len(groups) > limit else "")


def describe(cfg, gpu_memory_gib: float = 80.0) -> tuple:
    """(the dry-run text, whether it fits) for a validated RefitConfig (ValueError for a layout that does not
    fit the model)."""
    p, t = cfg.parallel, cfg.train
    world = p.world_size
    dp = validate_model_layout(cfg.model, p.tp, p.pp, world)
    g = rank_groups(p.tp, p.pp, dp)
    m = estimate(cfg, dp)
    mc = cfg.model
    precision = precision_on(cfg)
    main_params = " + fp32 main params" if precision == "bf16" else ""
    lines = [
        f"layout: world {world} = {p.nnodes} node(s) x {p.ranks_per_node} GPUs; tp={p.tp} pp={p.pp} "
        f"dp={dp}; sequence_parallel={p.sequence_parallel}",
        f"model: {mc.family} {mc.num_layers} layers (pp stage: {mc.num_layers // p.pp}), {mc.num_attention_heads} "
        f"heads / {mc.num_query_groups} KV heads (per tp rank: {mc.num_attention_heads // p.tp} / "
        f"{mc.num_query_groups // p.tp}), ffn {mc.ffn_hidden_size} (per tp rank {mc.ffn_hidden_size // p.tp}), "
        f"padded vocab {mc.padded_vocab_size(p.tp)} (per tp rank {mc.padded_vocab_size(p.tp) // p.tp})",
        f"tp groups: {_fmt_groups(g['tp'])}",
        f"pp groups: {_fmt_groups(g['pp'])}",
        f"dp groups: {_fmt_groups(g['dp'])}",
        f"rank 0 holds tp rank 0 / pp stage 0 / dp replica 0; global rank r -> tp r % {p.tp}, "
        f"dp (r // {p.tp}) % {dp}, pp r // {p.tp * dp}",
        f"batch: micro {t.micro_batch_size} x {t.global_batch_size // (t.micro_batch_size * dp)} micro batches x dp "
        f"{dp} = global {t.global_batch_size} sequences of {t.seq_length} -> {t.global_batch_size * t.seq_length:,} "
        f"tokens per step ({t.global_batch_size * t.seq_length * t.steps:,} in {t.steps} steps)",
        f"memory per GPU, busiest pipeline stage ({precision} parameters, fp32 grads, Adam{main_params}"
        f"{', distributed optimizer' if t.distributed_optimizer else ''}; estimate):",
        f"  student params {_size(m.student_params)}",
        f"  grads          {_size(m.grads)}",
        f"  optimizer      {_size(m.optimizer)}  (Adam moments{main_params})",
        f"  teacher copy   {_size(m.teacher_params)}",
        f"  activations    {_size(m.activations)}  (incl. K/V; seq {t.seq_length}, micro batch "
        f"{t.micro_batch_size}, dms.backend={cfg.dms.backend}, no recompute)",
        f"  logits / KL    {_size(m.logits)}  (last stage: student + teacher logits [s, b, V/tp], their fp32 "
        f"log-softmax, KL term, logits grad)",
        f"  total          {_size(m.total)}",
        f"evaluation stage (every train.eval_interval steps and the end-of-run report): at this layout (tp={p.tp} "
        f"pp={p.pp} dp={dp}), forward-only through the same schedule, student and teacher; no training activations, "
        f"the same logits buffers less their gradient: peak below {_size(m.eval_peak).strip()}",
        f"  checkpoint save writes {_size(m.checkpoint).strip()} per GPU (student weights + optimizer state)"
        + (", staged in host memory and written in the background (train.async_save)" if t.async_save else
           ", synchronously: every rank waits for the slowest write (train.async_save=true writes in the "
           "background)"),
    ]
    fits = m.total <= gpu_memory_gib * GIB  # the train step is the peak phase (eval_peak <= total)
    lines.append(f"fits a {gpu_memory_gib:g} GiB GPU" if fits else
                 f"DOES NOT FIT a {gpu_memory_gib:g} GiB GPU ({m.total / GIB:,.1f} GiB): lower "
                 f"train.micro_batch_size or train.seq_length, raise parallel.tp / parallel.pp"
                 f"{'' if t.distributed_optimizer else ', or set train.distributed_optimizer=true'}")
    return "\n".join(lines), fits


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    gib = 80.0
    if "--gpu-memory-gib" in args:
        i = args.index("--gpu-memory-gib")
        try:
            gib = float(args[i + 1])
        except (IndexError, ValueError):
            fail("--gpu-memory-gib needs a number (GiB per GPU)")
        del args[i:i + 2]
    register_schema("refit_schema", RefitConfig)
    cfg = preflight("refit", args, RefitConfig, refit_config)
    try:
        text, fits = describe(cfg, gib)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
