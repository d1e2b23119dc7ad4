"""masked_conv against the dense reference (every pair convolved with F.conv*d, then masked)."""
import pytest
import torch

from gmd_ext import _backend, masked_conv, testing
from gmd_ext.ops.reference import masked_conv_reference, present_index

# masked_conv has no Triton kernel: "triton" runs the torch form (test_triton_backend_is_the_torch_form), so the
# matrix below covers the two distinct implementations.
BACKENDS = [b for b in testing.backends_for("cpu") if b != "triton"]
needs_cpp = pytest.mark.skipif(not _backend.CPP_LOADED, reason="gmd_ext._C not built")


def _inputs(nsp, per_modality, bias_kind, B=3, M=4, Cin=3, Cout=5, size=6, k=3, dtype=torch.float64):
    x = torch.randn(B, M, Cin, *([size] * nsp), dtype=dtype)
    w = torch.randn(*((M,) if per_modality else ()), Cout, Cin, *([k] * nsp), dtype=dtype)
    b = {None: None, "shared": torch.randn(Cout, dtype=dtype), "per": torch.randn(M, Cout, dtype=dtype)}[bias_kind]
    return x, w, b


def _grads(out, inputs, g):
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, leaves, g, allow_unused=True)


def _check_against_reference(x, w, b, present, backend, **conv):
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = masked_conv(x, w, b, present, backend=backend, **conv)
    ref = masked_conv_reference(x, w, b, present, **conv)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(y, leaves, g), _grads(ref, leaves, g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
# Per-modality weights run as one grouped convolution over modality slots ("all", "modality_absent", "random")
# or, when that would waste most slots ("one_modality"), one convolution per modality: both are covered.
@pytest.mark.parametrize("mask", ["all", "modality_absent", "random", "one_modality"])
@pytest.mark.parametrize("per_modality", [False, True], ids=["shared", "per_modality"])
@pytest.mark.parametrize("nsp", [1, 2, 3])
def test_matches_dense_reference(nsp, per_modality, mask, backend):
    size, Cin = (4, 2) if nsp == 3 else (7, 3)  # float64 conv3d takes ATen's slow path: keep it tiny
    x, w, b = _inputs(nsp, per_modality, "per" if per_modality else "shared", size=size, Cin=Cin)
    _check_against_reference(x, w, b, testing.present_mask(mask, 3, 4), backend, padding=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["random", "one_modality"])
@pytest.mark.parametrize("per_modality,bias_kind", [(False, None), (False, "per"), (True, None), (True, "shared")])
def test_bias_variants(per_modality, bias_kind, mask, backend):
    x, w, b = _inputs(2, per_modality, bias_kind)
    _check_against_reference(x, w, b, testing.present_mask(mask, 3, 4), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conv", [
    dict(stride=2), dict(padding=2, dilation=2), dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
    dict(padding="same"), dict(padding="valid", stride=3),
], ids=["stride", "pad_dil", "tuples", "same", "valid_stride"])
def test_stride_padding_dilation(conv, backend):
    x, w, b = _inputs(2, True, "per", size=9)
    _check_against_reference(x, w, b, testing.present_mask("random", 3, 4), backend, **conv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_present_none_is_all_present(backend):
    x, w, b = _inputs(2, False, "shared")
    torch.testing.assert_close(masked_conv(x, w, b, backend=backend), masked_conv_reference(x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_pairs_are_never_read(backend):
    """NaN in absent slices must not leak into outputs or gradients: absent pairs are not computed at all."""
    x, w, b = _inputs(2, True, "per")
    present = testing.present_mask("modality_absent", 3, 4)
    x[~present] = float("nan")
    x.requires_grad_()
    w.requires_grad_()
    y = masked_conv(x, w, b, present, backend=backend)
    assert torch.isfinite(y).all() and (y[~present] == 0).all()
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert torch.isfinite(dw).all() and (dx[~present] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_modality_gets_zero_weight_grad(backend):
    x, w, b = _inputs(2, True, "per")
    present = testing.present_mask("modality_absent", 3, 4)
    w.requires_grad_()
    b.requires_grad_()
    y = masked_conv(x, w, b, present, backend=backend)
    dw, db = torch.autograd.grad((y * torch.randn_like(y)).sum(), (w, b))
    assert (dw[1] == 0).all() and (db[1] == 0).all()
    assert (dw[0] != 0).any() and (db[0] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_modality", [False, True], ids=["shared", "per_modality"])
def test_gradcheck(per_modality, backend):
    x, w, b = _inputs(1, per_modality, "per" if per_modality else "shared", B=2, M=3, Cin=2, Cout=2, size=5)
    present = torch.tensor([[True, False, True], [False, False, True]])
    leaves = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: masked_conv(x, w, b, present, stride=2, padding=1, backend=backend), leaves, fast_mode=True)


@pytest.mark.parametrize("dtype", testing.low_precision)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(dtype, backend):
    """fp16/bf16 error within 2x (values) / 3x (grads) of plain torch's at the same precision, vs fp32."""
    x, w, b = _inputs(2, True, "per", dtype=torch.float32, Cin=8, Cout=8, size=8)
    present = testing.present_mask("random", 3, 4)
    ref_in = [t.requires_grad_() for t in (x, w, b)]
    out_in = [t.detach().to(dtype).requires_grad_() for t in ref_in]
    base_in = [t.detach().to(dtype).requires_grad_() for t in ref_in]
    ref = masked_conv_reference(*ref_in, present, padding=1)
    out = masked_conv(*out_in, present, padding=1, backend=backend)
    base = masked_conv_reference(*base_in, present, padding=1)
    testing.assert_close_rel(out, ref, base)
    testing.assert_grads_close_rel((out, ref, base), (out_in, ref_in, base_in), ("x", "weight", "bias"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x, w, b = _inputs(2, False, "shared", size=8)
    xt = x.transpose(-1, -2)
    assert not xt.is_contiguous()
    present = testing.present_mask("random", 3, 4)
    torch.testing.assert_close(masked_conv(xt, w, b, present, backend=backend),
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


# ---------------------------------------------------------------- the registered ops
def _opcheck_cases():
    x, w, b = _inputs(1, True, "per", B=2, M=3, Cin=2, Cout=3, size=5)
    present = torch.tensor([[True, False, True], [False, False, True]])
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    g = torch.randn(2, 3, 3, 5, dtype=x.dtype)
    back = (g, x.detach(), w.detach(), b.detach(), present, [1], [1], [1])
    rows = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, -1, 2])
    return {
        "masked_conv_per_modality": ("masked_conv", (x, w, b, present, [2], [1], [1])),
        "masked_conv_shared": ("masked_conv", (x, w[0].detach().requires_grad_(), None, present, [1], [0], [2])),
        "backward_all": ("masked_conv_backward", (*back, [True, True, True])),
        "backward_weight_only": ("masked_conv_backward", (*back, [False, True, False])),
        "pack_pairs": ("pack_pairs", (rows, index)),
        "scatter_pairs": ("scatter_pairs", (rows[:3].detach().requires_grad_(), index, 6)),
    }


@needs_cpp
@pytest.mark.parametrize("case", ["masked_conv_per_modality", "masked_conv_shared", "backward_all",
                                  "backward_weight_only", "pack_pairs", "scatter_pairs"])
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
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.gmd_ext.pack_pairs(rows, torch.tensor([6]))
    with pytest.raises(RuntimeError, match="distinct"):
        torch.ops.gmd_ext.scatter_pairs(rows[:2], torch.tensor([1, 1]), 6)


# cpp: one opaque op with a static output shape; torch: the dense form while compiling (no data-dependent shapes).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_modality", [False, True], ids=["shared", "per_modality"])
def test_torch_compile_fullgraph(per_modality, backend):
    x, w, b = _inputs(2, per_modality, "per" if per_modality else "shared", dtype=torch.float32)
    present = testing.present_mask("random", 3, 4)
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def f(x, w, b, present):
        return masked_conv(x, w, b, present, padding=1, backend=backend).relu().sum(dim=2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, ref = compiled(*leaves, present), f(*leaves, present)
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
    (lambda x, w, p: masked_conv(x, w, None, torch.zeros_like(p)), ValueError, "no modality present"),
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
