"""Tests a GPU run must pass (skipped without CUDA), and the device axis of the test matrix (runs everywhere).

Run on a GPU machine with TRITON_INTERPRET=0 so that the Triton kernels are compiled for the device.
"""
import os

import pytest
import torch

from gmd_ext import testing


def test_matrix_lists_every_cell():
    params = testing.device_backends()
    ids = [p.id for p in params]
    assert ids == [f"{d}-{b}" for d in testing.DEVICE_IDS for b in testing.BACKEND_IDS]
    for p in params:
        ok, reason = testing.case_status(*p.values)
        assert bool(p.marks) == (not ok)
        if not ok:
            assert reason and p.marks[0].kwargs["reason"] == reason
    assert torch.device("cpu") in testing.devices()
    assert testing.case_status("cpu", "torch") == (True, None)
    if not torch.cuda.is_available():
        assert not testing.device_status("cuda")[0] and not testing.device_status("cuda:1")[0]


# ---------------------------------------------------------------- shared pieces
import math  # noqa: E402

from gmd_ext import GMD, ops, project_conflicts  # noqa: E402
from gmd_ext.ops import reference  # noqa: E402
from gmd_ext.ops.reference import modality_group_norm_reference  # noqa: E402

CUDA_BACKENDS = testing.device_backends(backends=("cpp", "triton"), devices=("cuda",))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
needs_two = pytest.mark.skipif(not testing.device_status("cuda:1")[0], reason="needs 2 GPUs")


def _rel(out, ref):
    """‖out − ref‖ / ‖ref‖ in fp64 (METHOD: fp32 ≪ 1e-3, bf16 inputs 1e-3 – 1e-2); NaN never passes."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (an element not written?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _fresh(K, N, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(K, N, generator=g, device=device, dtype=torch.float32).to(dtype)


def _poison_allocator(device):
    """Fill freshly freed device memory with NaN so that an unwritten output element reads NaN, not zero."""
    junk = torch.full((1 << 24,), float("nan"), device=device)
    del junk


# ---------------------------------------------------------------- fp64 references, every shape class
# bench/gpu_check.py runs `-m "not slow"` first (K in {1, 4, 15, 64} and the three main layouts: the kernels' K
# classes and both vector paths), then the rest of the grid with the other slow tests while its budget lasts.
_FAST_K, _FAST_LAYOUTS = (1, 4, 15, 64), ("contiguous", "odd_n", "transposed")
_GRID = [pytest.param(K, layout, marks=() if K in _FAST_K and layout in _FAST_LAYOUTS else pytest.mark.slow,
                      id=f"{K}-{layout}")
         for K in (1, 3, 4, 5, 15, 17, 64)
         for layout in ("contiguous", "odd_n", "padded", "transposed", "column_strided")]


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
@pytest.mark.parametrize("K,layout", _GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_ops_vs_fp64(device, backend, K, dtype, layout):
    N = {"contiguous": 1 << 16, "odd_n": (1 << 16) + 3}.get(layout, 4099)
    for seed in range(2):  # fresh inputs each time: the kernel must compute the function, not fit one input
        _poison_allocator(device)
        base = _fresh(K, N, dtype, device, seed)
        if layout == "padded":
            G = ops.padded_rows(K, N, dtype=dtype, device=device).copy_(base)
        elif layout == "transposed":
            G = base.T.contiguous().T
        elif layout == "column_strided":
            G = torch.stack([base, base], -1).flatten(1)[:, ::2]
        else:
            G = base
        G64 = G.double().cpu()
        gram = ops.gram(G, backend)  # products of bf16 values are exact in fp32: one tolerance for both
        assert _rel(gram, G64 @ G64.T) < 1e-5
        assert torch.equal(gram, gram.T)
        perms = torch.stack([torch.randperm(K) for _ in range(K)]).to(device)
        A = ops.pcgrad_coefficients(gram, perms, backend)
        A_ref = reference.pcgrad_coefficients(gram.cpu(), perms.cpu())
        assert _rel(A, A_ref) < 1e-5
        c = A.sum(0)
        shared = torch.rand(N, device=device) < 0.5
        out = ops.combine(G, c, shared, 1.0 / K, 1.0, backend)
        scale = torch.where(shared.cpu(), 1.0 / K, 1.0).double()
        ref = scale * (c.double().cpu() @ G64)
        assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 8e-3)
        rows = ops.combine_rows(G, A, backend)
        assert _rel(rows, A.double().cpu() @ G64) < (1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.slow  # 8 GiB
@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_gram_beyond_2_31_elements(device, backend):
    """N >= 2^31 with K = 2 in bf16 (8 GiB): 64-bit offsets everywhere. Rows are constant so fp64 truth is exact."""
    N = (1 << 31) + 17
    G = torch.empty(2, N, dtype=torch.bfloat16, device=device)
    G[0].fill_(1.0)
    G[1].fill_(-0.5)
    gram = ops.gram(G, backend).double().cpu()
    want = torch.tensor([[N, -0.5 * N], [-0.5 * N, 0.25 * N]], dtype=torch.float64)
    assert _rel(gram, want) < 1e-6
    out = ops.combine(G, torch.tensor([1.0, 2.0], device=device), None, 1.0, 1.0, backend)
    assert out[-1].item() == 0.0 and out[0].item() == 0.0
    del G, out


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_gram_tiny_values_are_not_flushed(device, backend):
    """|g| ~ 1e-20: squares are fp32 subnormals. Flush-to-zero (--use_fast_math) would make Γ_ii = 0 and skip the
    objective as zero-norm on CUDA but not on CPU."""
    G = torch.full((2, 1024), 1e-20, device=device)
    assert (ops.gram(G, backend).diagonal() > 0).all()


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_pcgrad_bad_perms_do_not_poison_the_context(device, backend):
    if backend == "triton":
        pytest.skip("the triton launcher validates CPU orders only; the CUDA path is the cpp kernel's")
    gram = torch.eye(3, device=device)
    A = ops.pcgrad_coefficients(gram, torch.tensor([[0, 1, 2], [0, 1, 7], [2, 1, 0]], device=device), backend)
    torch.cuda.synchronize(device)
    assert torch.isnan(A[1]).all() and torch.isfinite(A[[0, 2]]).all()
    assert torch.ones(1, device=device).item() == 1.0  # the context still works


# ---------------------------------------------------------------- group norm on the GPU
@needs_cuda
@pytest.mark.parametrize("device,backend", testing.device_backends(devices=("cuda",)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 16, 8, 8, 8), (1, 4, 8, 37, 5), (2, 3, 6, 0)])
def test_group_norm_vs_fp64(device, backend, dtype, shape):
    x = torch.randn(*shape, device=device).to(dtype).requires_grad_()
    M, C = shape[1], shape[2]
    w = torch.randn(M, C, device=device, requires_grad=True)
    b = torch.randn(M, C, device=device, requires_grad=True)
    present = testing.present_mask("random", shape[0], M).to(device)
    y = gmd_ext_gn(x, w, b, present, backend)
    ref = modality_group_norm_reference(x.double(), w.double(), b.double(), present, num_groups=2,
                                        activation="leaky_relu")
    if y.numel() == 0:
        return
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 8e-3)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), g.to(dtype))
    want = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(got, want):
        assert _rel(a, r) < (1e-4 if dtype == torch.float32 else 2e-2)


def gmd_ext_gn(x, w, b, present, backend):
    from gmd_ext import modality_group_norm
    return modality_group_norm(x, w, b, present, num_groups=2, activation="leaky_relu", backend=backend)


# ---------------------------------------------------------------- no host syncs, graphs, compile
def _step_model(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 32, device=device), torch.randn(16, 3, device=device)
    return model, opt, x, y


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_gmd_step_has_no_host_sync(device, backend):
    model, opt, x, y = _step_model(device)
    gmd = GMD(opt, order="sequential", nonfinite="propagate", backend=backend)

    def losses():
        out = model(x)
        return [((out[:, k] - y[:, k]) ** 2).mean() for k in range(3)]

    gmd.backward(losses())  # first step: buffers allocated, order validated and cached
    gmd.step()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        gmd.backward(losses())
        gmd.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    G = torch.randn(3, 1000, device=device)
    order = make_order(3, device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        project_conflicts(G, order="sequential", nonfinite="propagate", backend=backend)
        project_conflicts(G, order=order, nonfinite="propagate", backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def make_order(K, device):
    """A fixed user order on the host: validated there for free, then copied without a sync."""
    return torch.stack([torch.randperm(K) for _ in range(K)])


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_cuda_graph_replays_the_projection_bit_identically(device, backend):
    K, N = 15, 100_003
    G = torch.randn(K, N, device=device)
    perms = torch.stack([torch.randperm(K) for _ in range(K)]).to(device)
    shared = torch.rand(N, device=device) < 0.5

    def run():
        gram = ops.gram(G, backend)
        A = ops.pcgrad_coefficients(gram, perms, backend)
        return ops.combine(G, A.sum(0), shared, 1.0 / K, 1.0, backend)

    eager = run()
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        run()  # warm-up outside the capture (allocator, Triton compilation)
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize(device)
        assert torch.equal(out, eager)
    G.copy_(torch.randn_like(G))  # new inputs in the captured buffers give the new result
    graph.replay()
    torch.cuda.synchronize(device)
    assert torch.equal(out, run())


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_cuda_graph_of_a_gmd_step(device, backend):
    model, opt, x, y = _step_model(device)
    gmd = GMD(opt, order="sequential", nonfinite="propagate", backend=backend)
    params = list(model.parameters())

    def step():
        gmd.zero_grad()  # a new GMD step each time: without it the calls accumulate (replays would differ)
        out = model(x)
        gmd.backward([((out[:, k] - y[:, k]) ** 2).mean() for k in range(3)])
        return [p.grad.clone() for p in params]

    _assert_graph_replays_bit_identically(step, device)


def _assert_graph_replays_bit_identically(step, device):
    """Capture `step() -> [grad]` in a CUDA graph after two warm-up steps on a side stream (allocator, plans, cuDNN,
    Triton compiles); two replays and an eager step give the same bits, and every gradient is finite."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    graph.replay()
    torch.cuda.synchronize(device)
    first = [None if g is None else g.clone() for g in grads]
    assert all(g is not None and torch.isfinite(g).all() for g in first)
    graph.replay()
    torch.cuda.synchronize(device)
    assert _same(first, grads)
    assert _same(first, step())


# ---------------------------------------------------------------- a DS training step: no host sync, CUDA graph
def _ds_step(device, backend):
    """One DS + GMD training step as the BraTS recipe runs it, with everything a step needs on the device made here,
    before the steps under test: DSUNet3d (width 0.25: 8 .. 128 channels, G = 8) on x [2, 4, 16^3] with a host-side
    mask that drops a pair in each sample (the data loader's), its PairPlan (and the per-branch plans, cached by a
    first step), the 15 subset objectives fused over their present modalities, GMD with the branches gradient
    source, a fixed host order and nonfinite="propagate" (no finiteness check: no sync).

    gmd_ext.subset_losses(present=<host mask>) makes no host sync (test_subset_losses_with_a_host_mask_has_no_sync)
    but copies the mask's rows to the device on every call, which a CUDA graph cannot capture; the same fusion is
    written here with its device tensors made once, so the one step serves both tests.
    Returns (step() -> [grad clones], gmd): step() starts a new GMD step (zero_grad), runs the forward and
    gmd.backward."""
    import torch.nn.functional as F

    import gmd_ext
    from gmd_ext import DSUNet3d
    from gmd_ext.gmd.subsets import SubsetLosses
    from gmd_ext.ops import PairPlan

    torch.manual_seed(0)
    model = DSUNet3d(width=0.25, backend=backend).to(device)
    B, M = 2, 4
    x = torch.randn(B, M, 16, 16, 16, device=device)
    y = (torch.rand(B, 3, 16, 16, 16, device=device) > 0.5).float()
    present = torch.tensor([[True, False, True, True], [True, True, False, True]])
    plan = PairPlan(present, B, M, device)
    subs = gmd_ext.subsets(model.modalities)
    fusion = []
    for s in subs:
        w = present[:, list(s.indices)].double()
        count = w.sum(1)
        weights = (w / count.clamp_min(1)[:, None]).T.float().reshape(len(s.indices), B, 1, 1, 1, 1)
        fusion.append((s, weights.to(device), (count > 0).nonzero().flatten().to(device)))
    order = torch.stack([torch.randperm(len(subs), generator=torch.Generator().manual_seed(k))
                         for k in range(len(subs))])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gmd = GMD(opt, order=order, strategy="branches", nonfinite="propagate", backend=backend)
    params = list(model.parameters())

    def step():
        gmd.zero_grad()
        branches = model.forward_branches(x, plan)
        losses = SubsetLosses((), subs)
        for s, weights, rows in fusion:
            fused = sum(branches[m] * weights[j] for j, m in enumerate(s.indices))
            losses[s.name] = F.binary_cross_entropy_with_logits(fused.index_select(0, rows), y.index_select(0, rows))
        gmd.backward(losses)
        return [None if p.grad is None else p.grad.clone() for p in params]

    return step, gmd


def _same(a, b):
    return len(a) == len(b) and all((u is None and v is None) or (u is not None and v is not None and
                                                                   torch.equal(u, v)) for u, v in zip(a, b))


def test_ds_step_helper_runs_on_cpu(one_thread):
    """The DS step of the GPU tests below on the CPU (cpp kernels): it runs, every parameter gets a finite gradient
    and a second step is bit-identical (so a GPU failure of those tests is about the GPU)."""
    from gmd_ext import _backend

    step, gmd = _ds_step("cpu", "cpp" if _backend.CPP_LOADED else "torch")
    first = step()
    assert all(g is not None and torch.isfinite(g).all() for g in first)
    assert gmd.strategy == "branches"
    assert _same(first, step())


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_ds_step_has_no_host_sync(device, backend):
    """A whole DS training step (plan, masked conv, group norm, pack/scatter, the branches source, Γ, projection,
    combination, the optimizer step) with a host-side mask under set_sync_debug_mode("error")."""
    step, gmd = _ds_step(device, backend)
    step()  # first step: GMD buffers, the per-branch plans, cuDNN algorithms
    gmd.step()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        gmd.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda
def test_subset_losses_with_a_host_mask_has_no_sync():
    """The recipe's fusion: row selection decided on the loader's host mask, so no device sync per subset."""
    import torch.nn.functional as F

    import gmd_ext

    subs = gmd_ext.subsets(("a", "b", "c"))
    branches = [torch.randn(4, 2, 8, device="cuda", requires_grad=True) for _ in range(3)]
    y = torch.rand(4, 2, 8, device="cuda")
    present = torch.tensor([[True, False, True], [False, False, True], [True, True, False], [True, False, False]])
    expected = gmd_ext.subset_losses(branches, y, F.mse_loss, subs, present=present.cuda())  # device mask: syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = gmd_ext.subset_losses(branches, y, F.mse_loss, subs, present=present)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.keys() == expected.keys() and got.absent == expected.absent
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_cuda_graph_of_a_ds_step(device, backend):
    """The DS step (forward and GMD backward) captured in a CUDA graph: replays are bit-identical to each other and
    to an eager step (deterministic kernels: fixed-order merges, no atomics)."""
    torch.backends.cudnn.deterministic = True
    try:
        step, _ = _ds_step(device, backend)
        _assert_graph_replays_bit_identically(step, device)
    finally:
        torch.backends.cudnn.deterministic = False


@pytest.mark.slow  # Inductor compiles
@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_compile_fullgraph_project_conflicts(device, backend):
    G = torch.randn(5, 4099, device=device)
    order = torch.stack([torch.randperm(5) for _ in range(5)]).to(device)

    def f(G):
        return project_conflicts(G, order=order, backend=backend, nonfinite="propagate")

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(G), f(G))


@pytest.mark.slow  # Inductor compiles
@needs_cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_compile_reduce_overhead_project_conflicts(device, backend):
    """mode="reduce-overhead": Inductor captures the step in a CUDA graph; replays on new inputs in the same
    buffers must give the eager results (a host sync or a captured host value would break this)."""
    torch._dynamo.reset()
    K, N = 7, 10_007
    order = make_order(K, device).to(device)
    shared = torch.rand(N, device=device) < 0.5

    def f(G):
        return project_conflicts(G, shared=shared, order=order, backend=backend, nonfinite="propagate")

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # the first calls record, the later ones replay
        G = _fresh(K, N, torch.float32, device, seed)
        got = compiled(G).clone()
        torch.testing.assert_close(got, f(G), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # Inductor compiles
@needs_cuda
@pytest.mark.parametrize("device,backend", testing.device_backends(backends=("cpp", "torch"), devices=("cuda",)))
def test_compile_fullgraph_ds_ops(device, backend):
    """masked_conv -> modality_group_norm under torch.compile(fullgraph=True) with Inductor on CUDA: the plan's
    host counts and device index are graph constants; forward and gradients equal eager."""
    from gmd_ext import masked_conv, modality_group_norm
    from gmd_ext.ops import PairPlan

    torch._dynamo.reset()
    B, M, Cin, Cout = 3, 4, 2, 4
    present_h = testing.present_mask("random", B, M, torch.Generator().manual_seed(0))
    plan = PairPlan(present_h, B, M, device)  # one plan for both ops: validated on the host, outside the graph
    leaves = [torch.randn(*shape, device=device, requires_grad=True)
              for shape in ((B, M, Cin, 6, 7, 5), (Cout, Cin, 3, 3, 3), (Cout,), (M, Cout), (M, Cout))]

    def f(x, w, bias, gw, gb):
        y = masked_conv(x, w, bias, plan, padding=1, backend=backend)
        return modality_group_norm(y, gw, gb, plan, num_groups=2, activation="relu", backend=backend)

    out, ref = torch.compile(f, fullgraph=True)(*leaves), f(*leaves)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_two
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_second_gpu_while_first_is_current(backend):
    """A cuda:1 tensor while cuda:0 is current: every launcher must guard the device."""
    torch.cuda.set_device(0)
    G = torch.randn(7, 5000, device="cuda:1")
    gram = ops.gram(G, backend)
    assert gram.device == G.device and _rel(gram, G.double().cpu() @ G.double().cpu().T) < 1e-5
    perms = torch.stack([torch.randperm(7) for _ in range(7)]).to("cuda:1")
    A = ops.pcgrad_coefficients(gram, perms, backend)
    out = ops.combine(G, A.sum(0), None, 1.0 / 7, 1.0, backend)
    assert _rel(out, A.sum(0).double().cpu() @ G.double().cpu() / 7) < 1e-5
    x = torch.randn(2, 2, 4, 6, 6, device="cuda:1")
    w, b = torch.randn(2, 4, device="cuda:1"), torch.randn(2, 4, device="cuda:1")
    present = torch.ones(2, 2, dtype=torch.bool, device="cuda:1")
    y = gmd_ext_gn(x, w, b, present, backend)
    ref = modality_group_norm_reference(x.double(), w.double(), b.double(), present, num_groups=2,
                                        activation="leaky_relu")
    assert _rel(y, ref) < 1e-5


# ---------------------------------------------------------------- runs everywhere
@pytest.mark.parametrize("device", testing.device_params())
def test_project_conflicts_nonfinite_propagate(device):
    G = torch.randn(3, 50, device=device)
    G[1, 4] = math.inf
    with pytest.raises(ValueError, match="grads must be finite"):
        project_conflicts(G, backend="torch")
    out = project_conflicts(G, backend="torch", nonfinite="propagate")
    assert not torch.isfinite(out).all()
    with pytest.raises(ValueError, match="nonfinite must be"):
        project_conflicts(G, nonfinite="skip")


# ---------------------------------------------------------------- resources and SASS, without a GPU
_MY_CU = ("gram_cuda.cu", "combine_cuda.cu", "pcgrad_coefficients_cuda.cu", "modality_group_norm_cuda.cu")
# Kernels whose hot loop must use 128-bit global loads (their VEC > 1 instantiations: 16 / sizeof(T) elements),
# and those of them that must also store 128 bits at a time.
_VEC_KERNELS = ("gram_partial_kernel", "combine_kernel", "gn_stats_kernel", "gn_apply_kernel", "gn_bwd_sums_kernel",
                "gn_bwd_apply_kernel")
_VEC_STORE_KERNELS = ("combine_kernel", "gn_apply_kernel", "gn_bwd_apply_kernel")


def _kernels(obj, cuobjdump):
    """[(demangled kernel name, SASS text)] of an object file, one entry per kernel and architecture."""
    import re
    import subprocess

    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    out = []
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        mangled, body = chunk.split("\n", 1)
        name = subprocess.run(["c++filt"], input=mangled.strip(), capture_output=True, text=True).stdout.strip()
        out.append((name, body))
    return out


@pytest.mark.skipif(os.environ.get("GMD_EXT_NVCC_CHECK") != "1",
                    reason="compiles every CUDA file with nvcc (minutes): set GMD_EXT_NVCC_CHECK=1")
@pytest.mark.parametrize("source", _MY_CU)
def test_cuda_resources(source, tmp_path):
    """sm_80 and sm_90 (setup.py's default arch list), the build's flags without --use_fast_math: no kernel spills
    or uses a stack frame, the vectorised kernels issue 128-bit loads (LDG.E.128) and the elementwise ones 128-bit
    stores (STG.E.128), and no fp32 arithmetic flushes subnormals (no FFMA/FMUL/FADD.FTZ)."""
    import re
    import shutil
    import subprocess

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if shutil.which("nvcc") is None or not os.path.exists(cuobjdump):
        pytest.skip("needs nvcc and Triton's cuobjdump")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wrapper = tmp_path / "nvcc"
    # .ci/compile_cuda.sh compiles every file into a temporary folder (and keeps nvcc's report there); the wrapper
    # compiles only this source and keeps its object and ptxas report.
    report = tmp_path / "ptxas.txt"
    wrapper.write_text(f'#!/bin/sh\ncase "$2" in *{source}) nvcc "$@" -Xptxas -v > {report} 2>&1; rc=$?; '
                       f'cat {report}; [ $rc = 0 ] && cp "$4" {tmp_path}/k.o ;; *) exit 0 ;; esac\n')
    wrapper.chmod(0o755)
    run = subprocess.run(["bash", os.path.join(root, ".ci", "compile_cuda.sh")], capture_output=True, text=True,
                         env=dict(os.environ, NVCC=str(wrapper), GMD_EXT_CUDA_SOURCES=os.path.join(root, "csrc",
                                                                                                   "cuda", source)),
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stacks = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", report.read_text())
    assert stacks and all(s == ("0", "0") for s in stacks), f"stack/spills: {sorted(set(stacks))}"
    kernels = _kernels(str(tmp_path / "k.o"), cuobjdump)
    assert kernels, "no SASS read back"
    for name, body in kernels:
        assert not re.search(r"\b(FFMA|FMUL|FADD)\.FTZ", body), f"{name}: flush-to-zero arithmetic"
        kernel = re.search(r"::(\w+)<", name)
        vec = re.search(r", (2|4|8)>\(", name)
        if kernel and kernel.group(1) in _VEC_KERNELS and vec:
            # cp.async 16-byte copies (LDGSTS.E.BYPASS.128) are the fp32 Gramian's 128-bit loads
            assert "LDG.E.128" in body or "LDGSTS.E.BYPASS.128" in body, f"{name}: no 128-bit loads"
            if kernel.group(1) in _VEC_STORE_KERNELS:
                assert "STG.E.128" in body, f"{name}: no 128-bit stores"
        if kernel and kernel.group(1) == "gram_partial_kernel" and vec:
            # fp32 packs: double-buffered cp.async staging; 16-bit packs: converted and staged by 128-bit shared
            # stores (4 scalar stores per pack were 4-way bank conflicted)
            assert ("LDGSTS.E.BYPASS.128" in body) == ("<float, 4>" in name), f"{name}: cp.async staging"
            assert "<float, 4>" in name or "STS.128" in body, f"{name}: no 128-bit shared stores"


# ---------------------------------------------------------------- python -m gmd_ext.selftest
def test_selftest_passes_here_and_reports_a_broken_kernel(monkeypatch, capsys):
    from gmd_ext import selftest

    assert selftest.main(["--device", "cpu", "--backend", "cpp", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "| cpu | cpp | gram | float32 |" in out and "FAIL" not in out
    rows = selftest.run(["cpu"], ["torch"])
    assert {r.op for r in rows} >= {"gram", "pcgrad_coefficients", "combine", "combine_rows", "modality_group_norm"}
    # A wrong kernel must show up as a failed row (and exit status 1), not pass silently.
    monkeypatch.setattr(selftest.ops, "combine_rows", lambda G, A, backend=None: (A @ G.float()).to(G.dtype) * 1.01)
    assert selftest.main(["--device", "cpu", "--backend", "torch"]) == 1
    assert "| cpu | torch | combine_rows | float32 |" in capsys.readouterr().out
    monkeypatch.setattr(selftest.ops, "gram", lambda G, backend=None: 1 / 0)
    bad = [r for r in selftest.run(["cpu"], ["torch"]) if r.op == "gram"]
    assert bad and not any(r.ok for r in bad) and "ZeroDivisionError" in bad[0].note


# ---------------------------------------------------------------- bench/gpu_check.py
def test_gpu_check_dry_run(tmp_path):
    """The one-command GPU check end to end on this CPU at tiny sizes (CI's dry run of it): the Triton warm-up,
    selftest, both test phases, the target rows (each with its target and verdict) and the full table, checked
    against references, CSV (shared fields + timestamp + git) and markdown under --out."""
    import csv
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_check.py"), "--dry-run", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, PYTHONPATH=root))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    ops_timed = {r["op"] for r in rows if r["GB_s"]}
    assert {"gram", "combine", "combine_rows", "group_norm_fwd", "group_norm_bwd", "pack_pairs"} <= ops_timed
    assert all(r["git_rev"] and r["timestamp"] and r["machine"] for r in rows)
    steps = {r["op"]: r["note"] for r in rows if r["op"].startswith("step:")}
    assert {k: steps.get(k) for k in ("step:warm-triton", "step:selftest", "step:tests")} == dict.fromkeys(
        ("step:warm-triton", "step:selftest", "step:tests"), "rc=0")
    assert steps["step:tests-slow"] in ("rc=0", "rc=5")  # 5: no slow test selected by the dry run's filter
    targets = {(r["op"], r["dtype"]): r for r in rows if r.get("target")}
    assert {op for op, _ in targets} == {"gram", "combine", "group_norm_fwd", "group_norm_bwd"}
    assert all(r["verdict"] in ("met", "missed") and float(r["of_copy"]) > 0 for r in targets.values())
    assert all(float(r["of_moved"]) > float(r["of_copy"]) for (op, _), r in targets.items() if "group_norm" in op)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| gram | cpp | K=15 N=4099 | float32 |" in md and "| combine_rows | cpp | K=4 N=4099 |" in md
    with pytest.raises(subprocess.CalledProcessError):  # a dry run never writes into bench/results
        subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_check.py"), "--dry-run"], check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=root), timeout=60)
