"""Triton kernels of flash-style DMS attention (imported lazily by ``triton_dms``; needs triton at import).

Math (see ``attention.dense_dms_attention``): query at position q sees key k iff k <= q; scores of pairs with
q - k > window get the per-key bias ``kbias[k]`` (soft: logsigmoid(-z_k); hard: 0 / -inf). The bias is an O(L)
vector per (batch, KV head), loaded per key tile. Scores are kept in log2 units (x log2(e)) so the softmax uses
exp2; the saved LSE is in log2 units too.

Every key tile a query tile meets falls in one of three modes (decided per tile from positions, host-free):
  PLAIN: every pair is causal, in the window band and on real keys: no mask, no bias;
  FAR:   every pair is beyond the window (hence causal, real keys): bias on every key, no mask;
  MIXED: anything else (the diagonal, the band edge, ragged edges): masks and the bias where q - k > window.
Tiles wholly beyond the causal diagonal are never visited. The segment bounds are multiples of the tile size.

Layouts: Q/O/dO [b, np, sq, hn], K/V [b, ng, sk, hn] (any strides, last dim contiguous), KB/dKB [b, ng, sk]
fp32 contiguous, LSE/Delta [b, np, sq] fp32 contiguous. GQA: query head h reads KV head h // group.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
PLAIN = tl.constexpr(0)
FAR = tl.constexpr(1)
MIXED = tl.constexpr(2)


@triton.jit
def _floor_to(x, B: tl.constexpr):
    return (tl.maximum(x, 0) // B) * B


@triton.jit
def _ceil_to(x, B: tl.constexpr):
    return ((tl.maximum(x, 0) + B - 1) // B) * B


@triton.jit
def _load_rows(ptr, rows, stride, ok, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """[len(rows), HEAD_DIM] tile of a row-major head; masked rows read 0 (unmasked loads in PLAIN/FAR tiles)."""
    ptrs = ptr + rows[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _key_segments(q_lo, sq, sk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile bounds for the query tile whose first query sits at position q_lo: FAR [0, far_end),
    MIXED [far_end, plain_lo), PLAIN [plain_lo, plain_hi), MIXED [plain_hi, end)."""
    q_hi = q_lo + BLOCK_M - 1                                          # last position (padded rows included)
    end = _ceil_to(tl.minimum(q_hi + 1, sk), BLOCK_N)                  # past the last causal key tile
    far_end = _floor_to(q_lo - window, BLOCK_N)                        # tiles with k_last < q_lo - window
    plain_lo = tl.maximum(far_end, _ceil_to(q_hi - window, BLOCK_N))   # q_hi - k_first <= window
    plain_hi = _floor_to(tl.minimum(q_lo + 1, sk), BLOCK_N)            # k_last <= q_lo, k_last < sk
    if plain_hi <= plain_lo:                                           # no PLAIN tile: one MIXED run
        plain_lo = end
        plain_hi = end
    return far_end, plain_lo, plain_hi, end


@triton.jit
def _query_segments(k_lo, sq, sk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-tile bounds (row indices) for the key tile starting at position k_lo: MIXED [first, a),
    PLAIN [a, b), MIXED [b, c), FAR [c, end)."""
    offset = sk - sq
    k_hi = k_lo + BLOCK_N - 1
    first = _floor_to(k_lo - offset, BLOCK_M)                          # first tile seeing any key of ours
    end = _ceil_to(sq, BLOCK_M)
    a = tl.minimum(tl.maximum(_ceil_to(k_hi - offset, BLOCK_M), first), end)       # q_first >= k_hi
    b = tl.minimum(tl.maximum(_floor_to(window + k_lo + 1 - offset, BLOCK_M), a), end)  # q_last - k_lo <= w
    c = tl.minimum(tl.maximum(_ceil_to(window + k_hi + 1 - offset, BLOCK_M), b), end)  # q_first - k_hi > w
    return first, a, b, c, end


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, q_pos, K, V, KB, stride_kn, stride_vn, lo, hi, sk, window, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online-softmax update of one query tile over key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)                                    # [BN] key positions
        k_ok = offs_n < sk
        k = _load_rows(K, offs_n, stride_kn, k_ok, HEAD_DIM, MODE == MIXED)                 # [BN, D]
        v = _load_rows(V, offs_n, stride_vn, k_ok, HEAD_DIM, MODE == MIXED)                 # [BN, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale             # [BM, BN], log2 units
        if MODE == FAR:
            s += tl.load(KB + offs_n)[None, :] * LOG2E
        if MODE == MIXED:
            dist = q_pos[:, None] - offs_n[None, :]                                 # [BM, BN] q - k
            if HAS_BIAS:
                kb = tl.load(KB + offs_n, mask=k_ok, other=0.0) * LOG2E
                s += tl.where(dist > window, kb[None, :], 0.0)
            s = tl.where((dist >= 0) & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                                       # [BM]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                       # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])                                       # [BM, BN]
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def dms_fwd(Q, K, V, KB, O, LSE,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_om, stride_zb, stride_zh,
            n_heads, group, sq, sk, window, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """Grid (cdiv(sq, BLOCK_M), b * np): one query tile of one head. Writes O and LSE (log2 units)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                # [BM] query rows
    offs_d = tl.arange(0, HEAD_DIM)
    q_ok = offs_m < sq
    q_pos = sk - sq + offs_m                                                        # [BM] positions
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)                                      # [BM, D]
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    KB += b * stride_zb + kvh * stride_zh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    far_end, plain_lo, plain_hi, end = _key_segments(sk - sq + pid_m * BLOCK_M, sq, sk, window, BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, K, V, KB, stride_kn, stride_vn, 0, far_end, sk,
                                   window, qk_scale, HEAD_DIM, BLOCK_N, FAR, HAS_BIAS, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, K, V, KB, stride_kn, stride_vn, far_end, plain_lo, sk,
                               window, qk_scale, HEAD_DIM, BLOCK_N, MIXED, HAS_BIAS, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, K, V, KB, stride_kn, stride_vn, plain_lo, plain_hi, sk,
                               window, qk_scale, HEAD_DIM, BLOCK_N, PLAIN, HAS_BIAS, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, K, V, KB, stride_kn, stride_vn, plain_hi, end, sk,
                               window, qk_scale, HEAD_DIM, BLOCK_N, MIXED, HAS_BIAS, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)                                         # padded rows only
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + bh * sq + offs_m, m_i + tl.math.log2(l_safe), mask=q_ok)


@triton.jit
def dms_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm, n_heads, sq,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(sq, BLOCK_M), b * np): Delta = rowsum(dO * O) in fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m[:, None] < sq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=ok,
                 other=0.0)
    tl.store(DELTA + bh * sq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < sq)


@triton.jit
def _dkdv_tiles(dk, dv, dkb, k, v, kb, k_pos, Q, DO, LSE, DELTA, stride_qm, stride_dm, lo, hi, sq, sk, window,
                qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MODE: tl.constexpr,
                HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV (and the per-key bias gradient) of one key tile over query tiles [lo, hi) of one head.
    Works transposed (keys on rows): sT, pT, dsT are [BN, BM]."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)                                    # [BM] query rows
        q_ok = offs_m < sq                                                          # the last tile may be ragged
        q = _load_rows(Q, offs_m, stride_qm, q_ok, HEAD_DIM, True)                  # [BM, D]
        do = _load_rows(DO, offs_m, stride_dm, q_ok, HEAD_DIM, True)                # [BM, D]
        lse = tl.load(LSE + offs_m, mask=q_ok, other=0.0)                           # [BM], log2 units
        delta = tl.load(DELTA + offs_m, mask=q_ok, other=0.0)                       # [BM]
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale            # [BN, BM]
        if MODE == FAR:
            sT += kb[:, None]
        if MODE == MIXED:
            dist = (sk - sq + offs_m)[None, :] - k_pos[:, None]                     # [BN, BM] q - k
            if HAS_BIAS:
                sT += tl.where(dist > window, kb[:, None], 0.0)
        pT = tl.math.exp2(sT - lse[None, :])                                        # [BN, BM]
        if MODE == MIXED:
            pT = tl.where((dist >= 0) & q_ok[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                     # [BN, BM]
        dsT = pT * (dpT - delta[None, :])                                           # d(score), natural units
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        if BIAS_GRAD:
            if MODE == FAR:
                dkb += tl.sum(dsT, 1)
            if MODE == MIXED:
                dkb += tl.sum(tl.where(dist > window, dsT, 0.0), 1)
    return dk, dv, dkb


@triton.jit
def dms_bwd_dkdv(Q, K, V, KB, DO, LSE, DELTA, DK, DV, DKB,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_db, stride_dh, stride_dm, stride_zb, stride_zh,
                 n_heads, group, sq, sk, window, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BIAS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (cdiv(sk, BLOCK_N), b * ng): one key tile of one KV head, summed over the group's query heads.
    DK, DV are contiguous like K; DKB [b, ng, sk] fp32."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    n_kv = n_heads // group
    b = bkv // n_kv
    kvh = bkv % n_kv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                # [BN] key positions
    k_ok = offs_n < sk
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, offs_n, stride_kn, k_ok, HEAD_DIM, True)   # [BN, D]
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, offs_n, stride_vn, k_ok, HEAD_DIM, True)   # [BN, D]
    kb = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        kb = tl.load(KB + b * stride_zb + kvh * stride_zh + offs_n, mask=k_ok, other=0.0) * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N], dtype=tl.float32)
    first, a, c_b, c, end = _query_segments(pid_n * BLOCK_N, sq, sk, window, BLOCK_M, BLOCK_N)
    for h in range(kvh * group, kvh * group + group):
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_db + h * stride_dh
        LSEh = LSE + (b * n_heads + h) * sq
        DELTAh = DELTA + (b * n_heads + h) * sq
        dk, dv, dkb = _dkdv_tiles(dk, dv, dkb, k, v, kb, offs_n, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dm,
                                  first, a, sq, sk, window, qk_scale, HEAD_DIM, BLOCK_M, MIXED, HAS_BIAS,
                                  BIAS_GRAD, DOT_PREC)
        dk, dv, dkb = _dkdv_tiles(dk, dv, dkb, k, v, kb, offs_n, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dm,
                                  a, c_b, sq, sk, window, qk_scale, HEAD_DIM, BLOCK_M, PLAIN, HAS_BIAS,
                                  BIAS_GRAD, DOT_PREC)
        dk, dv, dkb = _dkdv_tiles(dk, dv, dkb, k, v, kb, offs_n, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dm,
                                  c_b, c, sq, sk, window, qk_scale, HEAD_DIM, BLOCK_M, MIXED, HAS_BIAS,
                                  BIAS_GRAD, DOT_PREC)
        if HAS_BIAS:
            dk, dv, dkb = _dkdv_tiles(dk, dv, dkb, k, v, kb, offs_n, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dm,
                                      c, end, sq, sk, window, qk_scale, HEAD_DIM, BLOCK_M, FAR, HAS_BIAS,
                                      BIAS_GRAD, DOT_PREC)
    kv_rows = (bkv * sk + offs_n)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(DK + kv_rows, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(DV + kv_rows, dv.to(DV.dtype.element_ty), mask=k_ok[:, None])
    if BIAS_GRAD:
        tl.store(DKB + bkv * sk + offs_n, dkb, mask=k_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, q_pos, K, V, KB, stride_kn, stride_vn, lo, hi, sk, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi) (unscaled: the caller multiplies by sm_scale)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)                                    # [BN] key positions
        k_ok = offs_n < sk
        k = _load_rows(K, offs_n, stride_kn, k_ok, HEAD_DIM, MODE == MIXED)         # [BN, D]
        v = _load_rows(V, offs_n, stride_vn, k_ok, HEAD_DIM, MODE == MIXED)         # [BN, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale             # [BM, BN]
        if MODE == FAR:
            s += tl.load(KB + offs_n)[None, :] * LOG2E
        if MODE == MIXED:
            dist = q_pos[:, None] - offs_n[None, :]
            if HAS_BIAS:
                kb = tl.load(KB + offs_n, mask=k_ok, other=0.0) * LOG2E
                s += tl.where(dist > window, kb[None, :], 0.0)
        p = tl.math.exp2(s - lse[:, None])                                          # [BM, BN]
        if MODE == MIXED:
            p = tl.where((dist >= 0) & k_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)                      # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def dms_bwd_dq(Q, K, V, KB, DO, LSE, DELTA, DQ,
               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
               stride_db, stride_dh, stride_dm, stride_zb, stride_zh,
               n_heads, group, sq, sk, window, sm_scale, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Grid (cdiv(sq, BLOCK_M), b * np): dQ of one query tile of one head. DQ is contiguous like Q."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                # [BM] query rows
    q_ok = offs_m < sq
    q_pos = sk - sq + offs_m
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, q_ok, HEAD_DIM, True)    # [BM, D]
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, stride_dm, q_ok, HEAD_DIM, True)  # [BM, D]
    lse = tl.load(LSE + bh * sq + offs_m, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + bh * sq + offs_m, mask=q_ok, other=0.0)
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    KB += b * stride_zb + kvh * stride_zh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    far_end, plain_lo, plain_hi, end = _key_segments(sk - sq + pid_m * BLOCK_M, sq, sk, window, BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        dq = _dq_tiles(dq, q, do, lse, delta, q_pos, K, V, KB, stride_kn, stride_vn, 0, far_end, sk, window,
                       qk_scale, HEAD_DIM, BLOCK_N, FAR, HAS_BIAS, DOT_PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, K, V, KB, stride_kn, stride_vn, far_end, plain_lo, sk, window,
                   qk_scale, HEAD_DIM, BLOCK_N, MIXED, HAS_BIAS, DOT_PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, K, V, KB, stride_kn, stride_vn, plain_lo, plain_hi, sk, window,
                   qk_scale, HEAD_DIM, BLOCK_N, PLAIN, HAS_BIAS, DOT_PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, K, V, KB, stride_kn, stride_vn, plain_hi, end, sk, window,
                   qk_scale, HEAD_DIM, BLOCK_N, MIXED, HAS_BIAS, DOT_PREC)
    q_rows = (bh * sq + offs_m)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(DQ + q_rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])
