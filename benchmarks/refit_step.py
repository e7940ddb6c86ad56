"""Re-fit step time vs a plain fine-tune step of the same model, measured in one run (read the ratio).

  python benchmarks/refit_step.py [--quick]

plain  : stock megatron GPT, next-token cross-entropy, forward + backward + Adam step.
refit  : frozen teacher forward (no grad) + DMS student forward (Gumbel-sigmoid soft bias, dense backend) +
         KL(student || teacher) + compression loss, backward, Adam step.
Steps alternate (plain, refit, plain, ...) and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dms_megatron.config import DMSConfig, ModelConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args(argv)

    from dms_megatron.core.losses import compression_loss, kd_loss
    from dms_megatron.megatron.distributed import init_process_groups
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.megatron.runtime import DMSRuntime, attach_runtime
    from dms_megatron.training.evaluation import lm_loss

    init_process_groups()
    seq = 128 if args.quick else 256
    mc = ModelConfig(num_layers=4, hidden_size=192, ffn_hidden_size=512, num_attention_heads=6, num_query_groups=2,
                     vocab_size=1024, max_position_embeddings=seq)
    b = 8
    torch.manual_seed(0)
    plain = build_gpt_model(mc, None, seq_length=seq)
    teacher = build_gpt_model(mc, None, seq_length=seq)
    teacher.load_state_dict(plain.state_dict())
    teacher.eval().requires_grad_(False)
    student = build_gpt_model(mc, DMSConfig(window=16), seq_length=seq)
    student.load_state_dict(plain.state_dict())
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-4)
    opt_s = torch.optim.Adam(student.parameters(), lr=1e-4)
    ids = torch.randint(0, mc.vocab_size, (b, seq))
    pos = torch.arange(seq)[None].expand(b, -1)
    mask = torch.ones(b, seq)

    def plain_step():
        t0 = time.perf_counter()
        loss = lm_loss(plain(ids, pos, None)[..., :mc.vocab_size], ids, mask)
        opt_p.zero_grad()
        loss.backward()
        opt_p.step()
        return time.perf_counter() - t0

    def refit_step(step):
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(ids, pos, None)[..., :mc.vocab_size]
        rt = DMSRuntime(mode="train", step=step, record_flags=False)
        attach_runtime(student, rt)
        s_logits = student(ids, pos, None)[..., :mc.vocab_size]
        loss = kd_loss(s_logits, t_logits, mask) + compression_loss(rt.mean_fraction(), 0.75)
        opt_s.zero_grad()
        loss.backward()
        opt_s.step()
        return time.perf_counter() - t0

    plain_step(), refit_step(0)  # warm-up
    reps = 2 if args.quick else args.reps
    tp, tr = [], []
    for i in range(reps):
        tp.append(plain_step())
        tr.append(refit_step(i + 1))
    mp, mr = statistics.median(tp), statistics.median(tr)
    print(f"model: {mc.num_layers} layers, hidden {mc.hidden_size}, batch {b} x {seq} tokens, "
          f"threads {torch.get_num_threads()}")
    print(f"plain fine-tune step {mp * 1e3:.0f} ms | DMS re-fit step {mr * 1e3:.0f} ms | ratio {mr / mp:.2f}")


if __name__ == "__main__":
    main()
