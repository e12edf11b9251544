"""Triton kernels of the routed SwiGLU FFN: a row-grouped GEMM with fused gather / scatter / SwiGLU, and a
deterministic per-expert weight-gradient GEMM.

Legend: T tokens, D model width, F FFN width, E experts. "Sorted" rows are tokens in expert order
(``Routing.perm_T``); expert ``e`` owns sorted rows ``offsets[e]:offsets[e+1]``.

Tile schedule (both kernels read it from the device offsets, so nothing is synchronised with the host):
the M axis of :func:`routed_gemm_kernel` is a list of row tiles in *tile space*: expert ``e`` gets
``cdiv(count_e, BLOCK_M)`` tiles, so no tile straddles two experts and nothing is padded in memory. The grid is
launched for the upper bound ``cdiv(T, BLOCK_M) + E - 1`` tiles; programs past the real number of tiles return
at once, so an expert with no tokens has no tiles. Each expert's weights are separate tensors, reached through
a base pointer plus a table of int64 element offsets (``w_e.data_ptr() - w_0.data_ptr()``) indexed by the tile's
expert.

Gather and scatter are fused into the loads and stores: ``A`` rows are read through ``perm`` (``GATHER_A``) and
``C`` rows written to ``perm[row]`` (``SCATTER_C``), which is a permutation, so every output row is written
exactly once and no atomics are needed. Row offsets are int64 (``T x F`` may pass 2**31 elements).

Epilogues (``MODE``):
- ``MODE_PLAIN``: ``C = A @ B``.
- ``MODE_GATE_UP``: ``acc1 = A @ B``, ``acc3 = A @ B2`` from one ``A`` load; stores ``h = silu(acc1) * acc3``
  and, with ``SAVE_PRE``, the pre-activations ``acc1``, ``acc3`` for the backward.
- ``MODE_DSWIGLU``: ``dh = A @ B``; loads the saved pre-activations ``g = a1``, ``u = a3`` and stores
  ``dg = dh * u * s * (1 + g (1 - s))`` with ``s = sigmoid(g)`` and ``du = dh * g * s``.
- ``MODE_DUAL``: ``C = A @ B + A2 @ B2`` (the input gradient through both up projections).

:func:`routed_wgrad_kernel` computes ``dW_e[m, n] = sum over rows r of expert e of P[r, m] Q[r, n]`` for the
experts listed in ``experts`` only (frozen experts launch nothing). One program owns one output tile and loops
over all the expert's rows, so the result is deterministic; an expert with no rows stores exact zeros.

All arithmetic is fp32 (accumulators, SwiGLU and its derivative). The pre-activations ``g``, ``u`` are rounded to
the input dtype and ``h`` is computed from the rounded values (forward and backward alike, so the recomputed ``h``
equals the forward's); every other result is rounded once, when stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_PLAIN = 0
MODE_GATE_UP = 1
MODE_DSWIGLU = 2
MODE_DUAL = 3

WGRAD_DOWN = 0  # dW2: P = dy (gathered), Q = h recomputed from the saved pre-activations
WGRAD_GATE_UP = 1  # dW1, dW3: P = dg, P2 = du (sorted), Q = x (gathered)

# The same numbers as constexpr globals, the only kind of global a jitted function may read.
_MODE_PLAIN = tl.constexpr(MODE_PLAIN)
_MODE_GATE_UP = tl.constexpr(MODE_GATE_UP)
_MODE_DSWIGLU = tl.constexpr(MODE_DSWIGLU)
_MODE_DUAL = tl.constexpr(MODE_DUAL)
_WGRAD_DOWN = tl.constexpr(WGRAD_DOWN)
_WGRAD_GATE_UP = tl.constexpr(WGRAD_GATE_UP)


@triton.jit
def _tile_of(pid_m, offsets_ptr, E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert, first sorted row and end row of row tile ``pid_m`` in tile space; expert -1 past the last tile."""
    tile_base = tl.load(offsets_ptr) * 0
    expert = tile_base - 1
    row0 = tile_base
    row_end = tile_base
    for e in tl.static_range(E):
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        n_tiles = (end - start + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= tile_base) & (pid_m < tile_base + n_tiles)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, start + (pid_m - tile_base) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        tile_base += n_tiles
    return expert, row0, row_end


@triton.jit
def _expert_ptr(base_ptr, offsets_tab, expert, ALIGN: tl.constexpr):
    """``expert``'s tensor: ``base_ptr`` plus the expert's element offset from an int64 table.

    The base is a real kernel argument, so the compiler knows its alignment; ``ALIGN`` (a power of two that
    divides every offset, checked on the host) carries that knowledge over to the offset, which keeps the loads
    vectorised and pipelined.
    """
    return base_ptr + tl.multiple_of(tl.load(offsets_tab + expert), ALIGN)


@triton.jit
def routed_gemm_kernel(
    a_ptr, a2_ptr, rows_ptr,
    b_ptr, b_tab, b2_ptr, b2_tab,
    c_ptr, c2_ptr, c3_ptr,
    aux1_ptr, aux2_ptr,
    offsets_ptr,
    N, K, M_BUCKET,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    E: tl.constexpr,
    B_ALIGN: tl.constexpr,
    MODE: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``C[rows of expert e] = A[rows] @ B_e`` (see the module docstring).

    ``A``/``A2``: ``(rows, K)`` with strides ``stride_am, stride_ak`` (rows through ``rows_ptr`` if ``GATHER_A``).
    ``B_e``/``B2_e``: ``(K, N)`` with strides ``stride_bk, stride_bn`` at ``b_ptr + b_tab[e]`` / ``b2_ptr + b2_tab[e]``.
    ``C``, ``C2``, ``C3``, ``aux1``, ``aux2``: ``(rows, N)`` with strides ``stride_cm, stride_cn``; ``C`` rows through
    ``rows_ptr`` if ``SCATTER_C``, the others always in sorted order.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles share each weight column panel while it is in L2.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % size_m
    pid_n = (pid % group_size) // size_m

    expert, row0, row_end = _tile_of(pid_m, offsets_ptr, E, BLOCK_M)
    if expert < 0:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if GATHER_A or SCATTER_C:
        tokens = tl.load(rows_ptr + rows, mask=row_ok, other=0)
    if GATHER_A:
        a_rows = tokens
    else:
        a_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    b_base = _expert_ptr(b_ptr, b_tab, expert, B_ALIGN)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if MODE == _MODE_GATE_UP or MODE == _MODE_DUAL:
        b2_base = _expert_ptr(b2_ptr, b2_tab, expert, B_ALIGN)
        b2_ptrs = b2_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if MODE == _MODE_DUAL:
        a2_ptrs = a2_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == _MODE_GATE_UP:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if MODE == _MODE_GATE_UP:
            b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
            b2_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MODE == _MODE_DUAL:
        # The second product in a loop of its own: two dots chained on one accumulator inside one loop
        # serialise on Hopper (each waits for the other's wgmma), one dot per loop pipelines.
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a2 = tl.load(a2_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=DOT_PRECISION)
            a2_ptrs += BLOCK_K * stride_ak
            b2_ptrs += BLOCK_K * stride_bk

    out_ok = row_ok[:, None] & col_ok[None, :]
    sorted_offs = rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if SCATTER_C:
        c_offs = tokens[:, None] * stride_cm + offs_n[None, :] * stride_cn
    else:
        c_offs = sorted_offs
    out_ty = c_ptr.dtype.element_ty
    if MODE == _MODE_GATE_UP:
        # Round the pre-activations once to the output dtype and use the rounded values, as the backward
        # will: the forward output is then the same with and without SAVE_PRE.
        acc = acc.to(out_ty).to(tl.float32)
        acc2 = acc2.to(out_ty).to(tl.float32)
        if SAVE_PRE:
            tl.store(c2_ptr + sorted_offs, acc.to(out_ty), mask=out_ok)
            tl.store(c3_ptr + sorted_offs, acc2.to(out_ty), mask=out_ok)
        h = acc * tl.sigmoid(acc) * acc2
        tl.store(c_ptr + c_offs, h.to(out_ty), mask=out_ok)
    elif MODE == _MODE_DSWIGLU:
        g = tl.load(aux1_ptr + sorted_offs, mask=out_ok, other=0.0).to(tl.float32)
        u = tl.load(aux2_ptr + sorted_offs, mask=out_ok, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = acc * u * s * (1.0 + g * (1.0 - s))
        du = acc * g * s
        tl.store(c_ptr + c_offs, dg.to(out_ty), mask=out_ok)
        tl.store(c2_ptr + sorted_offs, du.to(out_ty), mask=out_ok)
    else:
        tl.store(c_ptr + c_offs, acc.to(out_ty), mask=out_ok)


@triton.jit
def routed_wgrad_kernel(
    p_ptr, p2_ptr, q_ptr, q2_ptr, rows_ptr,
    out_ptr, out_tab, out2_ptr, out2_tab,
    experts_ptr, offsets_ptr,
    M, N, M_BUCKET,
    stride_pr, stride_pm,
    stride_qr, stride_qn,
    stride_om, stride_on,
    OUT_ALIGN: tl.constexpr,
    MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``dW_e = P[rows of e]^T @ Q[rows of e]`` for expert ``experts[axis 1]``.

    ``WGRAD_DOWN``: ``P`` = dy ``(T, M = D)`` read through ``rows_ptr`` (original order), ``Q`` = ``silu(g) * u``
    from the saved pre-activations ``q_ptr = g``, ``q2_ptr = u`` ``(T, N = F)`` in sorted order.
    ``WGRAD_GATE_UP``: ``P`` = dg, ``P2`` = du ``(T, M = F)`` sorted, ``Q`` = x ``(T, N = D)`` through ``rows_ptr``;
    two outputs (``dW1``, ``dW3``) from one ``Q`` load. Reduction over rows in steps of ``BLOCK_K``.
    """
    pid_tile = tl.program_id(0)
    expert = tl.load(experts_ptr + tl.program_id(1))
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_tile // num_pid_n
    pid_n = pid_tile % num_pid_n
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Column offsets times a non-unit stride (a column-major x or dy) can pass 2**31: 64-bit.
    col_p = offs_m.to(tl.int64) * stride_pm
    col_q = offs_n.to(tl.int64) * stride_qn
    offs_r = tl.arange(0, BLOCK_K)
    in_ty = p_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == _WGRAD_GATE_UP:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + offs_r
        r_ok = rows < end
        tokens = tl.load(rows_ptr + rows, mask=r_ok, other=0)
        if MODE == _WGRAD_DOWN:
            p_rows = tokens
            q_rows = rows
        else:
            p_rows = rows
            q_rows = tokens
        # P^T tile (BLOCK_M, BLOCK_K) and Q tile (BLOCK_K, BLOCK_N).
        pt = tl.load(
            p_ptr + p_rows[None, :] * stride_pr + col_p[:, None],
            mask=m_ok[:, None] & r_ok[None, :], other=0.0,
        )
        q_offs = q_rows[:, None] * stride_qr + col_q[None, :]
        q_mask = r_ok[:, None] & n_ok[None, :]
        if MODE == _WGRAD_DOWN:
            g = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(tl.float32)
            u = tl.load(q2_ptr + q_offs, mask=q_mask, other=0.0).to(tl.float32)
            q = (g * tl.sigmoid(g) * u).to(in_ty)  # h exactly as the forward rounded it
        else:
            q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
        acc = tl.dot(pt, q, acc, input_precision=DOT_PRECISION)
        if MODE == _WGRAD_GATE_UP:
            pt2 = tl.load(
                p2_ptr + p_rows[None, :] * stride_pr + col_p[:, None],
                mask=m_ok[:, None] & r_ok[None, :], other=0.0,
            )
            acc2 = tl.dot(pt2, q, acc2, input_precision=DOT_PRECISION)

    out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_ok = m_ok[:, None] & n_ok[None, :]
    out_base = _expert_ptr(out_ptr, out_tab, expert, OUT_ALIGN)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_base + out_offs, acc.to(out_ty), mask=out_ok)
    if MODE == _WGRAD_GATE_UP:
        out2_base = _expert_ptr(out2_ptr, out2_tab, expert, OUT_ALIGN)
        tl.store(out2_base + out_offs, acc2.to(out_ty), mask=out_ok)
