"""modality_group_norm against the dense reference (F.group_norm per modality with its affine, then masked)."""
import pytest
import torch

from gmd_ext import modality_group_norm, testing
from gmd_ext.ops.reference import modality_group_norm_reference
from gmd_ext.testing import call_on as _on

CASES = testing.device_backends()  # devices x backends, absent ones skipped
ACTIVATIONS = [None, "relu", "leaky_relu"]
needs_cpp = testing.needs_cpp


def _inputs(nsp, B=3, M=4, C=6, size=5, dtype=torch.float64):
    x = torch.randn(B, M, C, *([size] * nsp), dtype=dtype) * 2 + 0.5
    return x, torch.randn(M, C, dtype=dtype), torch.randn(M, C, dtype=dtype)


def _grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g)


# Triton runs through the CPU interpreter at seconds per case: its all-present case is left to 'random'.
_REFERENCE_CASES = [pytest.param(*c.values, m, marks=c.marks, id=f"{c.id}-{m}") for c in CASES
                    for m in ("all", "modality_absent", "random")
                    if not (c.values == ("cpu", "triton") and m == "all")]


@pytest.mark.parametrize("device,backend,mask", _REFERENCE_CASES)
@pytest.mark.parametrize("nsp,activation", [(1, None), (2, "relu"), (3, "leaky_relu"), (2, None), (1, "leaky_relu")])
def test_matches_dense_reference(nsp, mask, activation, device, backend):
    x, w, b = (t.requires_grad_() for t in _inputs(nsp, size=4 if nsp == 3 else 5))
    present = testing.present_mask(mask, 3, 4)
    y = _on(device, modality_group_norm, x, w, b, present, num_groups=3, activation=activation, backend=backend)
    ref = modality_group_norm_reference(x, w, b, present, num_groups=3, activation=activation)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(y, (x, w, b), g), _grads(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("num_groups", [1, 2, 6])
def test_group_counts_and_eps(num_groups, device, backend):
    x, w, b = _inputs(2)
    present = testing.present_mask("random", 3, 4)
    torch.testing.assert_close(
        _on(device, modality_group_norm, x, w, b, present, num_groups=num_groups, eps=0.1, backend=backend),
        modality_group_norm_reference(x, w, b, present, num_groups=num_groups, eps=0.1))


@pytest.mark.parametrize("device,backend", CASES)
def test_absent_pairs(device, backend):
    """Absent pairs: zero output, zero dx, no contribution to the affine grads (NaN there must not leak)."""
    x, w, b = _inputs(2)
    present = testing.present_mask("modality_absent", 3, 4)
    x[~present] = float("nan")
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = _on(device, modality_group_norm, x, w, b, present, num_groups=2, activation="relu", backend=backend)
    assert torch.isfinite(y).all() and (y[~present] == 0).all()
    dx, dw, db = _grads(y, (x, w, b), torch.randn_like(y))
    assert (dx[~present] == 0).all() and torch.isfinite(dx).all()
    assert (dw[1] == 0).all() and (db[1] == 0).all()
    assert (dw[0] != 0).any() and (db[0] != 0).any()


# Not triton: under the CPU interpreter each call costs ~0.1 s and gradcheck makes hundreds; the triton values and
# gradients are checked against the float64 reference in test_matches_dense_reference.
@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "triton"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation, device, backend):
    x, w, b = _inputs(1, B=2, M=3, C=4, size=3)
    # Keep pre-activations away from the kink at 0, where finite differences of relu are meaningless.
    b = b + torch.sign(b) * 0.5
    present = torch.tensor([[True, False, True], [False, False, True]])
    leaves = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: _on(device, modality_group_norm, x, w, b, present, num_groups=2, activation=activation,
                                            backend=backend), leaves, fast_mode=True)


@pytest.mark.parametrize("dtype", testing.low_precision)
@pytest.mark.parametrize("device,backend", CASES)
def test_low_precision(dtype, device, backend):
    """fp16/bf16 error within 2x (values) / 3x (grads) of plain torch's at the same precision, vs fp32."""
    x, w, b = _inputs(2, C=8, size=8, dtype=torch.float32)
    present = testing.present_mask("random", 3, 4)
    ref_in = [t.requires_grad_() for t in (x, w, b)]
    # The affine parameters stay fp32 (mixed-precision training); x is low precision.
    out_in = [x.detach().to(dtype).requires_grad_(), w.detach().clone().requires_grad_(),
              b.detach().clone().requires_grad_()]
    base_in = [x.detach().to(dtype).requires_grad_(), w.detach().clone().requires_grad_(),
               b.detach().clone().requires_grad_()]
    kw = dict(num_groups=4, activation="leaky_relu")
    ref = modality_group_norm_reference(*ref_in, present, **kw)
    out = _on(device, modality_group_norm, *out_in, present, backend=backend, **kw)
    base = modality_group_norm_reference(*base_in, present, **kw)
    assert out.dtype == dtype
    testing.assert_close_rel(out, ref, base)
    testing.assert_grads_close_rel((out, ref, base), (out_in, ref_in, base_in), ("x", "weight", "bias"))


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_and_constant_input(device, backend):
    x, w, b = _inputs(2, size=6)
    x[0, 0] = 3.0  # zero variance: rstd = 1/sqrt(eps), output = bias
    xt = x.transpose(-1, -2)
    present = testing.present_mask("all", 3, 4)
    y = _on(device, modality_group_norm, xt, w, b, present, num_groups=3, backend=backend)
    torch.testing.assert_close(y, modality_group_norm_reference(xt, w, b, present, num_groups=3))
    torch.testing.assert_close(y[0, 0], b[0].view(-1, 1, 1).expand(-1, 6, 6))


# ---------------------------------------------------------------- the registered ops
def _op_args(dtype=torch.float64):
    x, w, b = _inputs(1, B=2, M=3, C=4, size=5, dtype=dtype)
    present = torch.tensor([[True, False, True], [False, True, True]])
    return x, w, b, present


@needs_cpp
@pytest.mark.parametrize("activation", ["none", "leaky_relu"])
def test_opcheck_fwd(activation):
    x, w, b, present = _op_args()
    leaves = [t.requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(torch.ops.gmd_ext.modality_group_norm_fwd, (*leaves, present, 2, 1e-5, activation))


@needs_cpp
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False]])
def test_opcheck_bwd(mask):
    x, w, b, present = _op_args()
    _, mean, rstd = torch.ops.gmd_ext.modality_group_norm_fwd(x, w, b, present, 2, 1e-5, "relu")
    torch.library.opcheck(torch.ops.gmd_ext.modality_group_norm_bwd,
                          (torch.randn_like(x), x, w, b, present, mean, rstd, 2, "relu", mask))


@needs_cpp
def test_statistics_outputs():
    x, w, b, present = _op_args()
    _, mean, rstd = torch.ops.gmd_ext.modality_group_norm_fwd(x, w, b, present, 2, 1e-5, "none")
    groups = x.reshape(2, 3, 2, -1)
    torch.testing.assert_close(mean, torch.where(present[..., None], groups.mean(-1), 0))
    want_rstd = (groups.var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(rstd, torch.where(present[..., None], want_rstd, 0))
    assert mean.dtype == torch.float64
    _, mean16, _ = torch.ops.gmd_ext.modality_group_norm_fwd(x.half(), w, b, present, 2, 1e-5, "none")
    assert mean16.dtype == torch.float32


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
def test_torch_compile_fullgraph(device, backend):
    x, w, b = (t.float().to(device).requires_grad_() for t in _inputs(2))
    present = testing.present_mask("random", 3, 4).to(device)

    def f(x, w, b, present):
        return modality_group_norm(x, w, b, present, num_groups=3, activation="relu", backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, ref = compiled(x, w, b, present), f(x, w, b, present)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(y, (x, w, b), g), _grads(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w, b, p: modality_group_norm(x[0, 0], w, b, p, num_groups=2), ValueError, r"x must be \[B, M, C"),
    (lambda x, w, b, p: modality_group_norm(x.long(), w, b, p, num_groups=2), TypeError, "x must be float"),
    (lambda x, w, b, p: modality_group_norm(x, w[:2], b, p, num_groups=2), ValueError, r"weight must be \[M, C\]"),
    (lambda x, w, b, p: modality_group_norm(x, w, b[:, :3], p, num_groups=2), ValueError, r"bias must be \[M, C\]"),
    (lambda x, w, b, p: modality_group_norm(x, w, None, p, num_groups=2), TypeError, "bias must be a torch.Tensor"),
    (lambda x, w, b, p: modality_group_norm(x, w, b, p, num_groups=4), ValueError, "must divide the channel dim"),
    (lambda x, w, b, p: modality_group_norm(x, w, b, p, num_groups=0), ValueError, "num_groups must be a positive"),
    (lambda x, w, b, p: modality_group_norm(x, w, b, p, num_groups=2, activation="gelu"), ValueError,
     "activation must be one of"),
    (lambda x, w, b, p: modality_group_norm(x, w, b, p, num_groups=2, eps=-1.0), ValueError, "eps must be"),
    (lambda x, w, b, p: modality_group_norm(x, w, b, p.int(), num_groups=2), TypeError, "present must have dtype"),
    (lambda x, w, b, p: modality_group_norm(x, w, b, p.T, num_groups=2), ValueError, r"present must be \[B, M\]"),
    (lambda x, w, b, p: modality_group_norm(x, w, b, p & torch.tensor([[False] * 4, [True] * 4, [True] * 4]),
                                            num_groups=2), ValueError, r"sample\(s\) \[0\] have no modality"),
])
def test_bad_inputs(call, exc, match):
    x, w, b = _inputs(2, C=6, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        call(x, w, b, torch.ones(3, 4, dtype=torch.bool))


@needs_cpp
def test_op_rejects_unknown_activation():
    x, w, b, present = _op_args()
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.gmd_ext.modality_group_norm_fwd(x, w, b, present, 2, 1e-5, "gelu")


# ---------------------------------------------------------------- Triton kernels compile for sm_90
_AOT_SCRIPT = """
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gmd_ext.triton import modality_group_norm as tgn
kernel, out_bf16, path = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
data, x = ("*u16", "*bf16") if out_bf16 else ("*fp32", "*fp32")
sizes = {"M": "i32", "C": "i32", "G": "i32", "L": "i32", "splits": "i32"}
# The element-wise passes (normalise + affine + activation, and dx) carry the bytes; the statistics kernels are
# reductions over CHUNK elements.
constexprs = {"ACT": 2, "ACC": tl.float32, "OUT_BF16": out_bf16, "BLOCK": tgn.BLOCK}
warps = tgn.NUM_WARPS
if kernel == "fwd":
    fn = tgn._apply_kernel
    sig = {"x_ptr": x, "w_ptr": "*fp32", "b_ptr": "*fp32", "present_ptr": "*u8", "mean_ptr": "*fp32",
           "rstd_ptr": "*fp32", "y_ptr": data, **sizes}
elif kernel == "stats":  # chunk moments: max, scaled sum, centred scaled squares; fp64 partials
    fn, warps = tgn._stats_kernel, tgn.CHUNK_WARPS
    sig = {"x_ptr": x, "present_ptr": "*u8", "part_ptr": "*fp64", "G": "i32", "n": "i32", "chunks": "i32"}
    constexprs = {"ACC": tl.float32, "CHUNK": tgn.CHUNK}
elif kernel == "merge":  # the parallel Chan merge (tl.reduce over moments) and the scaled-domain finalize
    fn = tgn._merge_kernel
    sig = {"part_ptr": "*fp64", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "chunks": "i32", "eps": "fp32"}
    constexprs = {"MERGE_BLOCK": tgn.MERGE_BLOCK}
elif kernel == "bwd_merge":
    fn = tgn._bwd_merge_kernel
    sig = {"part_ptr": "*fp64", "w_ptr": "*fp32", "present_ptr": "*u8", "dg_ptr": "*fp32", "db_ptr": "*fp32",
           "coef_ptr": "*fp32", "M": "i32", "C": "i32", "G": "i32", "L": "i32", "chunks": "i32"}
    constexprs = {"MERGE_BLOCK": tgn.MERGE_BLOCK}
else:
    fn = tgn._bwd_apply_kernel
    sig = {"gy_ptr": x, "x_ptr": x, "w_ptr": "*fp32", "b_ptr": "*fp32", "present_ptr": "*u8", "mean_ptr": "*fp32",
           "rstd_ptr": "*fp32", "coef_ptr": "*fp32", "dx_ptr": data, **sizes}
sig.update({k: "constexpr" for k in constexprs})
compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
assert "sm_90" in compiled.asm["ptx"]
open(path, "wb").write(compiled.asm["cubin"])
"""


@pytest.mark.parametrize("kernel,out_bf16", [("fwd", False), ("fwd", True), ("bwd", False), ("bwd", True),
                                             ("stats", False), ("merge", False), ("bwd_merge", False)])
def test_aot_compile_sm90(kernel, out_bf16, tmp_path):
    """The Triton kernels compile to sm_90 cubins without a GPU (Triton's bundled ptxas) at the launcher's block
    size, with no register spills (the rule BLOCK / NUM_WARPS were chosen by). Compiled in a fresh process without
    TRITON_INTERPRET: in this process the interpreter has patched triton.language, which the compiler trips on."""
    import os
    import shutil
    import subprocess
    import sys

    import triton

    nvidia_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(nvidia_bin, "ptxas")) and shutil.which("ptxas") is None:
        pytest.skip("no ptxas (Triton's bundled one or on PATH): cannot build an sm_90 cubin here")
    cubin = tmp_path / "kernel.cubin"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", _AOT_SCRIPT, kernel, "1" if out_bf16 else "0", str(cubin)], env=env,
                   check=True, timeout=300)
    assert cubin.stat().st_size > 0
    cuobjdump = os.path.join(nvidia_bin, "cuobjdump")
    if not os.path.exists(cuobjdump):
        return
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    assert "STACK:0 " in line, f"register spills: {line.strip()}"


# ---------------------------------------------------------------- large finite inputs (fp32 statistics overflow)
@pytest.mark.parametrize("device,backend", testing.device_backends())
@pytest.mark.parametrize("magnitude", [1e19, 1e25, 1e30, 3e37])
def test_large_inputs_do_not_overflow(device, backend, magnitude):
    """Squares of |x - mean| > 1.8e19 overflow fp32: the statistics must come out as fp64 truth says, not rstd = 0
    (output = bias) or NaN. Every backend, against fp64 F.group_norm on the same fp32 values."""
    x, w, b = _inputs(2, B=2, M=2, C=4, size=6, dtype=torch.float32)
    x = (x * magnitude).to(device)
    w, b = w.to(device), b.to(device)
    present = torch.tensor([[True, False], [True, True]], device=device)
    y = modality_group_norm(x, w, b, present, num_groups=2, backend=backend)
    ref = modality_group_norm_reference(x.double(), w.double(), b.double(), present, num_groups=2)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    bias_only = b[None, :, :, None, None].expand_as(y)
    assert (y - bias_only)[present].abs().max() > 0.1  # normalised, not collapsed to the bias


# ---------------------------------------------------------------- any magnitude: subnormal to the dtype's max
def _float64_group_norm(x, w, b, present, num_groups, eps):
    """F.group_norm computed in float64 on x's values (the ground truth for every dtype)."""
    return modality_group_norm_reference(x.double(), w.double(), b.double(), present, num_groups=num_groups, eps=eps)


def _check_grads_finite_and_close(y, ref_fn, leaves):
    g = torch.randn_like(y)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(ref_fn(*ref_leaves), ref_leaves, g.double())
    for got, exp in zip(torch.autograd.grad(y, leaves, g), want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", testing.device_backends())
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e-40), (torch.float64, 1e-310)])
def test_subnormal_groups(device, backend, dtype, magnitude):
    """Groups of subnormal values (fp32 < 1.2e-38, fp64 < 2.2e-308): the chunk scale 2^-e is beyond the dtype's range
    (2^133 for 1e-40 fp32), so it is applied as two factors; before, it overflowed to inf and the output was NaN. At the
    default eps the variance vanishes next to eps, so the truth is the bias plus a vanishing term: F.group_norm in
    float64 says what it is. Forward and backward, every backend."""
    x, w, b = _inputs(2, B=2, M=2, C=4, size=6, dtype=dtype)
    x = (x * magnitude).to(device)
    assert (x.abs() < torch.finfo(dtype).tiny).all() and (x != 0).any()
    w, b = w.to(device), b.to(device)
    present = torch.tensor([[True, False], [True, True]], device=device)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = modality_group_norm(x, w, b, present, num_groups=2, backend=backend)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), _float64_group_norm(x, w, b, present, 2, 1e-5), rtol=1e-6, atol=1e-6)
    _check_grads_finite_and_close(
        y, lambda *t: modality_group_norm_reference(*t, present, num_groups=2), (x, w, b))


@pytest.mark.parametrize("device,backend", testing.device_backends())
@pytest.mark.parametrize("dtype,magnitude,k", [(torch.float32, 1e-30, 100), (torch.float64, 1e-300, 996)])
def test_tiny_groups_without_eps(device, backend, dtype, magnitude, k):
    """eps = 0 on tiny groups: the normalised values must come out exactly (not the bias, not NaN), although the
    variance (1e-600 for fp64) is below the dtype's range: F.group_norm with eps = 0 is scale invariant, so its float64
    result on x * 2^k is the truth. Before, fp64 1e-300 gave NaN (the squared scale overflowed)."""
    x, w, b = _inputs(2, B=2, M=2, C=4, size=6, dtype=dtype)
    x, w, b = (x * magnitude).to(device), w.to(device), b.to(device)
    present = torch.tensor([[True, True], [False, True]], device=device)
    y = modality_group_norm(x, w, b, present, num_groups=2, eps=0.0, backend=backend)
    ref = _float64_group_norm(torch.ldexp(x.double(), torch.tensor(k)), w, b, present, 2, 0.0)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    bias_only = b[None, :, :, None, None].expand_as(y)
    assert (y - bias_only)[present].abs().max() > 0.1  # normalised, not collapsed to the bias


@pytest.mark.parametrize("device,backend", testing.device_backends())
@pytest.mark.parametrize("dtype,scales", [(torch.float32, (1e-30, 1.0, 1e20, 1e-40)),
                                          (torch.float64, (1e-300, 1.0, 1e150, 1e-310))])
def test_chunks_of_different_magnitudes(device, backend, dtype, scales):
    """A group of 4 x 4096 + 5 elements (several chunks on every backend: CPU 1024, CUDA / Triton 4096) whose chunks
    differ by up to 1e460 in magnitude: the merges rescale each chunk's moments to the largest exponent exactly.
    Forward and backward against float64 F.group_norm on the same values."""
    n = 4 * 4096 + 5
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 1, n, generator=g, dtype=torch.float64)
    for i, scale in enumerate(scales):
        x[..., i * 4096:(i + 1) * 4096] *= scale
    x = (x + 0.25 * scales[2]).to(dtype).to(device)  # a mean far from 0: the centring matters
    w, b = torch.randn(2, 1, generator=g).to(dtype).to(device), torch.randn(2, 1, generator=g).to(dtype).to(device)
    present = torch.tensor([[True, True]], device=device)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = modality_group_norm(x, w, b, present, num_groups=1, backend=backend)
    torch.testing.assert_close(y.double(), _float64_group_norm(x, w, b, present, 1, 1e-5), rtol=1e-5, atol=1e-5)
    _check_grads_finite_and_close(
        y, lambda *t: modality_group_norm_reference(*t, present, num_groups=1), (x, w, b))


@pytest.mark.parametrize("device,backend", testing.device_backends())
def test_fp32_near_max(device, backend):
    """fp32 values up to 3e38 (the largest finite is 3.4e38): sums of such values overflow fp32, so the statistics
    used to be inf/NaN and the output the bias or NaN (issue 21). Forward and backward against float64."""
    g = torch.Generator().manual_seed(3)
    x = ((torch.rand(2, 2, 4, 6, 6, generator=g, dtype=torch.float64) * 2 - 1) * 3e38).float().to(device)
    w = torch.randn(2, 4, generator=g).to(device)
    b = torch.randn(2, 4, generator=g).to(device)
    present = torch.tensor([[True, True], [True, False]], device=device)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = modality_group_norm(x, w, b, present, num_groups=2, backend=backend)
    torch.testing.assert_close(y.double(), _float64_group_norm(x, w, b, present, 2, 1e-5), rtol=1e-4, atol=1e-4)
    _check_grads_finite_and_close(
        y, lambda *t: modality_group_norm_reference(*t, present, num_groups=2), (x, w, b))


# ---------------------------------------------------------------- direct op calls are checked (never a crash)
_BAD_OP_SCRIPT = r"""
import json, sys, torch
import gmd_ext  # noqa: F401  (loads the ops)
op_f, op_b = torch.ops.gmd_ext.modality_group_norm_fwd, torch.ops.gmd_ext.modality_group_norm_bwd
x = torch.randn(2, 3, 4, 5)
w, b = torch.randn(3, 4), torch.randn(3, 4)
p = torch.ones(2, 3, dtype=torch.bool)
y, mean, rstd = op_f(x, w, b, p, 2, 1e-5, "none")
g = torch.randn_like(x)
m = [True, True, True]
cases = {
    "mean_larger": lambda: op_b(g, x, w, b, p, torch.zeros(2, 3, 64), rstd, 2, "none", m),
    "mean_smaller": lambda: op_b(g, x, w, b, p, mean[:, :2], rstd, 2, "none", m),
    "rstd_flat": lambda: op_b(g, x, w, b, p, mean, rstd.flatten(), 2, "none", m),
    "mean_dtype": lambda: op_b(g, x, w, b, p, mean.double(), rstd, 2, "none", m),
    "grad_y_0d": lambda: op_b(torch.tensor(1.0), x, w, b, p, mean, rstd, 2, "none", m),
    "grad_y_shape": lambda: op_b(g[:, :, :2], x, w, b, p, mean, rstd, 2, "none", m),
    "grad_y_int": lambda: op_b(g.int(), x, w, b, p, mean, rstd, 2, "none", m),
    "x_int": lambda: op_f(x.int(), w, b, p, 2, 1e-5, "none"),
    "x_2d": lambda: op_f(x[0, 0], w, b, p, 2, 1e-5, "none"),
    "weight_shape": lambda: op_f(x, w[:2], b, p, 2, 1e-5, "none"),
    "bias_int": lambda: op_f(x, w, b.long(), p, 2, 1e-5, "none"),
    "present_float": lambda: op_f(x, w, b, p.float(), 2, 1e-5, "none"),
    "groups": lambda: op_f(x, w, b, p, 3, 1e-5, "none"),
    "eps": lambda: op_f(x, w, b, p, 2, -1.0, "none"),
    "activation": lambda: op_f(x, w, b, p, 2, 1e-5, "gelu"),
}
out = {}
for name, call in cases.items():
    try:
        call()
        out[name] = ["no error", ""]
    except Exception as e:  # noqa: BLE001
        out[name] = [type(e).__name__, str(e).splitlines()[0]]
print(json.dumps(out))
"""

_BAD_OP_EXPECT = {
    "mean_larger": ("ValueError", r"mean must be \[B, M, num_groups\] = \[2, 3, 2\]"),
    "mean_smaller": ("ValueError", "mean must be"),
    "rstd_flat": ("ValueError", "rstd must be"),
    "mean_dtype": ("TypeError", "mean must be Float"),
    "grad_y_0d": ("ValueError", "grad_y must have x's shape"),
    "grad_y_shape": ("ValueError", "grad_y must have x's shape"),
    "grad_y_int": ("TypeError", "grad_y must be floating"),
    "x_int": ("TypeError", "x must be float64, float32"),
    "x_2d": ("ValueError", r"x must be \[B, M, C, \*S\]"),
    "weight_shape": ("ValueError", r"weight must be \[M, C\]"),
    "bias_int": ("TypeError", "weight and bias must be floating"),
    "present_float": ("ValueError", "present must be bool"),
    "groups": ("ValueError", r"num_groups \(3\) must be positive and divide"),
    "eps": ("ValueError", "eps must be a finite number >= 0"),
    "activation": ("ValueError", "activation must be"),
}


@needs_cpp
def test_direct_op_calls_raise_cleanly():
    """torch.ops.gmd_ext.modality_group_norm_* with wrong arguments: ValueError/TypeError naming the argument.
    In a subprocess: before these checks, a larger mean/rstd corrupted the heap (malloc abort)."""
    import json
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _BAD_OP_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"the process died (rc {run.returncode}): {run.stderr[-2000:]}"
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (exc, pattern) in _BAD_OP_EXPECT.items():
        assert got[name][0] == exc and re.search(pattern, got[name][1]), f"{name}: {got[name]}"


# ---------------------------------------------------------------- batched backward (vmap rule)
@pytest.mark.parametrize("device,backend", testing.device_backends(backends=("cpp", "triton")))
def test_batched_backward_equals_per_cotangent(device, backend):
    """V cotangents as one torch.func.vmap backward (the vmap rule of the backward op: one kernel call over V·B·M
    pairs, GMD(strategy="branches")) equal V separate backward passes, absent pairs included; one call, not V."""
    x, w, b = (t.to(device).requires_grad_() for t in _inputs(2, B=3, M=2, C=4, size=4))
    present = testing.present_mask("random", 3, 2)
    y = modality_group_norm(x, w, b, present, num_groups=2, activation="relu", backend=backend)
    cotangents = torch.randn(5, *y.shape, dtype=y.dtype, device=device)
    batched = torch.func.vmap(lambda c: torch.autograd.grad(y, (x, w, b), c, retain_graph=True))(cotangents)
    single = [torch.autograd.grad(y, (x, w, b), c, retain_graph=True) for c in cotangents]
    for got, *want in zip(batched, *single):
        torch.testing.assert_close(got, torch.stack(want))
    op = "gmd_ext::modality_group_norm_bwd" + ("_triton" if backend == "triton" else "")
    with torch.profiler.profile() as prof:
        torch.func.vmap(lambda c: torch.autograd.grad(y, (x, w, b), c, retain_graph=True))(cotangents)
    assert {e.key: e.count for e in prof.key_averages()}[op] <= 2  # the batched call and the rule's one call
