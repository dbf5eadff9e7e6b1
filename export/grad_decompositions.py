"""Rewrites of the backward ops that ONNX has no operator for, so that a traced gradient exports.

``make_fx`` traces loss -> ∂loss/∂x into plain aten ops; PyTorch's core decompositions turn most backward ops into
arithmetic, but three of them remain, and each is the transpose of a linear map that ONNX does have:

- ``convolution_backward`` (input gradient only: the weights are frozen) -> a transposed convolution (and the input
  gradient of a transposed convolution -> a convolution);
- ``max_pool2d_with_indices_backward`` -> each output gradient added at the position its maximum came from
  (for 2×2 pools, the networks' only kind: a mask of each window's first maximum; else ScatterElements with add),
  which is what autograd does;
- ``upsample_bilinear2d_backward`` -> the transposed interpolation matrices, Aᵧᵀ · g · Aₓ.

``nll_loss`` is decomposed too: onnxscript's version fakes ``total_weight`` = 1 for a mean reduction, so a
cross-entropy's gradient would come out N times too large (the repair's losses avoid it today; this keeps a future
task from tripping on it).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions, get_decompositions

aten = torch.ops.aten


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    if output_mask[1] or output_mask[2]:
        raise NotImplementedError("only the input gradient of a convolution is exported (the weights are frozen)")
    if transposed:
        grad_input = F.conv2d(grad_output, weight, None, stride, padding, dilation, groups)
    else:
        # the transposed convolution's output must be exactly the input's size: restore what the stride dropped
        extra = [input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                       + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(2)]
        grad_input = F.conv_transpose2d(grad_output, weight, None, stride, padding, extra, groups, dilation)
    return grad_input, None, None


def _max_pool2d_backward(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    if _is_plain_2x2(input, kernel_size, stride, padding, dilation, ceil_mode):
        return _max_pool_2x2_backward(grad_output, input)
    n, c, h, w = input.shape
    flat = grad_output.new_zeros(n, c, h * w)
    return flat.scatter_add(2, indices.flatten(2), grad_output.flatten(2)).view(n, c, h, w)


# The networks' pools are all 2×2 with stride 2. onnxruntime's MaxPool that also returns indices runs a slow generic
# kernel (measured: 22 % of a repair step at batch 64, 464 ms of 2.1 s, plus 3 % for the scatter of the backward);
# the four strided corners of each window and elementwise max/compare are fast, and give the same values and the
# same winner: the first maximum in row-major order, as PyTorch's CPU kernel picks it (ties are common: flat image
# regions give equal activations).
def _is_plain_2x2(input, kernel_size, stride, padding, dilation, ceil_mode) -> bool:
    two = lambda v: list(v) in ([2], [2, 2])
    return (two(kernel_size) and (not stride or two(stride)) and not any(padding) and all(d == 1 for d in dilation)
            and not ceil_mode and input.dim() == 4 and input.shape[2] % 2 == 0 and input.shape[3] % 2 == 0)


def _window_max(x):
    """The four strided corners of each 2×2 window, in row-major order, and their maximum."""
    corners = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    a, b, c, d = corners
    return corners, torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def _max_pool2d_with_indices(input, kernel_size, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    if not _is_plain_2x2(input, kernel_size, stride, padding, dilation, ceil_mode):
        return NotImplemented                                      # the exporter's own MaxPool
    _, values = _window_max(input)
    # the backward below finds the winners again; these indices are never read and the trace drops them
    return values, torch.zeros(values.shape, dtype=torch.int64, device=values.device)


def _max_pool_2x2_backward(grad_output, input):
    (a, b, c, d), top = _window_max(input)
    win_a = a == top
    win_b = (b == top) & ~win_a
    win_c = (c == top) & ~(win_a | win_b)
    win_d = ~(win_a | win_b | win_c)
    g = [grad_output * w for w in (win_a, win_b, win_c, win_d)]
    n, ch, h, w = grad_output.shape
    row0 = torch.stack([g[0], g[1]], dim=-1).reshape(n, ch, h, 2 * w)           # interleave the columns
    row1 = torch.stack([g[2], g[3]], dim=-1).reshape(n, ch, h, 2 * w)
    return torch.stack([row0, row1], dim=3).reshape(n, ch, 2 * h, 2 * w)        # and the rows


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """out×in weights of 1-D bilinear resizing with align_corners=False (F.interpolate's)."""
    scale = in_size / out_size
    src = np.clip((np.arange(out_size) + 0.5) * scale - 0.5, 0, None)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), lo), 1 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


def _upsample_bilinear2d_backward(grad_output, output_size, input_size, align_corners, scales_h=None,
                                  scales_w=None):
    if align_corners:
        raise NotImplementedError("bilinear upsampling with align_corners=True is not exported")
    a_y = torch.from_numpy(bilinear_matrix(output_size[0], input_size[2])).to(grad_output)
    a_x = torch.from_numpy(bilinear_matrix(output_size[1], input_size[3])).to(grad_output)
    return a_y.T @ grad_output @ a_x


def gradient_decompositions() -> dict:
    """PyTorch's core decompositions plus the rewrites above: every op of a traced repair step exports to ONNX."""
    table = dict(core_aten_decompositions())
    table.update(get_decompositions([aten.nll_loss_forward, aten.nll_loss_backward,
                                     aten._log_softmax_backward_data]))
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.max_pool2d_with_indices.default] = _max_pool2d_with_indices
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    table[aten.upsample_bilinear2d_backward.default] = _upsample_bilinear2d_backward
    return table
