"""The one home of every op registration: fakes (meta kernels for torch.compile) and autograd formulas of the
compiled ops (csrc/), and the Triton ops `gmd_ext::<op>_triton` (custom ops over the gmd_ext/triton/ launchers)
with their fakes and autograd. One set of formulas serves both backends.

The compiled ops are registered when gmd_ext._C loads (import of gmd_ext.ops); the Triton ops on first use
(`triton_ops()`): importing triton costs about a second, and TRITON_INTERPRET must be set before it.
"""
from __future__ import annotations

from typing import Optional

import torch

from gmd_ext import _backend
from gmd_ext.ops import reference


def one_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Every fake starts here: its tensor arguments must share one device. The dispatcher runs an op's fake (its
    Meta kernel) as soon as ONE argument is on `meta`, so a direct `torch.ops.gmd_ext.<op>` call with the others on
    the CPU would otherwise get the fake's output allocated like them and never written (masked_conv of zeros
    returned values up to 3.5e37). Under torch.compile all fake tensors share the traced device and this passes."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"gmd_ext::{op}: all tensor arguments must be on one device, got "
                         + ", ".join(f"{name} on {d}" for name, d in devices.items())
                         + " (a meta argument among real ones gives no result to compute)")


def _register_cpp_projection():
    """Fakes and autograd of the compiled projection ops."""

    @torch.library.register_fake("gmd_ext::gram")
    def _(G):
        one_device("gram", G=G)
        return G.new_empty((G.shape[0], G.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("gmd_ext::pcgrad_coefficients")
    def _(gram, perms):
        one_device("pcgrad_coefficients", gram=gram, perms=perms)
        return torch.empty_like(gram, dtype=torch.float32)

    @torch.library.register_fake("gmd_ext::combine")
    def _(G, c, shared, shared_scale, other_scale):
        one_device("combine", G=G, c=c, shared=shared)
        return G.new_empty((G.shape[1],))

    @torch.library.register_fake("gmd_ext::combine_rows")
    def _(G, A):
        one_device("combine_rows", G=G, A=A)
        return G.new_empty((A.shape[0], G.shape[1]))

    _register_projection_autograd("")


def _register_projection_autograd(suffix: str) -> None:
    """Autograd of gmd_ext::gram / combine / combine_rows + suffix: "" for the C++ ops, "_triton" for the
    Triton ops. One set of formulas for both backends;
    the backward passes that are themselves a combine_rows run on the same backend's op."""
    combine_rows = getattr(torch.ops.gmd_ext, f"combine_rows{suffix}")

    def _gram_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _gram_backward(ctx, grad):
        # d(G Gᵀ)/dG applied to dΓ is (dΓ + dΓᵀ) G: one combine_rows pass.
        (G,) = ctx.saved_tensors
        return combine_rows(G, (grad + grad.T).float())

    torch.library.register_autograd(f"gmd_ext::gram{suffix}", _gram_backward, setup_context=_gram_setup)

    def _combine_setup(ctx, inputs, output):
        G, c, shared, shared_scale, other_scale = inputs
        ctx.scales = (shared_scale, other_scale)
        ctx.save_for_backward(G if ctx.needs_input_grad[1] else None,
                              c if ctx.needs_input_grad[0] else None, shared)

    def _combine_backward(ctx, grad):
        # out = s ⊙ (cᵀ G): dG = c ⊗ (s ⊙ dout) (an outer product, in G's dtype), dc = G (s ⊙ dout) in fp32.
        G, c, shared = ctx.saved_tensors
        shared_scale, other_scale = ctx.scales
        g = grad.float() * (shared_scale if shared is None else torch.where(shared, shared_scale, other_scale))
        dG = (c[:, None] * g[None, :]).to(grad.dtype) if c is not None else None  # c is float32 (op contract)
        dc = torch.mv(G.float(), g) if G is not None else None
        return dG, dc, None, None, None

    torch.library.register_autograd(f"gmd_ext::combine{suffix}", _combine_backward, setup_context=_combine_setup)

    def _rows_setup(ctx, inputs, output):
        G, A = inputs
        ctx.save_for_backward(G if ctx.needs_input_grad[1] else None, A if ctx.needs_input_grad[0] else None)

    def _rows_backward(ctx, grad):
        # out = A G: dG = Aᵀ dout (a combine_rows pass, in G's dtype), dA = dout Gᵀ in fp32.
        G, A = ctx.saved_tensors
        dG = combine_rows(grad, A.T.contiguous()) if A is not None else None
        dA = grad.float() @ G.float().T if G is not None else None
        return dG, dA

    torch.library.register_autograd(f"gmd_ext::combine_rows{suffix}", _rows_backward, setup_context=_rows_setup)


def _register_cpp_ds():
    """Fake (meta) kernels for torch.compile and autograd formulas of the DS ops in csrc/ (when _C is loaded)."""
    lib = "gmd_ext::"

    @torch.library.register_fake(lib + "pack_pairs")
    def _(x, index):
        one_device("pack_pairs", x=x, index=index)
        return x.new_empty((index.shape[0], *x.shape[1:]))

    @torch.library.register_fake(lib + "scatter_pairs")
    def _(y, index, num_pairs):
        one_device("scatter_pairs", y=y, index=index)
        return y.new_empty((num_pairs, *y.shape[1:]))

    # pack and scatter are each other's adjoint for distinct indices.
    def _pack_setup(ctx, inputs, output):
        x, index = inputs
        ctx.num_rows = x.shape[0]
        ctx.save_for_backward(index)

    def _pack_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.gmd_ext.scatter_pairs(grad, index, ctx.num_rows), None

    torch.library.register_autograd(lib + "pack_pairs", _pack_backward, setup_context=_pack_setup)

    def _scatter_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _scatter_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.gmd_ext.pack_pairs(grad, index), None, None

    torch.library.register_autograd(lib + "scatter_pairs", _scatter_backward, setup_context=_scatter_setup)

    @torch.library.register_fake(lib + "masked_conv")
    def _(x, weight, bias, index, counts, stride, padding, dilation):
        one_device("masked_conv", x=x, weight=weight, bias=bias, index=index)
        per_modality = weight.dim() == x.dim()
        return x.new_empty(reference._conv_out_shape(x, weight, per_modality, stride, padding, dilation))

    @torch.library.register_fake(lib + "masked_conv_backward")
    def _(grad_y, x, weight, bias, index, counts, stride, padding, dilation, output_mask):
        one_device("masked_conv_backward", grad_y=grad_y, x=x, weight=weight, bias=bias, index=index)
        return (x.new_empty(x.shape) if output_mask[0] else None,
                weight.new_empty(weight.shape) if output_mask[1] else None,
                bias.new_empty(bias.shape) if output_mask[2] and bias is not None else None)

    def _conv_setup(ctx, inputs, output):
        x, weight, bias, index, counts, stride, padding, dilation = inputs
        ctx.conv = (counts, stride, padding, dilation)
        ctx.save_for_backward(x, weight, bias, index)

    def _conv_backward(ctx, grad):
        x, weight, bias, index = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, db = torch.ops.gmd_ext.masked_conv_backward(grad, x, weight, bias, index, *ctx.conv, mask)
        return dx, dw, db, None, None, None, None, None

    torch.library.register_autograd(lib + "masked_conv", _conv_backward, setup_context=_conv_setup)

    @torch.library.register_fake(lib + "modality_group_norm_fwd")
    def _(x, weight, bias, present, num_groups, eps, activation):
        one_device("modality_group_norm_fwd", x=x, weight=weight, bias=bias, present=present)
        return _group_norm_fake(x, num_groups)

    @torch.library.register_fake(lib + "modality_group_norm_bwd")
    def _(grad_y, x, weight, bias, present, mean, rstd, num_groups, activation, output_mask):
        one_device("modality_group_norm_bwd", grad_y=grad_y, x=x, weight=weight, bias=bias, present=present,
                   mean=mean, rstd=rstd)
        return (x.new_empty(x.shape) if output_mask[0] else None,
                weight.new_empty(weight.shape) if output_mask[1] else None,
                bias.new_empty(bias.shape) if output_mask[2] else None)

    def _gn_backward(ctx, grad_y, grad_mean, grad_rstd):
        # mean and rstd are returned for the backward only (marked non-differentiable): their grads are None.
        x, weight, bias, present, mean, rstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, db = torch.ops.gmd_ext.modality_group_norm_bwd(grad_y, x, weight, bias, present, mean, rstd,
                                                               *ctx.gn, mask)
        return dx, dw, db, None, None, None, None

    torch.library.register_autograd(lib + "modality_group_norm_fwd", _gn_backward, setup_context=_gn_setup)
    _register_ds_vmap(lib)


def _to_front(t, bdim, size):
    """t with its vmapped dim first; an unbatched t expanded to `size` there (a view)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


# Output positions per row up to which the batched weight gradient of conv_rows is one GEMM over im2col rows
# (below it the vendor's per-call overhead dominates: measured 5x faster at 2^3, 1.2x at 4^3, slower from 8^3 on a
# 2-core Xeon, 1 thread; bench/bench_ds.py).
CONV_ROWS_GEMM_MAX = 64
_CONV_T = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
           3: torch.nn.functional.conv_transpose3d}


def _register_conv_rows():
    """gmd_ext::conv_rows_backward: the backward of a convolution of packed rows (gmd_ext.ops.ds_ops.conv_rows,
    the layers' per-branch form), pure torch, so that a batched backward (V cotangents through one branch,
    GMD(strategy="branches")) has a vmap rule: the data gradient of all V·P rows in one call, the weight gradient
    per cotangent, as one GEMM over the im2col rows where the maps are small. Unbatched: the vendor backward."""

    @torch.library.custom_op("gmd_ext::conv_rows_backward", mutates_args=())
    def conv_rows_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                           padding: list[int], dilation: list[int], need_input: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (grad_x (empty unless need_input), grad_weight, grad_bias [Cout])."""
        n = x.dim() - 2
        dx, dw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                        [0] * n, 1, [need_input, True, False])
        return (dx if need_input else x.new_empty(0)), dw, grad.sum([0, *range(2, grad.dim())])

    @conv_rows_backward.register_fake
    def _(grad, x, weight, stride, padding, dilation, need_input):
        one_device("conv_rows_backward", grad=grad, x=x, weight=weight)
        return (x.new_empty(x.shape) if need_input else x.new_empty(0), weight.new_empty(weight.shape),
                grad.new_empty(grad.shape[1:2]))

    @conv_rows_backward.register_vmap
    def _(info, in_dims, grad, x, weight, stride, padding, dilation, need_input):
        V = info.batch_size
        gd, xd, wd = in_dims[:3]
        if gd is None or xd is not None or wd is not None:  # not V cotangents of one forward: one call each
            g, xs, ws = _to_front(grad, gd, V), _to_front(x, xd, V), _to_front(weight, wd, V)
            outs = [conv_rows_backward(g[v], xs[v], ws[v], stride, padding, dilation, need_input) for v in range(V)]
            return tuple(torch.stack(t) for t in zip(*outs)), (0, 0, 0)
        g = grad.movedim(gd, 0)  # [V, P, Cout, *S']
        n, P = x.dim() - 2, x.shape[0]
        if need_input and all(st == 1 for st in stride):
            # Stride 1: the data gradient is the transposed convolution (exact sizes; faster than the vendor's
            # backward call on this CPU, and one call for all V·P rows).
            dx = _CONV_T[n](g.flatten(0, 1), weight, None, 1, padding, 0, 1, dilation).unflatten(0, (V, P))
        elif need_input:  # the data gradient reads only x's shape: an expanded stand-in, as torch.nn.grad does
            dx = torch.ops.aten.convolution_backward(
                g.flatten(0, 1), x.new_empty(1).expand(V * P, *x.shape[1:]), weight, None, stride, padding,
                dilation, False, [0] * n, 1, [True, False, False])[0].unflatten(0, (V, P))
        else:
            dx = x.new_empty(V, 0)
        if g[0, 0, 0].numel() <= CONV_ROWS_GEMM_MAX and all(d == 1 for d in dilation):
            k = weight.shape[2:]
            cols = torch.nn.functional.pad(x, [q for p in reversed(padding) for q in (p, p)])
            for i in range(n):
                cols = cols.unfold(2 + i, k[i], stride[i])  # [P, Cin, *S', *k]
            cols = cols.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)).reshape(-1, weight[0].numel())
            dw = (g.movedim(2, 1).reshape(V * g.shape[2], -1) @ cols).view(V, *weight.shape)
        else:
            dw = torch.stack([torch.ops.aten.convolution_backward(
                g[v], x, weight, None, stride, padding, dilation, False, [0] * n, 1, [False, True, False])[1]
                for v in range(V)])
        return (dx, dw, g.sum([1, *range(3, g.dim())])), (0, 0, 0)


def _register_ds_vmap(lib: str, bwd_suffix: str = "") -> None:
    """vmap rules of the DS ops a batched backward runs (GMD(strategy="branches"): every objective's cotangent
    through one branch backward, torch.autograd.grad(..., is_grads_batched=True)). Without them vmap runs the op
    once per cotangent and stacks the results.

    pack_pairs / scatter_pairs gather / scatter rows of dim 0: the vmapped dim rides along as dim 1. The group
    norm backward runs the V vmapped copies as one sample of V·B·M pairs (pair (v, b, m), its affine row gathered
    from m), so each copy keeps its own statistics, and sums each copy's weight / bias gradient over b: one
    kernel call instead of V, no copy of the cotangents.
    """
    if not bwd_suffix:
        @torch.library.register_vmap(lib + "pack_pairs")
        def _(info, in_dims, x, index):
            if in_dims[1] is not None:
                raise NotImplementedError("gmd_ext::pack_pairs: a vmapped index is not supported")
            return torch.ops.gmd_ext.pack_pairs(x.movedim(in_dims[0], 1), index), 1

        @torch.library.register_vmap(lib + "scatter_pairs")
        def _(info, in_dims, y, index, num_pairs):
            if in_dims[1] is not None:
                raise NotImplementedError("gmd_ext::scatter_pairs: a vmapped index is not supported")
            return torch.ops.gmd_ext.scatter_pairs(y.movedim(in_dims[0], 1), index, num_pairs), 1

    bwd = getattr(torch.ops.gmd_ext, "modality_group_norm_bwd" + bwd_suffix)

    @torch.library.register_vmap(lib + "modality_group_norm_bwd" + bwd_suffix)
    def _(info, in_dims, grad_y, x, weight, bias, present, mean, rstd, num_groups, activation, *mask):
        V = info.batch_size
        g, xs, w, b, p, mu, rs = (_to_front(t, d, V) for t, d in zip(
            (grad_y, x, weight, bias, present, mean, rstd), in_dims))
        B, M = xs.shape[1:3]

        def pairs(t):  # [V, B, M, ...] -> [1, V·B·M, ...]
            return t.reshape(1, V * B * M, *t.shape[3:])

        def affine(t):  # [V, M, C] -> [V·B·M, C]: each pair's row
            return t[:, None].expand(V, B, M, t.shape[-1]).reshape(V * B * M, -1)

        dx, dw, db = bwd(pairs(g), pairs(xs), affine(w), affine(b), pairs(p), pairs(mu), pairs(rs), num_groups,
                         activation, *mask)
        dx = None if dx is None else dx.view(V, B, M, *dx.shape[2:])
        dw = None if dw is None else dw.view(V, B, M, -1).sum(1)
        db = None if db is None else db.view(V, B, M, -1).sum(1)
        return (dx, dw, db), tuple(None if t is None else 0 for t in (dx, dw, db))


def _group_norm_fake(x, num_groups):
    """(y, mean, rstd) shapes and dtypes of the modality_group_norm forward ops."""
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = x.new_empty((x.shape[0], x.shape[1], num_groups), dtype=stat)
    return x.new_empty(x.shape), mean, torch.empty_like(mean)


def _gn_setup(ctx, inputs, output):
    """setup_context shared by the cpp and triton forward ops (same signature, same saved tensors)."""
    x, weight, bias, present, num_groups, eps, activation = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.gn = (num_groups, activation)
    ctx.save_for_backward(x, weight, bias, present, mean, rstd)


_triton_registered = False


def triton_ops():
    """Register the Triton ops (once) and return torch.ops.gmd_ext. A plain flag rather than functools.cache:
    Dynamo traces through cache wrappers, and a traced call must only read the flag."""
    if not _triton_registered:
        _register_triton()
    return torch.ops.gmd_ext


def _register_triton():
    global _triton_registered
    from gmd_ext import triton as tk

    @torch.library.custom_op("gmd_ext::gram_triton", mutates_args=())
    def gram_triton(G: torch.Tensor) -> torch.Tensor:
        """Triton backend of gmd_ext::gram: G [K, N] -> G Gᵀ [K, K] float32."""
        return tk.gram.gram(G)

    @gram_triton.register_fake
    def _(G):
        one_device("gram_triton", G=G)
        tk.gram.check(G)
        return G.new_empty((G.shape[0], G.shape[0]), dtype=torch.float32)

    @torch.library.custom_op("gmd_ext::pcgrad_coefficients_triton", mutates_args=())
    def pcgrad_coefficients_triton(gram: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        """Triton backend of gmd_ext::pcgrad_coefficients: Γ [K, K] float32, perms [K, K] int64 -> A [K, K]."""
        return tk.pcgrad_coefficients.pcgrad_coefficients(gram, perms)

    @pcgrad_coefficients_triton.register_fake
    def _(gram, perms):
        one_device("pcgrad_coefficients_triton", gram=gram, perms=perms)
        tk.pcgrad_coefficients.check(gram, perms)
        return torch.empty_like(gram, dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.library.custom_op("gmd_ext::combine_triton", mutates_args=())
    def combine_triton(G: torch.Tensor, c: torch.Tensor, shared: Optional[torch.Tensor], shared_scale: float,
                       other_scale: float) -> torch.Tensor:
        """Triton backend of gmd_ext::combine: G [K, N], c [K] float32, shared [N] bool | None -> [N]."""
        return tk.combine.combine(G, c, shared, shared_scale, other_scale)

    @combine_triton.register_fake
    def _(G, c, shared, shared_scale, other_scale):
        one_device("combine_triton", G=G, c=c, shared=shared)
        tk.combine.check_combine(G, c, shared)
        return G.new_empty((G.shape[1],))

    @torch.library.custom_op("gmd_ext::combine_rows_triton", mutates_args=())
    def combine_rows_triton(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Triton backend of gmd_ext::combine_rows: G [K, N], A [R, K] float32 -> A @ G [R, N]."""
        return tk.combine.combine_rows(G, A)

    @combine_rows_triton.register_fake
    def _(G, A):
        one_device("combine_rows_triton", G=G, A=A)
        tk.combine.check_combine_rows(G, A)
        return G.new_empty((A.shape[0], G.shape[1]))

    _register_projection_autograd("_triton")

    gn = tk.modality_group_norm

    @torch.library.custom_op("gmd_ext::modality_group_norm_fwd_triton", mutates_args=())
    def modality_group_norm_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                       present: torch.Tensor, num_groups: int, eps: float, activation: str
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triton backend of gmd_ext::modality_group_norm_fwd (same signature and outputs)."""
        return gn.group_norm_fwd(x, weight, bias, present, num_groups, eps, activation)

    @modality_group_norm_fwd_triton.register_fake
    def _(x, weight, bias, present, num_groups, eps, activation):
        one_device("modality_group_norm_fwd_triton", x=x, weight=weight, bias=bias, present=present)
        gn.check("modality_group_norm_fwd_triton", x, weight, bias, present, num_groups, activation)
        return _group_norm_fake(x, num_groups)

    @torch.library.custom_op("gmd_ext::modality_group_norm_bwd_triton", mutates_args=())
    def modality_group_norm_bwd_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                       bias: torch.Tensor, present: torch.Tensor, mean: torch.Tensor,
                                       rstd: torch.Tensor, num_groups: int, activation: str
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triton backend of gmd_ext::modality_group_norm_bwd without output_mask (custom ops cannot return
        None): always (grad_x, grad_weight, grad_bias)."""
        return gn.group_norm_bwd(grad_y, x, weight, bias, present, mean, rstd, num_groups, activation)

    @modality_group_norm_bwd_triton.register_fake
    def _(grad_y, x, weight, bias, present, mean, rstd, num_groups, activation):
        one_device("modality_group_norm_bwd_triton", grad_y=grad_y, x=x, weight=weight, bias=bias,
                   present=present, mean=mean, rstd=rstd)
        return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)

    def _gn_backward(ctx, grad_y, grad_mean, grad_rstd):
        # mean and rstd are non-differentiable outputs (marked in _gn_setup).
        x, weight, bias, present, mean, rstd = ctx.saved_tensors
        dx, dw, db = modality_group_norm_bwd_triton(grad_y, x, weight, bias, present, mean, rstd, *ctx.gn)
        keep = ctx.needs_input_grad
        return (dx if keep[0] else None, dw if keep[1] else None, db if keep[2] else None, None, None, None, None)

    modality_group_norm_fwd_triton.register_autograd(_gn_backward, setup_context=_gn_setup)
    _register_ds_vmap("gmd_ext::", "_triton")
    _triton_registered = True


_register_conv_rows()
if _backend.CPP_LOADED:
    _register_cpp_projection()
    _register_cpp_ds()
