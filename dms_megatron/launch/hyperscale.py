"""``dms-hyperscale``: inference-time hyper-scaling measured (configs/hyperscale.yaml; run dir
``hydra.run.dir=DIR``).

With no arguments: the embedded tiny teacher's held-out chained-recall questions, answered by W sampled chains of at
most L tokens (majority vote) for the vanilla teacher, its DMS students at CR 2, 4 and 8 (dms-eval's, reused from
the cache dir) and TOVA, H2O, StreamingLLM and Quest at the students' budgets; writes ``hyperscale.json`` and
``hyperscale_{peak_tokens,kv_reads,latency_s}.png`` (accuracy frontiers) into the run dir, a progress line per
method. Examples:
  dms-hyperscale widths=[1,4,16] lengths=[2,4,8] temperature=1.5
  dms-hyperscale eval.crs=[4,8] eval.methods=[vanilla,dms,tova] hardware.bandwidth=4.8e12
"""

from __future__ import annotations

from dms_megatron.eval.config import HyperscaleConfig
from dms_megatron.eval.hyperscale import run_hyperscale
from dms_megatron.launch.eval_job import eval_main

PROG = "dms-hyperscale"


def main() -> None:
    eval_main(PROG, "hyperscale", HyperscaleConfig, run_hyperscale)


if __name__ == "__main__":
    main()
