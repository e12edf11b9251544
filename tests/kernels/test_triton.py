"""The Triton kernels of the routed SwiGLU FFN against the fp32 reference.

Two tiers run the same cases (``scripts/run_tests.py`` runs each in its own process):
- ``interpret``: CPU tensors, fp32, ``TRITON_INTERPRET=1`` set before triton is imported (the interpreter's bf16
  arithmetic is wrong, so no bf16 there);
- ``gpu``: CUDA, bf16 (relative Frobenius error against the fp32 reference on the same bf16-rounded inputs) and
  fp32 (IEEE dots), plus an int64-offset case where ``T x F`` passes 2**31 elements.

Every run allocates its outputs NaN-filled (``MONO_MOE_POISON=1``), so an element a kernel fails to write fails
the comparison. Inputs are fresh per case, seeded by the case id.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.moe import triton_backend as tb

from .moe_cases import BF16_REL_TOL, CASES, leaves, make_inputs, reference, run_fwd_bwd

# Triton's tiled dot products sum in another order than the reference's matmuls: fp32 tolerance.
FP32_TOL = dict(rtol=2e-5, atol=2e-5)
TRITON_CASES = {
    **CASES,
    # several row tiles per expert, several N tiles, several k-steps (interpreter tiles are 64 x 64 x 64)
    "multi_tile": (150, 72, 136, 2, "random"),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv(tb.POISON_ENV, "1")


@pytest.fixture
def interpreter():
    """CPU device for the interpret tier (tests/conftest.py skips the tier unless TRITON_INTERPRET=1)."""
    assert tb.interpreting()
    return torch.device("cpu")


def _triton(ids_T, x_TD, w1, w3, w2, dy_TD, num_experts, device, frozen=()):
    move = lambda t: t.to(device)  # noqa: E731
    routing = kernels.build_routing(move(ids_T), num_experts)
    args = leaves(move(x_TD), [move(w) for w in w1], [move(w) for w in w3], [move(w) for w in w2], frozen)
    return run_fwd_bwd(lambda x, a, b, c: kernels.moe_ffn(x, routing, a, b, c, backend="triton"), *args, move(dy_TD))


def _check_fp32(case, device, frozen=()):
    T, D, F, E, kind = TRITON_CASES[case]
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs(case, T, D, F, E, kind)
    y_ref, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD, frozen=frozen)
    y, g = _triton(ids_T, x_TD, w1, w3, w2, dy_TD, E, device, frozen=frozen)
    assert y.dtype == torch.float32 and y.shape == (T, D) and y.device.type == device.type
    torch.testing.assert_close(y.cpu(), y_ref, **FP32_TOL)
    for name, ref in g_ref.items():
        if ref is None:
            assert g[name] is None, f"{name} is frozen but got a gradient"
            continue
        assert g[name] is not None, name
        torch.testing.assert_close(g[name].cpu(), ref, **FP32_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
    return g


# --------------------------------------------------------------------------------------------- interpret tier


@pytest.mark.interpret
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_interpret_matches_reference(case, interpreter):
    _check_fp32(case, interpreter)


@pytest.mark.interpret
@pytest.mark.parametrize("case", ["random_split", "all_text", "all_visual", "multi_tile"])
def test_interpret_frozen_text_expert_launches_no_text_weight_grads(case, interpreter, monkeypatch):
    launched = []
    real = tb._wgrad

    def spy(mode, **kw):
        launched.append((mode, list(kw["experts"])))
        return real(mode, **kw)

    monkeypatch.setattr(tb, "_wgrad", spy)
    g = _check_fp32(case, interpreter, frozen=(0,))
    assert all(0 not in experts for _, experts in launched), launched
    assert {name for name, grad in g.items() if grad is None} == {"w1[0]", "w3[0]", "w2[0]"}


@pytest.mark.interpret
@pytest.mark.parametrize("empty", [0, 1])
def test_interpret_empty_expert_exact_zero_weight_grads(empty, interpreter):
    T, D, F, E = 11, 16, 32, 2
    _, x_TD, w1, w3, w2, dy_TD = make_inputs(f"empty{empty}", T, D, F, E, "random")
    ids_T = torch.full((T,), 1 - empty, dtype=torch.long)
    _, g = _triton(ids_T, x_TD, w1, w3, w2, dy_TD, E, interpreter)
    for name in ("w1", "w3", "w2"):
        assert torch.equal(g[f"{name}[{empty}]"], torch.zeros(g[f"{name}[{empty}]"].shape)), name
        assert g[f"{name}[{1 - empty}]"].abs().sum() > 0, name


@pytest.mark.interpret
def test_interpret_one_frozen_matrix_of_an_expert(interpreter):
    """``w1[1]`` frozen but ``w3[1]`` trained: the shared dW1/dW3 kernel still runs, ``w1[1]`` gets nothing."""
    T, D, F, E = 30, 32, 48, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("one_frozen", T, D, F, E, "random")
    x, a, b, c = leaves(x_TD, w1, w3, w2)
    a[1].requires_grad_(False)
    routing = kernels.build_routing(ids_T, E)
    _, g = run_fwd_bwd(lambda *args: kernels.moe_ffn(*args[:1], routing, *args[1:], backend="triton"), x, a, b, c, dy_TD)
    _, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD)
    assert g["w1[1]"] is None
    for name in ("x", "w1[0]", "w3[0]", "w3[1]", "w2[0]", "w2[1]"):
        torch.testing.assert_close(g[name], g_ref[name], **FP32_TOL)


@pytest.mark.interpret
def test_interpret_deterministic_and_grad_mode_independent(interpreter):
    T, D, F, E, kind = TRITON_CASES["multi_tile"]
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("determinism", T, D, F, E, kind)
    y0, g0 = _triton(ids_T, x_TD, w1, w3, w2, dy_TD, E, interpreter)
    y1, g1 = _triton(ids_T, x_TD, w1, w3, w2, dy_TD, E, interpreter)
    assert torch.equal(y0, y1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    with torch.no_grad():  # no pre-activations saved: same rounding, same output
        y2 = kernels.moe_ffn(x_TD, kernels.build_routing(ids_T, E), w1, w3, w2, backend="triton")
    assert torch.equal(y0.detach(), y2)


@pytest.mark.interpret
def test_interpret_strided_inputs_and_expanded_grad(interpreter):
    """``x`` a non-contiguous view, ``dy`` of stride 0 (from ``y.sum()``), weights transposed views."""
    T, D, F, E = 40, 32, 48, 2
    ids_T, x_TD, w1, w3, w2, _ = make_inputs("strided", T, D, F, E, "random")
    x_big = torch.randn(T, 2 * D)
    x_big[:, ::2] = x_TD
    x_view = x_big[:, ::2].requires_grad_(False)
    assert not x_view.is_contiguous()
    w2_t = [w.t().contiguous().t() for w in w2]  # (D, F) views with (1, D) strides
    x = x_view.clone().requires_grad_()
    routing = kernels.build_routing(ids_T, E)
    ws = [[w.clone().requires_grad_() for w in group] for group in (w1, w3, w2_t)]
    y = kernels.moe_ffn(x_view.detach().requires_grad_(), routing, *ws, backend="triton")
    y.sum().backward()
    ref_ws = [[w.clone().requires_grad_() for w in group] for group in (w1, w3, w2)]
    y_ref = kernels.moe_ffn_reference(x, ids_T, *ref_ws)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    for group, ref_group in zip(ws, ref_ws):
        for w, r in zip(group, ref_group):
            torch.testing.assert_close(w.grad, r.grad, **FP32_TOL)


@pytest.mark.interpret
def test_interpret_custom_ops_pass_opcheck(interpreter):
    T, D, F, E = 24, 16, 32, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("opcheck", T, D, F, E, "random")
    x, a, b, c = leaves(x_TD, w1, w3, w2, frozen=(0,))
    r = kernels.build_routing(ids_T, E)
    torch.library.opcheck(tb.moe_ffn_fwd, (x, r.perm_T, r.offsets_E1, a, b, c, True))
    _, g, u = tb.moe_ffn_fwd(x.detach(), r.perm_T, r.offsets_E1, w1, w3, w2, True)
    flags = [False, True]
    torch.library.opcheck(
        tb.moe_ffn_bwd, (dy_TD, x_TD, r.perm_T, r.offsets_E1, w1, w3, w2, g, u, True, flags, flags, flags)
    )


@pytest.mark.interpret
def test_interpret_torch_compile_fullgraph(interpreter):
    """``torch.compile`` traces the custom op (fake kernels, autograd) without a graph break."""
    T, D, F, E = 24, 16, 32, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("compile", T, D, F, E, "random")
    r = kernels.build_routing(ids_T, E)

    def step(x, perm, inv, offsets, w1, w3, w2, dy):
        routing = kernels.Routing(perm, inv, offsets, len(w1))
        return (kernels.moe_ffn(x, routing, w1, w3, w2, backend="triton") * dy).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        x, a, b, c = leaves(x_TD, w1, w3, w2, frozen=(0,))
        loss = fn(x, r.perm_T, r.inv_perm_T, r.offsets_E1, a, b, c, dy_TD)
        loss.backward()
        results.append([loss.detach(), x.grad, a[1].grad, b[1].grad, c[1].grad, a[0].grad])
    eager, comp = results
    assert comp[-1] is None and eager[-1] is None
    for got, want in zip(comp[:-1], eager[:-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.interpret
def test_interpret_auto_backend_on_cpu_is_torch(interpreter, monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.select_backend("cpu") == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    assert kernels.select_backend("cpu") == "triton"
    assert kernels.select_backend("cpu", "torch") == "torch"  # the argument wins over the environment


# --------------------------------------------------------------------------------------------- gpu tier

GPU_DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture
def cuda():
    """CUDA with IEEE fp32 matmuls (our fp32 dots follow torch's setting)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield torch.device("cuda")
    torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("frozen", [(), (0,)], ids=["all_train", "frozen_text"])
@pytest.mark.parametrize("case", list(TRITON_CASES) + ["gpu_16k"])
def test_gpu_matches_reference(case, frozen, dtype, cuda):
    shape = TRITON_CASES.get(case, (16384, 256, 512, 2, "random"))
    if dtype == torch.float32:
        if case == "gpu_16k":
            pytest.skip("fp32 sweep kept small")
        _check_fp32(case, cuda, frozen=frozen)
        return
    T, D, F, E, kind = shape
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs(case, T, D, F, E, kind, dtype=dtype)
    y_ref, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD, frozen=frozen)
    y, g = _triton(ids_T, x_TD, w1, w3, w2, dy_TD, E, cuda, frozen=frozen)
    assert y.dtype == dtype
    for name, got, ref in [("y", y, y_ref)] + [(n, g[n], r) for n, r in g_ref.items()]:
        if ref is None:
            assert got is None, name
            continue
        got = got.float().cpu()
        if not ref.any():  # an expert without tokens: exact zeros
            assert torch.equal(got, ref), name
            continue
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel <= BF16_REL_TOL, f"{name}: relative error {rel:.3g} > {BF16_REL_TOL}"


@pytest.mark.gpu
def test_gpu_deterministic(cuda):
    T, D, F, E = 8192, 256, 512, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("gpu_det", T, D, F, E, "random", dtype=torch.bfloat16)
    first = _triton(ids_T, x_TD, w1, w3, w2, dy_TD, E, cuda)
    for _ in range(3):
        again = _triton(ids_T, x_TD, w1, w3, w2, dy_TD, E, cuda)
        assert torch.equal(first[0], again[0])
        assert all(torch.equal(first[1][k], again[1][k]) for k in first[1])


@pytest.mark.gpu
def test_gpu_int64_offsets(cuda):
    """``T x F`` past 2**31 elements: rows beyond the int32 range land where they should."""
    T, D, F = 140_000, 64, 16_384  # T * F = 2.29e9 > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs ~40 GiB free GPU memory, {free / 2**30:.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids_T = (torch.arange(T, device="cuda") % 3 == 0).long()
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    ws = [(torch.randn(F, D, device="cuda", generator=gen) / D**0.5).bfloat16() for _ in range(4)]
    w2 = [(torch.randn(D, F, device="cuda", generator=gen) / F**0.5).bfloat16() for _ in range(2)]
    routing = kernels.build_routing(ids_T, 2)
    with torch.no_grad():
        y = kernels.moe_ffn(x, routing, ws[:2], ws[2:], w2, backend="triton")
    tail = torch.arange(T - 512, T, device="cuda")  # rows whose T x F offsets are past 2**31
    ref = kernels.moe_ffn_reference(x[tail], ids_T[tail], ws[:2], ws[2:], w2)
    rel = ((y[tail].float() - ref).norm() / ref.norm()).item()
    assert rel <= BF16_REL_TOL, rel


@pytest.mark.gpu
def test_gpu_torch_compile_inductor(cuda):
    T, D, F, E = 4096, 256, 512, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("gpu_compile", T, D, F, E, "random", dtype=torch.bfloat16)
    routing = kernels.build_routing(ids_T.cuda(), E)
    ws = [[w.cuda().requires_grad_() for w in group] for group in (w1, w3, w2)]
    x = x_TD.cuda().requires_grad_()
    fn = torch.compile(lambda x, *ws: kernels.moe_ffn(x, routing, *ws, backend="triton"), fullgraph=True)
    y = fn(x, *ws)
    y_eager = kernels.moe_ffn(x, routing, *ws, backend="triton")
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.select_backend("cuda") == "triton"


def test_triton_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    if tb.interpreting():
        pytest.skip("this process runs the interpreter")
    T, D, F, E = 4, 16, 32, 2
    ids_T, x_TD, w1, w3, w2, _ = make_inputs("unavailable", T, D, F, E, "random")
    with pytest.raises(kernels.BackendUnavailable, match="TRITON_INTERPRET=1"):
        kernels.moe_ffn(x_TD, kernels.build_routing(ids_T), w1, w3, w2, backend="triton")


@pytest.mark.interpret
def test_interpret_autotuned_path(interpreter, monkeypatch):
    """The GPU launch path (autotuner, pruning, grid from the chosen config, cache key with the token bucket)
    with interpreter-sized configs and a CPU timer instead of the Hopper list and the GPU timer."""
    import time

    import triton

    benched = []

    def cpu_bench(kernel_call, quantiles):
        start = time.perf_counter()
        kernel_call()
        benched.append(time.perf_counter() - start)
        return [benched[-1]] * len(quantiles)

    gemm_cfgs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, GROUP_M=2)) for bm in (32, 64)]
    wgrad_cfgs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64)) for bm in (32, 64)]
    tuned = {
        "gemm": tb.build_autotuner("gemm", gemm_cfgs, cpu_bench),
        "wgrad": tb.build_autotuner("wgrad", wgrad_cfgs, cpu_bench),
    }
    monkeypatch.setattr(tb, "_autotune_enabled", lambda device: True)
    monkeypatch.setattr(tb, "_tuned", tuned.__getitem__)
    _check_fp32("multi_tile", interpreter, frozen=(0,))
    assert benched, "the autotuner never timed a config"
    keys = {kind: list(t.cache) for kind, t in tuned.items()}
    assert len(keys["gemm"]) == 4 and len(keys["wgrad"]) == 2, keys  # one entry per (mode, sizes, bucket)
    assert all(256 in key for key in keys["gemm"] + keys["wgrad"]), keys  # T = 150 bucketed to 256


@pytest.mark.interpret
def test_interpret_w1_and_w3_in_different_layouts(interpreter):
    """One kernel reads w1 and w3 with one stride pattern: a transposed-view w3 must still be read right."""
    T, D, F, E = 40, 32, 48, 2
    ids_T, x_TD, w1, w3, w2, dy_TD = make_inputs("layouts", T, D, F, E, "random")
    w3_view = [w.t().contiguous().t() for w in w3]  # (F, D) with strides (1, F)
    assert w3_view[0].stride() != w1[0].stride()
    routing = kernels.build_routing(ids_T, E)
    y, g = run_fwd_bwd(
        lambda x, a, b, c: kernels.moe_ffn(x, routing, a, b, c, backend="triton"), *leaves(x_TD, w1, w3_view, w2), dy_TD
    )
    y_ref, g_ref = reference(ids_T, x_TD, w1, w3, w2, dy_TD)
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    for name, ref in g_ref.items():
        torch.testing.assert_close(g[name], ref, **FP32_TOL)
