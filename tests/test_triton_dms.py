"""Runs the Triton-interpreter cases (tests/triton_interp_cases.py) in a fresh process with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it is imported, and other tests (torch.compile, the CUDA kernel tests) may
import triton earlier in this process, hence the subprocess (one, ~1 min on 2 busy cores).

  python -m pytest tests/test_triton_dms.py
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


#: Set by .ci/run: there the interpreter cases are the only CPU check of the default CUDA kernel, so not running
#: them (no triton, or every case skipped) fails instead of skipping.
REQUIRED = os.environ.get("DMS_REQUIRE_TRITON_INTERPRETER") == "1"


def _not_run(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"the Triton interpreter cases did not run ({reason}) but DMS_REQUIRE_TRITON_INTERPRETER=1")
    pytest.skip(reason)


def test_triton_kernel_in_interpreter():
    if importlib.util.find_spec("triton") is None:
        _not_run("the Triton kernel tests need triton (pip install triton)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/triton_interp_cases.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout + r.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if r.returncode == 0 and " passed" not in summary:
        reasons = re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", out)
        _not_run(reasons[0] if reasons else f"interpreter cases did not run: {summary}")
    assert r.returncode == 0, out[-6000:]


def test_missing_triton_names_the_install(monkeypatch):
    from dms_megatron.core import triton_dms

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.setattr(triton_dms, "_KERNELS", [])
    with pytest.raises(ImportError, match="pip install triton"):
        triton_dms._kernels()
