"""CPU tests of the routed SwiGLU FFN: routing invariants, the torch backend against the fp32 reference.

Legend: T tokens, D model width, F FFN width, E experts. Path "slices" is the torch backend with
``Routing.counts_host`` known (per-expert ``narrow``); path "grouped" drops ``counts_host`` so the backend
uses ``torch._grouped_mm`` with the device offsets (needs D, F multiples of 16 / element_size).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from kernels.moe.torch_backend import _GroupedMM

from .moe_cases import BF16_REL_TOL, CASES, FP32_TOL, leaves, make_inputs, reference, run_fwd_bwd

PATHS = ("slices", "grouped")


def _routing(ids_T: torch.Tensor, num_experts: int, path: str) -> kernels.Routing:
    routing = kernels.build_routing(ids_T, num_experts)
    return routing if path == "slices" else dataclasses.replace(routing, counts_host=None)


def _backend(ids_T, x_TD, w1, w3, w2, dy_TD, num_experts, path, frozen=()):
    routing = _routing(ids_T, num_experts, path)
    return run_fwd_bwd(lambda x, a, b, c: kernels.moe_ffn(x, routing, a, b, c), *leaves(x_TD, w1, w3, w2, frozen), dy_TD)


# --------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("num_experts", [1, 2, 3])
@pytest.mark.parametrize("T", [0, 1, 7, 100])
def test_routing_invariants(T, num_experts):
    ids_T = torch.randint(0, num_experts, (T,))
    r = kernels.build_routing(ids_T, num_experts)
    assert r.perm_T.dtype == r.inv_perm_T.dtype == r.offsets_E1.dtype == torch.int64
    assert r.perm_T.shape == r.inv_perm_T.shape == (T,) and r.offsets_E1.shape == (num_experts + 1,)
    assert r.num_tokens == T and r.num_experts == num_experts
    assert torch.equal(r.perm_T.sort().values, torch.arange(T))
    assert torch.equal(r.perm_T[r.inv_perm_T], torch.arange(T))
    assert torch.equal(r.inv_perm_T[r.perm_T], torch.arange(T))
    assert r.offsets_E1[0] == 0 and r.offsets_E1[-1] == T
    counts = [int((ids_T == e).sum()) for e in range(num_experts)]
    assert r.offsets_E1.diff().tolist() == counts
    assert r.counts_host == tuple(counts)
    for e in range(num_experts):
        rows = r.perm_T[r.offsets_E1[e] : r.offsets_E1[e + 1]]
        assert (ids_T[rows] == e).all()
        assert torch.equal(rows, (ids_T == e).nonzero().flatten())  # stable: original order inside an expert


def test_routing_bool_mask_equals_int_ids():
    mask = torch.rand(2, 9) > 0.5  # leading shape is flattened
    a = kernels.build_routing(mask)
    b = kernels.build_routing(mask.reshape(-1).to(torch.int32))
    for field in ("perm_T", "inv_perm_T", "offsets_E1"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.counts_host == b.counts_host


def test_routing_counts_host_given_and_checked():
    ids_T = torch.tensor([1, 0, 1, 1])
    assert kernels.build_routing(ids_T, counts_host=[1, 3]).counts_host == (1, 3)
    with pytest.raises(ValueError, match="counts_host"):
        kernels.build_routing(ids_T, counts_host=(2, 2))
    with pytest.raises(ValueError, match="counts_host"):
        kernels.build_routing(ids_T, counts_host=(1, 3, 0))


@pytest.mark.parametrize("ids", [[0, 2], [-1, 0]], ids=["too_large", "negative"])
def test_routing_ids_out_of_range(ids):
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        kernels.build_routing(torch.tensor(ids), num_experts=2)


def test_routing_float_ids_rejected():
    with pytest.raises(ValueError, match="integer or bool"):
        kernels.build_routing(torch.tensor([0.0, 1.0]))


def test_routing_num_experts_validated():
    with pytest.raises(ValueError, match="num_experts"):
        kernels.build_routing(torch.tensor([0]), num_experts=0)


# --------------------------------------------------------------------------------------------- moe_ffn vs reference

FP32_PARAMS = [
    pytest.param(case, path, id=f"{case}-{path}")
    for case in CASES
    for path in PATHS
    if path == "slices" or (CASES[case][1] % 4 == 0 and CASES[case][2] % 4 == 0)
]


@pytest.mark.parametrize("case,path", FP32_PARAMS)
def test_moe_ffn_matches_reference_fp32(case, path):
    T, D, F, E, kind = CASES[case]
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs(case, T, D, F, E, kind)
    y_ref, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD)
    y, g = _backend(ids_T, x_TD, w1, w3, w2, dy_TD, E, path)
    assert y.dtype == torch.float32 and y.shape == (T, D)
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    for name, ref in g_ref.items():
        assert g[name] is not None, name
        assert torch.isfinite(g[name]).all(), name
        torch.testing.assert_close(g[name], ref, **FP32_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["T7_below_tile", "random_split", "all_visual"])
def test_moe_ffn_bf16_close_to_fp32reference(case, path):
    T, D, F, E, kind = CASES[case]
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs(case, T, D, F, E, kind, dtype=torch.bfloat16)
    y_ref, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD)  # fp32 math on the bf16-rounded inputs
    y, g = _backend(ids_T, x_TD, w1, w3, w2, dy_TD, E, path)
    assert y.dtype == torch.bfloat16
    for name, got, ref in [("y", y, y_ref)] + [(n, g[n], r) for n, r in g_ref.items()]:
        if not ref.any():  # an expert without tokens: exact zeros expected
            assert torch.equal(got.float(), ref), name
            continue
        assert got.dtype == torch.bfloat16, name
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        assert rel <= BF16_REL_TOL, f"{name}: relative error {rel:.3g} > {BF16_REL_TOL}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("poisoned", [0, 1], ids=["nan_in_expert0_rows", "nan_in_expert1_rows"])
def test_experts_never_read_each_others_rows(poisoned, path):
    """NaN in the rows of one expert leaves the other expert's outputs and weight grads finite and bit-equal."""
    T, D, F, E = 24, 32, 48, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs(f"poison{poisoned}", T, D, F, E, "random")
    clean = poisoned ^ 1
    rows_p, rows_c = ids_T == poisoned, ids_T == clean
    assert rows_p.any() and rows_c.any()
    dy_TD = dy_TD * rows_c[:, None]  # no gradient flows from the poisoned outputs
    y0, g0 = _backend(ids_T, x_TD, w1, w3, w2, dy_TD, E, path)
    x_bad = x_TD.clone()
    x_bad[rows_p] = float("nan")
    y1, g1 = _backend(ids_T, x_bad, w1, w3, w2, dy_TD, E, path)
    assert torch.isnan(y1[rows_p]).all()
    assert torch.isfinite(y1[rows_c]).all() and torch.equal(y1[rows_c], y0[rows_c])
    assert torch.equal(g1["x"][rows_c], g0["x"][rows_c])
    for name in ("w1", "w3", "w2"):
        assert torch.isfinite(g1[f"{name}[{clean}]"]).all(), name
        assert torch.equal(g1[f"{name}[{clean}]"], g0[f"{name}[{clean}]"]), name


@pytest.mark.parametrize("path", PATHS)
def test_frozen_text_expert(path):
    T, D, F, E = 30, 32, 48, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("frozen", T, D, F, E, "random")
    y_ref, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD)
    y, g = _backend(ids_T, x_TD, w1, w3, w2, dy_TD, E, path, frozen=(0,))
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    for name in ("w1[0]", "w3[0]", "w2[0]"):
        assert g[name] is None, name
    for name in ("x", "w1[1]", "w3[1]", "w2[1]"):
        torch.testing.assert_close(g[name], g_ref[name], **FP32_TOL)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("empty", [0, 1])
def test_empty_expert_gets_exact_zero_weight_grads(empty, path):
    T, D, F, E = 11, 16, 32, 2
    ids_T = torch.full((T,), 1 - empty, dtype=torch.long)
    _, x_TD, w1, w3, w2, dy_TD = make_inputs(f"empty{empty}", T, D, F, E, "random")
    # Leave NaN-filled blocks of the weight-grad size for the allocator to hand back, as a kernel that
    # allocates its output uninitialised and skips empty groups would return them.
    junk = [torch.full((E, D, F), float("nan")) for _ in range(4)]
    del junk
    _, g = _backend(ids_T, x_TD, w1, w3, w2, dy_TD, E, path)
    for name in ("w1", "w3", "w2"):
        grad = g[f"{name}[{empty}]"]
        assert grad is not None, name
        assert torch.equal(grad, torch.zeros_like(grad)), name
        assert g[f"{name}[{1 - empty}]"].abs().sum() > 0, name


def test_grouped_mm_backward_accepts_expanded_grad():
    """``y.sum()`` hands a stride-0 gradient to the grouped GEMM; the built-in backward rejects it on CPU."""
    a_TK = torch.randn(7, 16, requires_grad=True)
    b_EKN = torch.randn(2, 16, 32, requires_grad=True)
    offs_E = torch.tensor([3, 7], dtype=torch.int32)
    _GroupedMM.apply(a_TK, b_EKN, offs_E).sum().backward()
    a_ref, b_ref = a_TK.detach().requires_grad_(), b_EKN.detach().requires_grad_()
    torch.cat([a_ref[:3] @ b_ref[0], a_ref[3:] @ b_ref[1]]).sum().backward()
    torch.testing.assert_close(a_TK.grad, a_ref.grad, **FP32_TOL)
    torch.testing.assert_close(b_EKN.grad, b_ref.grad, **FP32_TOL)


# --------------------------------------------------------------------------------------------- validation, host sync, backend


def _valid(T=5, D=16, F=32, E=2):
    """x_TD, routing, w1, w3, w2 of a valid call."""
    ids_T, x_TD, w1, w3, w2, _ = make_inputs("valid", T, D, F, E, "random")
    return x_TD, kernels.build_routing(ids_T, E), w1, w3, w2


def test_wrong_number_of_experts():
    x, r, w1, w3, w2 = _valid()
    with pytest.raises(ValueError, match=r"w1 3, w3 2, w2 2"):
        kernels.moe_ffn(x, r, w1 + [w1[0]], w3, w2)


@pytest.mark.parametrize(
    "which,e,shape",
    [("w1", 0, (32, 17)), ("w3", 1, (31, 16)), ("w2", 1, (16, 33))],
    ids=["w1[0]", "w3[1]", "w2[1]"],
)
def test_wrong_weight_shape_names_the_weight(which, e, shape):
    x, r, w1, w3, w2 = _valid()
    ws = {"w1": list(w1), "w3": list(w3), "w2": list(w2)}
    ws[which][e] = torch.randn(shape)
    # the message lists every expert's shapes, so the odd one out is visible whichever weight it is
    with pytest.raises(ValueError, match=rf"expert {e}: .*{which} \({shape[0]}, {shape[1]}\)"):
        kernels.moe_ffn(x, r, ws["w1"], ws["w3"], ws["w2"])


def test_dtype_mismatch_is_an_error():
    x, r, w1, w3, w2 = _valid()
    with pytest.raises(ValueError, match="cast them to match"):
        kernels.moe_ffn(x.double(), r, w1, w3, w2)


@pytest.mark.parametrize("shape", [(6, 16), (5, 16, 1)], ids=["wrong_T", "3d"])
def test_x_not_matching_routing(shape):
    _, r, w1, w3, w2 = _valid()
    with pytest.raises(ValueError, match="x_TD"):
        kernels.moe_ffn(torch.randn(shape), r, w1, w3, w2)


def test_grouped_path_needs_aligned_sizes():
    x, r, w1, w3, w2 = _valid(D=33, F=47)
    with pytest.raises(ValueError, match="counts_host"):
        kernels.moe_ffn(x, dataclasses.replace(r, counts_host=None), w1, w3, w2)


@pytest.mark.parametrize("path", PATHS)
def test_no_host_sync_on_meta(path):
    """Meta tensors have no data: any .item(), .tolist() or bool-mask indexing raises on them.

    bf16 because the meta kernel of torch._grouped_mm accepts only bf16 ("Expected inputs of BF16 type").
    """
    T, D, F, E = 12, 32, 48, 2
    mask_T = torch.empty(T, dtype=torch.bool, device="meta")
    routing = kernels.build_routing(mask_T, counts_host=(5, 7) if path == "slices" else None)
    assert routing.counts_host == ((5, 7) if path == "slices" else None)
    assert routing.offsets_E1.device.type == "meta"

    def param(*shape):
        return torch.empty(shape, dtype=torch.bfloat16, device="meta", requires_grad=True)

    x = param(T, D)
    w1, w3, w2 = [param(F, D) for _ in range(E)], [param(F, D) for _ in range(E)], [param(D, F) for _ in range(E)]
    y = kernels.moe_ffn(x, routing, w1, w3, w2)
    assert y.shape == (T, D) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == (T, D)
    assert all(w.grad is not None and w.grad.shape == w.shape for w in w1 + w3 + w2)


def test_backend_env(monkeypatch):
    ids_T, x, w1, w3, w2, _ = make_inputs("env", 5, 16, 32, 2, "random")
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    assert kernels.select_backend(x.device) == "torch"
    y = kernels.moe_ffn(x, kernels.build_routing(ids_T), w1, w3, w2)
    torch.testing.assert_close(y, kernels.moe_ffn_reference(x, ids_T, w1, w3, w2), **FP32_TOL)
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda_magic")
    with pytest.raises(ValueError, match="MONO_MOE_BACKEND"):
        kernels.moe_ffn(x, kernels.build_routing(ids_T), w1, w3, w2)


@pytest.mark.parametrize("grouped", [False, True], ids=["slices", "grouped_mm"])
@pytest.mark.parametrize("split", ["all_text", "all_visual", "random"])
def test_routed_linear_matches_per_token_loop(grouped, split):
    import dataclasses

    torch.manual_seed(hash((grouped, split)) % 1000)
    t, d, n = 19, 16, 32
    ids = {"all_text": torch.zeros(t), "all_visual": torch.ones(t), "random": torch.randint(0, 2, (t,))}[split].long()
    routing = kernels.build_routing(ids, 2)
    if grouped:
        routing = dataclasses.replace(routing, counts_host=None)
    x = torch.randn(t, d, requires_grad=True)
    ws = [torch.randn(n, d, requires_grad=True) for _ in range(2)]
    y = kernels.routed_linear(x, routing, ws)
    ref = torch.stack([ws[int(e)] @ x[i] for i, e in enumerate(ids)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ws], g)
    want = torch.autograd.grad(ref, [x, *ws], g, allow_unused=True)
    for a, b, like in zip(got, want, [x, *ws]):
        # an expert with no tokens gets an exact zero gradient (the loop never touches its weight)
        torch.testing.assert_close(a, torch.zeros_like(like) if b is None else b, rtol=1e-5, atol=1e-5)


def test_routed_linear_rejects_mismatched_weights():
    routing = kernels.build_routing(torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="weights must all be"):
        kernels.routed_linear(torch.randn(3, 8), routing, [torch.randn(4, 8), torch.randn(5, 8)])


# --------------------------------------------------------------------------------------------- megablocks backend


def test_megablocks_unavailable_says_why(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "grouped_gemm", None)  # "not installed", whatever this machine has
    monkeypatch.setitem(sys.modules, "grouped_gemm.ops", None)
    monkeypatch.setitem(sys.modules, "megablocks", None)
    monkeypatch.setitem(sys.modules, "megablocks.grouped_gemm_util", None)
    x, r, w1, w3, w2 = _valid()
    with pytest.raises(kernels.BackendUnavailable, match="grouped_gemm"):
        kernels.moe_ffn(x, r, w1, w3, w2, backend="megablocks")
    monkeypatch.setenv(kernels.BACKEND_ENV, "megablocks")
    with pytest.raises(kernels.BackendUnavailable, match="grouped_gemm"):
        kernels.moe_ffn(x, r, w1, w3, w2)


def _loop_gmm(a, b, batch_sizes, trans_b=False):
    """Test double of ``grouped_gemm.ops.gmm`` with its documented contract: rows of ``a`` grouped by
    ``batch_sizes`` (int64, on the CPU), ``b`` ``(E, K, N)`` or ``(E, N, K)`` with ``trans_b``."""
    assert batch_sizes.dtype == torch.int64 and batch_sizes.device.type == "cpu"
    assert a.shape[0] == int(batch_sizes.sum()) and b.dim() == 3 and b.shape[0] == batch_sizes.numel()
    parts, start = [], 0
    for e, size in enumerate(batch_sizes.tolist()):
        rhs = b[e].t() if trans_b else b[e]
        parts.append(a[start : start + size] @ rhs)
        start += size
    return torch.cat(parts)


@pytest.mark.parametrize("case", ["random_split", "empty_expert0", "all_visual"])
def test_megablocks_backend_wiring(case, monkeypatch):
    """Our calls into ``gmm`` (grouping, ``trans_b``, stacking, scatter back) against the reference, with a
    loop standing in for the CUDA kernel (grouped_gemm cannot be built on the CPU machines)."""
    import sys
    import types

    ops = types.SimpleNamespace(gmm=_loop_gmm)
    monkeypatch.setitem(sys.modules, "grouped_gemm", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "grouped_gemm.ops", ops)
    T, D, F, E, kind = CASES[case]
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs(case, T, D, F, E, kind)
    routing = kernels.build_routing(ids_T, E)
    y, g = run_fwd_bwd(
        lambda x, a, b, c: kernels.moe_ffn(x, routing, a, b, c, backend="megablocks"),
        *leaves(x_TD, w1, w3, w2, frozen=(0,)), dy_TD,
    )
    y_ref, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD, frozen=(0,))
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    for name, ref in g_ref.items():
        if ref is None:
            assert g[name] is None, name
        else:
            torch.testing.assert_close(g[name], ref, **FP32_TOL)
