#!/usr/bin/env python
"""Build (or find) the embedded tiny teacher: tokenizer, data, recall questions and pretrained checkpoint.

  python tools/build_tiny_teacher.py [--cache-dir DIR]     (default: $DMS_CACHE_DIR or ~/.cache/dms-megatron)
"""

import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    from dms_megatron.data.embedded import ensure_tiny_teacher

    a = ensure_tiny_teacher(args.cache_dir)
    print(json.dumps({"root": str(a.root), **{k: a.info[k] for k in ("teacher_recall_acc", "teacher_valid_loss",
                                                                     "build_seconds")}}, indent=2))


if __name__ == "__main__":
    main()
