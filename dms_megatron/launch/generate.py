"""``dms-generate``: a quick look at a (DMS) model: generate from prompts and print memory / read metrics.

  dms-generate --hf out/student-hf --prompt "The capital of" --max-new-tokens 32
  dms-generate --megatron ckpt/refit --prompt-ids "1 2 3" --press h2o --cr 8 --json

The press defaults to dms for a DMS checkpoint and vanilla otherwise. Budget methods take --budget (tokens per
sequence, layer and KV head) or --cr (budget = ceil(prompt tokens / cr), the longest prompt).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

import torch

from dms_megatron.config import BAD_INPUT_EXIT_CODE, ConfigError
from transformers import AutoTokenizer

from dms_megatron.convert.workflows import ASSETS
from dms_megatron.inference.engine import Engine
from dms_megatron.inference.loading import checkpoints_dir, load_hf, load_megatron
from dms_megatron.inference.model import ModelLoadError
from dms_megatron.inference.press import PRESSES, make_press


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dms-generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face model directory (plain or DMS format)")
    src.add_argument("--megatron", help="megatron checkpoint directory (dms-convert import) or dms-refit run dir")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="prompt as space-separated token ids")
    p.add_argument("--press", choices=PRESSES, default=None)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--cr", type=float, default=None, help="compression ratio that sets the budget")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos", type=int, default=None)
    p.add_argument("--iteration", type=int, default=None, help="megatron checkpoint iteration (default latest)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _tokenizer(args):
    """A local transformers tokenizer next to the weights, or None."""
    d = Path(args.hf) if args.hf else checkpoints_dir(args.megatron) / ASSETS
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _prompts(args, tok) -> List[List[int]]:
    out = []
    for s in args.prompt_ids:
        try:
            out.append([int(x) for x in s.replace(",", " ").split()])
        except ValueError:
            raise ValueError(f"--prompt-ids {s!r} must be integers separated by spaces or commas") from None
    if args.prompt:
        if tok is None:
            src = args.hf or checkpoints_dir(args.megatron) / ASSETS
            raise ValueError(f"--prompt needs a tokenizer but {src} has none; pass --prompt-ids instead")
        out += [tok(s, add_special_tokens=False)["input_ids"] for s in args.prompt]
    if not out:
        raise ValueError("no prompt: give --prompt or --prompt-ids")
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"prompt {i} is empty; give at least one token")
    return out


def run(args) -> dict:
    press_name = args.press
    want_dms = press_name == "dms"
    flag, path = ("--hf", args.hf) if args.hf else ("--megatron", args.megatron)
    if not Path(path).exists():
        raise ConfigError(f"{flag} {path} does not exist")
    try:
        model = (load_hf(args.hf, require_dms=want_dms) if args.hf
                 else load_megatron(args.megatron, iteration=args.iteration, require_dms=want_dms))
    except (ModelLoadError, FileNotFoundError) as e:
        raise ConfigError(f"{flag} {path}: {e}") from None
    if press_name is None:
        press_name = "dms" if model.decides else "vanilla"
    tok = _tokenizer(args)
    prompts = _prompts(args, tok)
    budget = args.budget
    if budget is None and args.cr is not None:
        if args.cr < 1:
            raise ValueError(f"--cr {args.cr} must be >= 1")
        budget = max(1, math.ceil(max(len(p) for p in prompts) / args.cr))
    press = make_press(press_name, budget=budget, window=model.dms.window if model.dms is not None else None)
    engine = Engine(model, press, chunk_size=args.chunk_size, max_length=args.max_length)
    outs, session = engine.generate(prompts, args.max_new_tokens, eos=args.eos, temperature=args.temperature,
                                    seed=args.seed)
    texts = [tok.decode(o) if tok is not None else None for o in outs]
    return {"press": press_name, "budget": budget, "outputs": outs, "texts": texts,
            "metrics": engine.summary(session)}


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with torch.inference_mode():
            res = run(args)
    except (ValueError, ConfigError, ModelLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    if args.json:
        print(json.dumps(res))
        return 0
    for i, (ids, text, m) in enumerate(zip(res["outputs"], res["texts"], res["metrics"])):
        print(f"[{i}] {text if text is not None else ' '.join(map(str, ids))}")
        print(f"    press={m['press']} prompt={m['prompt_tokens']} new={m['decoded_tokens']} "
              f"peak_resident={m['peak_resident']} achieved_cr={m['achieved_cr']:.2f} cr_final={m['cr_final']:.2f} "
              f"kv_reads={m['kv_reads']} "
              f"cr_reads={m['cr_reads']:.2f} prefill={m['prefill_s']:.3f}s decode={m['decode_s']:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
