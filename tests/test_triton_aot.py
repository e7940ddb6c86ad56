"""The Triton DMS kernels compiled ahead of time for Hopper (sm_90a) on this CPU machine, by Triton's own compiler
and ptxas (core/triton_aot.py): what the interpreter tests cannot see. The numbers come from ptxas and Triton's
compile metadata; the limits are the H100's (232,448 bytes of shared memory per block).

  python -m pytest tests/test_triton_aot.py       # ~1 min on 2 cores with an empty Triton cache
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="the ahead-of-time compile needs triton (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def hopper_rows():
    from dms_megatron.core import triton_aot

    return triton_aot.report(triton_aot.Shape(), "90a")


def test_every_autotune_candidate_compiles_for_hopper(hopper_rows):
    from dms_megatron.core.triton_dms import AUTOTUNE

    errors = [r for r in hopper_rows if "error" in r]
    assert not errors, errors
    for name, configs in AUTOTUNE.items():
        rows = [r for r in hopper_rows if r["kernel"] == name]
        assert [tuple(r["config"]) for r in rows] == list(configs)
        for r in rows:
            assert r["fits"] and r["shared_bytes"] <= 232448, r
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, r                         # Hopper's tensor-core path
            assert r["tile_loop_spills"] == 0, r                                    # no local memory per step
            assert r["registers"] <= 255, r
        assert any(r["spill_store_bytes"] == r["spill_load_bytes"] == 0 for r in rows), f"{name}: every candidate spills"
    delta = [r for r in hopper_rows if r["kernel"] == "dms_bwd_delta"]
    assert len(delta) == 1 and delta[0]["config"] is None and delta[0]["spill_store_bytes"] == 0


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   LDL R4, [R1+0x8] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0040*/                   LDL R5, [R1+0x10] ;
        /*0050*/              @P0  BRA 0x30 ;
        /*0060*/                   STL [R1+0x4], R3 ;
        /*0070*/                   FADD R6, R6, 1 ;
        /*0080*/              @P1  BRA 0x70 ;
        /*0090*/                   LDL.64 R8, [R1+0x18] ;
        /*00a0*/              @P2  BRA 0x10 ;
        /*00b0*/                   EXIT ;
"""


def test_tile_loop_spills_counts_local_memory_in_the_innermost_mma_loops_only():
    """Loops [0x30, 0x50] (an MMA: a tile loop), [0x70, 0x80] (no MMA) and [0x10, 0xa0] (holds the tile loop):
    only the LDL at 0x40 is in an innermost tile loop; the spills at 0x10, 0x20, 0x60 and 0x90 run outside it.
    Without the inner loop's branch, the outer loop is the innermost tile loop and holds all five."""
    from dms_megatron.core.triton_aot import tile_loop_spills

    assert tile_loop_spills(SASS) == 1
    assert tile_loop_spills(SASS.replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", "NOP")) == 0
    assert tile_loop_spills(SASS.replace("@P0  BRA 0x30", "NOP")) == 5                # the outer loop is innermost


def test_a_candidate_the_chip_cannot_hold_is_reported_and_fails_the_run(monkeypatch, capsys):
    """A forward tile of 128 x 128 with 4 pipeline stages needs ~290 KiB of shared memory: more than an H100 has."""
    from dms_megatron.core import triton_aot, triton_dms

    monkeypatch.setattr(triton_dms, "AUTOTUNE", {"dms_fwd": ((128, 128, 8, 4),)})
    assert triton_aot.main([]) == 1
    out = capsys.readouterr().out
    fwd = [line for line in out.splitlines() if line.startswith("| dms_fwd")]
    assert len(fwd) == 1 and "| NO |" in fwd[0]
    assert not [line for line in out.splitlines() if line.startswith("| dms_bwd_dkdv")]   # no candidates: none


@pytest.mark.parametrize("arch", ["75", "hopper"])
def test_unknown_arch_is_one_line_and_exit_2(capsys, arch):
    from dms_megatron.core import triton_aot

    assert triton_aot.main(["--arch", arch]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--arch {arch}" in err


def test_autotune_picks_reads_each_kernels_choice(monkeypatch):
    """benchmarks/gpu.py records the autotuner's choices: keys are (sq, sk, HEAD_DIM, DOT_PREC), values the tiles,
    warps and stages of the chosen candidate (a stand-in for the loaded kernels, as on a GPU after tuning)."""
    import types

    import triton

    from dms_megatron.core import triton_dms

    tuned = {name: types.SimpleNamespace(cache={}) for name in triton_dms.AUTOTUNE}
    tuned["dms_fwd"].cache[(4096, 4096, 128, "tf32", "torch.bfloat16")] = triton.Config(
        {"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2)
    tuned["dms_bwd_dkdv"].cache[(4096, 4096, 128, "tf32")] = triton.Config(
        {"BLOCK_N": 128, "BLOCK_M": 16}, num_warps=8, num_stages=2)
    fake = types.SimpleNamespace(**{name + "_tuned": t for name, t in tuned.items()})
    monkeypatch.setattr(triton_dms, "_KERNELS", [fake])
    assert triton_dms.autotune_picks() == {"dms_fwd": {"4096,4096,128,tf32": [64, 128, 8, 2]},
                                           "dms_bwd_dkdv": {"4096,4096,128,tf32": [128, 16, 8, 2]},
                                           "dms_bwd_dq": {}}


def test_under_the_interpreter_it_refuses_in_one_line(monkeypatch, capsys):
    from dms_megatron.core import triton_aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_aot.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TRITON_INTERPRET" in err
