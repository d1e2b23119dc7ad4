"""masked_conv against the dense reference (every pair convolved with F.conv*d, then masked)."""
import pytest
import torch

from gmd_ext import masked_conv, testing
from gmd_ext.ops import ds_ops
from gmd_ext.ops.ds_ops import PairPlan
from gmd_ext.ops.reference import masked_conv_reference, present_index

# masked_conv has no Triton kernel: "triton" runs the torch form (test_triton_backend_is_the_torch_form), so the
# matrix below covers the two distinct implementations, on every device (CUDA cells collected everywhere, skipped
# where absent).
BACKENDS = [b for b in testing.backends_for("cpu") if b != "triton"]
CASES = testing.device_backends(backends=("cpp", "torch"))


def _mc(device, x, w, b, present=None, **conv):
    """masked_conv on `device` (inputs moved there, result back on the CPU; differentiable); the mask stays on the
    host, where the data loader gives it."""
    return testing.call_on(device, lambda x, w, b: masked_conv(x, w, b, present, **conv), x, w, b)
needs_cpp = testing.needs_cpp


def _inputs(nsp, per_modality, bias_kind, B=3, M=4, Cin=3, Cout=5, size=6, k=3, dtype=torch.float64):
    x = torch.randn(B, M, Cin, *([size] * nsp), dtype=dtype)
    w = torch.randn(*((M,) if per_modality else ()), Cout, Cin, *([k] * nsp), dtype=dtype)
    b = {None: None, "shared": torch.randn(Cout, dtype=dtype), "per": torch.randn(M, Cout, dtype=dtype)}[bias_kind]
    return x, w, b


def _grads(out, inputs, g):
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, leaves, g, allow_unused=True)


def _check_against_reference(x, w, b, present, backend, device="cpu", **conv):
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = _mc(device, x, w, b, present, backend=backend, **conv)
    ref = masked_conv_reference(x, w, b, present, **conv)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(y, leaves, g), _grads(ref, leaves, g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device,backend", CASES)
# Per-modality weights run as one grouped convolution over modality slots ("all", "modality_absent", "random")
# or, when that would waste most slots ("one_modality"), one convolution per modality: both are covered.
@pytest.mark.parametrize("mask", ["all", "modality_absent", "random", "one_modality"])
@pytest.mark.parametrize("per_modality", [False, True], ids=["shared", "per_modality"])
@pytest.mark.parametrize("nsp", [1, 2, 3])
def test_matches_dense_reference(nsp, per_modality, mask, backend, device):
    size, Cin = (4, 2) if nsp == 3 else (7, 3)  # float64 conv3d takes ATen's slow path: keep it tiny
    x, w, b = _inputs(nsp, per_modality, "per" if per_modality else "shared", size=size, Cin=Cin)
    _check_against_reference(x, w, b, testing.present_mask(mask, 3, 4), backend, device, padding=1)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("mask", ["random", "one_modality"])
@pytest.mark.parametrize("per_modality,bias_kind", [(False, None), (False, "per"), (True, None), (True, "shared")])
def test_bias_variants(per_modality, bias_kind, mask, backend, device):
    x, w, b = _inputs(2, per_modality, bias_kind)
    _check_against_reference(x, w, b, testing.present_mask(mask, 3, 4), backend, device)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("conv", [
    dict(stride=2), dict(padding=2, dilation=2), dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
    dict(padding="same"), dict(padding="valid", stride=3),
], ids=["stride", "pad_dil", "tuples", "same", "valid_stride"])
def test_stride_padding_dilation(conv, backend, device):
    x, w, b = _inputs(2, True, "per", size=9)
    _check_against_reference(x, w, b, testing.present_mask("random", 3, 4), backend, device, **conv)


@pytest.mark.parametrize("device,backend", CASES)
def test_present_none_is_all_present(backend, device):
    x, w, b = _inputs(2, False, "shared")
    torch.testing.assert_close(_mc(device, x, w, b, backend=backend), masked_conv_reference(x, w, b))


@pytest.mark.parametrize("device,backend", CASES)
def test_absent_pairs_are_never_read(backend, device):
    """NaN in absent slices must not leak into outputs or gradients: absent pairs are not computed at all."""
    x, w, b = _inputs(2, True, "per")
    present = testing.present_mask("modality_absent", 3, 4)
    x[~present] = float("nan")
    x.requires_grad_()
    w.requires_grad_()
    y = _mc(device, x, w, b, present, backend=backend)
    assert torch.isfinite(y).all() and (y[~present] == 0).all()
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert torch.isfinite(dw).all() and (dx[~present] == 0).all()


@pytest.mark.parametrize("device,backend", CASES)
def test_absent_modality_gets_zero_weight_grad(backend, device):
    x, w, b = _inputs(2, True, "per")
    present = testing.present_mask("modality_absent", 3, 4)
    w.requires_grad_()
    b.requires_grad_()
    y = _mc(device, x, w, b, present, backend=backend)
    dw, db = torch.autograd.grad((y * torch.randn_like(y)).sum(), (w, b))
    assert (dw[1] == 0).all() and (db[1] == 0).all()
    assert (dw[0] != 0).any() and (db[0] != 0).any()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("per_modality", [False, True], ids=["shared", "per_modality"])
def test_gradcheck(per_modality, backend, device):
    x, w, b = _inputs(1, per_modality, "per" if per_modality else "shared", B=2, M=3, Cin=2, Cout=2, size=5)
    present = torch.tensor([[True, False, True], [False, False, True]])
    leaves = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: _mc(device, x, w, b, present, stride=2, padding=1, backend=backend), leaves, fast_mode=True)


@pytest.mark.parametrize("dtype", testing.low_precision)
@pytest.mark.parametrize("device,backend", CASES)
def test_low_precision(dtype, backend, device):
    """fp16/bf16 error within 2x (values) / 3x (grads) of plain torch's at the same precision, vs fp32."""
    x, w, b = _inputs(2, True, "per", dtype=torch.float32, Cin=8, Cout=8, size=8)
    present = testing.present_mask("random", 3, 4)
    ref_in = [t.requires_grad_() for t in (x, w, b)]
    out_in = [t.detach().to(dtype).requires_grad_() for t in ref_in]
    base_in = [t.detach().to(dtype).requires_grad_() for t in ref_in]
    ref = masked_conv_reference(*ref_in, present, padding=1)
    out = _mc(device, *out_in, present, padding=1, backend=backend)
    base = masked_conv_reference(*base_in, present, padding=1)
    testing.assert_close_rel(out, ref, base)
    testing.assert_grads_close_rel((out, ref, base), (out_in, ref_in, base_in), ("x", "weight", "bias"))


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_input(backend, device):
    x, w, b = _inputs(2, False, "shared", size=8)
    xt = x.transpose(-1, -2)
    assert not xt.is_contiguous()
    present = testing.present_mask("random", 3, 4)
    torch.testing.assert_close(_mc(device, xt, w, b, present, backend=backend),
                               masked_conv_reference(xt, w, b, present))


@pytest.mark.skipif("triton" not in testing.backends_for("cpu"), reason="triton unavailable")
def test_triton_backend_is_the_torch_form():
    x, w, b = _inputs(2, True, "per")
    present = testing.present_mask("random", 3, 4)
    torch.testing.assert_close(masked_conv(x, w, b, present, backend="triton"),
                               masked_conv(x, w, b, present, backend="torch"), rtol=0, atol=0)


def test_present_index_is_modality_major():
    present = torch.tensor([[True, False], [True, True]])
    assert present_index(present).tolist() == [0, 2, 3]
    plan = PairPlan(present, 2, 2, "cpu")
    assert plan.index.tolist() == [0, 2, 3] and plan.counts == (2, 1) and plan.starts == (0, 2)
    assert plan.modality.tolist() == [0, 0, 1] and plan.sample.tolist() == [0, 1, 1] and not plan.all_present


# ---------------------------------------------------------------- the registered ops
def _plan_args(present):
    plan = PairPlan(present, *present.shape, "cpu")
    return plan.index, list(plan.counts)


def _opcheck_cases():
    x, w, b = _inputs(1, True, "per", B=2, M=3, Cin=2, Cout=3, size=5)
    present = torch.tensor([[True, False, True], [False, False, True]])
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    g = torch.randn(2, 3, 3, 5, dtype=x.dtype)
    back = (g, x.detach(), w.detach(), b.detach(), *_plan_args(present), [1], [1], [1])
    rows = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, -1, 2])
    return {
        "masked_conv_per_modality": ("masked_conv", (x, w, b, *_plan_args(present), [2], [1], [1])),
        "masked_conv_shared": ("masked_conv", (x, w[0].detach().requires_grad_(), None, *_plan_args(present),
                                               [1], [0], [2])),
        "masked_conv_none_present": ("masked_conv", (x, w, b, torch.zeros(0, dtype=torch.long), [0, 0, 0],
                                                     [1], [1], [1])),
        "backward_all": ("masked_conv_backward", (*back, [True, True, True])),
        "backward_weight_only": ("masked_conv_backward", (*back, [False, True, False])),
        "pack_pairs": ("pack_pairs", (rows, index)),
        "scatter_pairs": ("scatter_pairs", (rows[:3].detach().requires_grad_(), index, 6)),
    }


@needs_cpp
@pytest.mark.parametrize("case", ["masked_conv_per_modality", "masked_conv_shared", "masked_conv_none_present",
                                  "backward_all", "backward_weight_only", "pack_pairs", "scatter_pairs"])
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.gmd_ext, name), args)


@needs_cpp
def test_pack_scatter_match_torch_indexing():
    rows = torch.randn(6, 4, 3)
    index = torch.tensor([4, 0, 2])
    torch.testing.assert_close(torch.ops.gmd_ext.pack_pairs(rows, index), rows[index], rtol=0, atol=0)
    out = torch.ops.gmd_ext.scatter_pairs(rows[:3], index, 6)
    want = torch.zeros(6, 4, 3)
    want[index] = rows[:3]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # -1 marks an empty slot: a zero row when packing, a dropped row when scattering.
    slots = torch.tensor([4, -1, 2])
    want = rows[[4, 0, 2]].clone()
    want[1] = 0
    torch.testing.assert_close(torch.ops.gmd_ext.pack_pairs(rows, slots), want, rtol=0, atol=0)
    want = torch.zeros(6, 4, 3)
    want[[4, 2]] = rows[[0, 2]]
    torch.testing.assert_close(torch.ops.gmd_ext.scatter_pairs(rows[:3], slots, 6), want, rtol=0, atol=0)


@needs_cpp
def test_pack_pairs_of_no_rows_gives_zero_slots():
    """x with 0 rows and an all -1 index: every output row is an empty slot, so zeros (never uninitialised)."""
    for _ in range(3):  # fresh allocations: garbage from an earlier tensor would show
        junk = torch.full((3, 4, 5), float("nan"))
        del junk
        out = torch.ops.gmd_ext.pack_pairs(torch.empty(0, 4, 5), torch.full((3,), -1))
        assert out.shape == (3, 4, 5) and (out == 0).all()


def _direct_op_cases():
    x, w, b = _inputs(2, True, "per", B=2, M=3, Cin=2, Cout=3, size=5, dtype=torch.float32)
    present = torch.tensor([[True, False, True], [False, False, True]])
    index, counts = _plan_args(present)
    g = torch.randn(2, 3, 3, 5, 5)
    conv = ([1, 1], [1, 1], [1, 1])
    mask = [True, True, True]
    mc, mcb = torch.ops.gmd_ext.masked_conv, torch.ops.gmd_ext.masked_conv_backward
    pack, scatter = torch.ops.gmd_ext.pack_pairs, torch.ops.gmd_ext.scatter_pairs
    rows = torch.randn(6, 4)
    return {
        "x_0d": (lambda: mc(x[0, 0, 0, 0, 0], w, b, index, counts, *conv), ValueError, "masked_conv: x must be"),
        "x_int": (lambda: mc(x.int(), w.int(), None, index, counts, *conv), TypeError, "x must be a floating"),
        "w_shape": (lambda: mc(x, w[:2], b, index, counts, *conv), ValueError, "masked_conv: weight must be"),
        "w_cin": (lambda: mc(x, w[:, :, :1], b, index, counts, *conv), ValueError, "weight's Cin"),
        "w_dtype": (lambda: mc(x, w.double(), b, index, counts, *conv), TypeError, "weight must have x's dtype"),
        "b_shape": (lambda: mc(x, w, b[:, :2], index, counts, *conv), ValueError, "masked_conv: bias must be"),
        "b_dtype": (lambda: mc(x, w, b.double(), index, counts, *conv), TypeError, "bias must have x's dtype"),
        "index_dtype": (lambda: mc(x, w, b, index.int(), counts, *conv), TypeError, "index must be an int64"),
        "index_2d": (lambda: mc(x, w, b, index[None], counts, *conv), ValueError, "index must be 1-D"),
        "counts_len": (lambda: mc(x, w, b, index, counts[:2], *conv), ValueError, "counts must hold one"),
        "counts_sum": (lambda: mc(x, w, b, index, [1, 0, 1], *conv), ValueError, "counts sum to 2"),
        "counts_neg": (lambda: mc(x, w, b, index, [2, -1, 2], *conv), ValueError, r"counts\[1\] = -1"),
        "index_range": (lambda: mc(x, w, b, torch.tensor([0, 6, 5]), counts, *conv), ValueError,
                        "must be a pair"),
        "index_order": (lambda: mc(x, w, b, torch.tensor([2, 0, 5]), counts, *conv), ValueError,
                        "modality-major"),
        "index_repeat": (lambda: mc(x, w, b, torch.tensor([0, 0, 5]), [2, 0, 1], *conv), ValueError, "distinct"),
        "stride_len": (lambda: mc(x, w, b, index, counts, [1], [1, 1], [1, 1]), ValueError,
                       "one entry per spatial dim"),
        "stride_zero": (lambda: mc(x, w, b, index, counts, [0, 1], [1, 1], [1, 1]), ValueError,
                        "stride and dilation must be >= 1"),
        "too_small": (lambda: mc(x, w, b, index, counts, [1, 1], [0, 0], [3, 3]), ValueError,
                      "smaller than the dilated kernel"),
        "grad_0d": (lambda: mcb(g[0, 0, 0, 0, 0], x, w, b, index, counts, *conv, mask), ValueError,
                    "grad_y must be the output's shape"),
        "grad_shape": (lambda: mcb(g[:, :, :2], x, w, b, index, counts, *conv, mask), ValueError,
                       "grad_y must be the output's shape"),
        "grad_dtype": (lambda: mcb(g.double(), x, w, b, index, counts, *conv, mask), TypeError,
                       "grad_y must have x's dtype"),
        "bwd_counts": (lambda: mcb(g, x, w, b, index, [3, 0, 0], *conv, mask), ValueError, "must lie in"),
        "pack_0d": (lambda: pack(torch.tensor(1.0), torch.tensor([0])), ValueError, "pack_pairs: x must be"),
        "pack_float_index": (lambda: pack(rows, torch.tensor([0.0])), TypeError, "pack_pairs: index must be"),
        "pack_range": (lambda: pack(rows, torch.tensor([6])), ValueError, "out of range"),
        "pack_repeat": (lambda: pack(rows, torch.tensor([1, 1])), ValueError, "distinct"),
        "scatter_0d": (lambda: scatter(torch.tensor(1.0), torch.tensor([0]), 6), ValueError,
                       "scatter_pairs: y must be"),
        "scatter_rows": (lambda: scatter(rows, torch.tensor([0]), 6), ValueError, "index has 1 entries"),
        "scatter_num": (lambda: scatter(rows[:1], torch.tensor([0]), -1), ValueError, "num_pairs must be >= 0"),
        "scatter_range": (lambda: scatter(rows[:1], torch.tensor([6]), 6), ValueError, "out of range"),
        "scatter_repeat": (lambda: scatter(rows[:2], torch.tensor([1, 1]), 6), ValueError, "distinct"),
    }


@needs_cpp
@pytest.mark.parametrize("case", list(_direct_op_cases()))
def test_direct_op_call_rejects_bad_arguments(case):
    """Every masked_conv-family op checks its arguments in C++: a clean ValueError / TypeError naming the op and
    the argument, never a crash or a vendor-library error."""
    call, exc, match = _direct_op_cases()[case]
    with pytest.raises(exc, match=match):
        call()


# The plan is an input: the ops read no device value on the host, so both backends trace whole (no graph break,
# no data-dependent shape) and compiled equals eager.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_modality", [False, True], ids=["shared", "per_modality"])
@pytest.mark.parametrize("mask", ["random", "one_modality"])
def test_torch_compile_fullgraph(mask, per_modality, backend):
    x, w, b = _inputs(2, per_modality, "per" if per_modality else "shared", dtype=torch.float32)
    plan = PairPlan(testing.present_mask(mask, 3, 4), 3, 4, "cpu")
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def f(x, w, b, plan):
        return masked_conv(x, w, b, plan, padding=1, backend=backend).relu().sum(dim=2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, ref = compiled(*leaves, plan), f(*leaves, plan)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(y, leaves, g), _grads(ref, leaves, g)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w, p: masked_conv(x[0, 0], w, None, p), ValueError, r"x must be \[B, M, C, \*S\]"),
    (lambda x, w, p: masked_conv(x.int(), w, None, p), TypeError, "x must be float"),
    (lambda x, w, p: masked_conv(x, w[:, :, :2], None, p), ValueError, "weight's Cin"),
    (lambda x, w, p: masked_conv(x, w[0, 0], None, p), ValueError, "weight must be shared"),
    (lambda x, w, p: masked_conv(x, w[:3], None, p), ValueError, "per-modality weight"),
    (lambda x, w, p: masked_conv(x, w.double(), None, p), TypeError, "weight must have x's dtype"),
    (lambda x, w, p: masked_conv(x, w, torch.zeros(7), p), ValueError, "bias must be None"),
    (lambda x, w, p: masked_conv(x, w, None, p.float()), TypeError, "present must have dtype torch.bool"),
    (lambda x, w, p: masked_conv(x, w, None, p[:, :2]), ValueError, r"present must be \[B, M\]"),
    (lambda x, w, p: masked_conv(x, w, None, torch.zeros_like(p)), ValueError, "samples .* have none"),
    (lambda x, w, p: masked_conv(x, w, None, PairPlan(p[:2], 2, 4, "cpu")), ValueError, "PairPlan for"),
    (lambda x, w, p: masked_conv(x, w, None, p, stride=0), ValueError, "stride must be >= 1"),
    (lambda x, w, p: masked_conv(x, w, None, p, padding=(1, 1, 1)), ValueError, "padding must be an int"),
    (lambda x, w, p: masked_conv(x, w, None, p, padding="full"), ValueError, "padding must be"),
    (lambda x, w, p: masked_conv(x, w, None, p, padding="same", stride=2), ValueError, "'same' needs stride 1"),
    (lambda x, w, p: masked_conv(x[..., :2, :2], w, None, p), ValueError, "smaller than the dilated kernel"),
    (lambda x, w, p: masked_conv(x, w, None, p, backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs(call, exc, match):
    x, w, _ = _inputs(2, True, None, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        call(x, w, torch.ones(3, 4, dtype=torch.bool))


# ---------------------------------------------------------------- batched backward (vmap rules)
def _vmapped_vjp(out, leaves, cotangents):
    """The V vector-Jacobian products of `out` as one functorch-vmapped backward (what GMD(strategy="branches")
    runs through a branch), and as V separate backward passes."""
    batched = torch.func.vmap(lambda c: torch.autograd.grad(out, leaves, c, retain_graph=True))(cotangents)
    single = [torch.autograd.grad(out, leaves, c, retain_graph=True) for c in cotangents]
    return batched, [torch.stack(t) for t in zip(*single)]


@needs_cpp
@pytest.mark.parametrize("device", testing.device_params())
def test_pack_scatter_batched_backward_equals_per_cotangent(device):
    """gmd_ext::pack_pairs / scatter_pairs under torch.func.vmap (their vmap rules): equal, exactly, to one
    backward per cotangent, and one op call per batch (no per-cotangent fallback loop)."""
    present = testing.present_mask("random", 3, 4)
    plan = PairPlan(present, 3, 4, device)
    x = torch.randn(3, 4, 2, 5, device=device, requires_grad=True)
    rows = ds_ops.pack(x, plan, backend="cpp")
    out = ds_ops.scatter(rows * 2, plan, backend="cpp")
    cotangents = torch.randn(6, *out.shape, device=device)
    batched, single = _vmapped_vjp(out, [x], cotangents)
    torch.testing.assert_close(batched[0], single[0], rtol=0, atol=0)
    with torch.profiler.profile() as prof:
        torch.func.vmap(lambda c: torch.autograd.grad(out, [x], c, retain_graph=True))(cotangents)
    calls = {e.key: e.count for e in prof.key_averages()}
    # The batched call and the rule's one call on the whole batch; the fallback would call once per cotangent.
    assert calls["gmd_ext::pack_pairs"] <= 2 and calls["gmd_ext::scatter_pairs"] <= 2, calls
