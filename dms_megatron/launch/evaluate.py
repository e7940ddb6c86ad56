"""``dms-eval``: the Hydra launcher of the evaluation harness (configs/eval.yaml; run dir ``hydra.run.dir=DIR``).

With no arguments it evaluates the embedded default: the shipped tiny teacher, its students re-fitted to CR 2, 4
and 8 (re-fitted once, then reused from the cache dir) and the baselines at DMS-matched budgets, writing
``eval.json`` and ``pareto_*.png`` into the run dir, with a progress line per method and CR.
"""

from __future__ import annotations

from dms_megatron.eval.config import EvalConfig
from dms_megatron.eval.run import run_eval
from dms_megatron.launch.eval_job import eval_main

PROG = "dms-eval"


def main() -> None:
    eval_main(PROG, "eval", EvalConfig, run_eval)


if __name__ == "__main__":
    main()
