"""int8 post-training quantization of a static subnet or block: one function, one policy.

`quantize_int8` is the only place evit quantizes: the int8 `.pte` export and the int8
ExecuTorch latency device both call it, so what is timed is what ships. It is PT2E static
quantization with ExecuTorch's `XNNPACKQuantizer` (the quantizer the XNNPACK delegate's
int8 kernels expect): symmetric per-channel int8 weights, per-tensor int8 activations
whose ranges come from the calibration inputs, then `convert_pt2e` to the reference
(dequantize -> op -> quantize) form that `to_edge_transform_and_lower` folds into XNNPACK
int8 operators.

The float policy (`INT8_POLICY`), the same for every block of every space:
- int8: what the XNNPACK quantizer annotates outside the two float regions below: conv
  (with its folded BatchNorm and activation), linear, the residual adds, pooling, cat, mul;
- float: every op inside `LayerNorm4d` (a norm's mean / variance / rsqrt over a handful of
  channels loses most of its range at 8 bits), and the attention scores inside
  `Attention` itself (q.k, the 1/sqrt(d) scale, the relative bias add, softmax, A.v):
  XNNPACK has no int8 softmax or batched matmul of two activations, and quantizing the
  scale / bias that feed softmax alone would only add quantize / dequantize pairs (the
  loss Q-HyViT, arXiv 2303.12557, measures for naive PTQ of hybrid ViTs). The qkv and
  projection linears and the depthwise conv on V stay int8.
The policy is `policy_quantizer`, generic over the quantizer class: the LiteRT int8 file
(`evit.formats.litert_worker.litert_quantizer`, inside the converter venv; the rest of evit
never imports litert-torch) takes litert-torch's PT2EQuantizer with the same policy,
plus what LiteRT needs so its XNNPACK delegate takes the whole graph in one partition:
float input / output ops (`float_io`: else the STATIC conversion makes the model's input
and output int8), hard-swish as add / relu6 / mul and the k x k / stride k average pools as
fixed depthwise convs (a partial last window by repeating the last row / column;
`litert_int8_forms`: LiteRT's XNNPACK has no int8 HARD_SWISH or
AVERAGE_POOL_2D, and the converter turns a float op between a dequantize and a quantize into
an int8 one, which then ran outside the delegate: 18 partitions, 3x slower than fp32).
`quantization_report` reads the converted graph back and says, per block, which compute
ops run int8 and which stayed float (anything the quantizer refused lands there too), so
the card lists the outcome, not only the intent.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INT8_POLICY = ("int8: conv (+BN, activation), linear, residual add, pooling, cat, mul; "
               "float: LayerNorm (LayerNorm4d) and the attention scores (q.k, scale, relative bias, softmax, A.v); "
               "weights symmetric per-channel, activations per-tensor static (calibrated)")
"""The policy in one line (on the card beside the per-block outcome)."""

_FLOAT_MODULES = ("evit.nn.static.LayerNorm4d",)
"""Module types whose every op stays float."""
_FLOAT_OWN_OPS = ("evit.nn.static.Attention",)
"""Module types whose own ops (not those of their child linears / convs) stay float."""
_PARENT_OPS = ("evit.formats.quantize.DecomposedHardswish",)
"""Modules whose ops the policy treats as their parent's own (LiteRT's decomposed hard-swish
on the attention output stays float with the attention scores)."""
_NOT_COMPUTE = ("reshape", "view", "transpose", "permute", "flatten", "slice", "select", "unsqueeze", "squeeze",
                "expand", "clone", "dropout", "contiguous", "getitem", "alias", "detach", "_assert", "sym_size",
                "quantize_per", "dequantize_per", "choose_qparams")
"""Ops that move or relabel data (or are the quantization itself): not counted as compute."""


def _module_types(node: torch.fx.Node) -> list[str]:
    """Qualified type names of the modules `node` was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}" for _path, t in stack.values()]


def keeps_float(node: torch.fx.Node) -> bool:
    """The policy for one graph node: True where it stays float (see the module docstring)."""
    types = _module_types(node)
    while types and types[-1] in _PARENT_OPS:  # its ops count as the parent's own
        types = types[:-1]
    return any(t in _FLOAT_MODULES for t in types) or bool(types and types[-1] in _FLOAT_OWN_OPS)


_ANNOTATION = "quantization_annotation"


def _shares_with(node: torch.fx.Node, removed: set[torch.fx.Node]) -> bool:
    """Whether `node`'s quantization annotation shares its scale with one of `removed`."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    ann = node.meta.get(_ANNOTATION)
    if ann is None:
        return False
    specs = [ann.output_qspec, *ann.input_qspec_map.values()]
    for spec in specs:
        if isinstance(spec, SharedQuantizationSpec):
            ref = spec.edge_or_node
            if (ref in removed) if not isinstance(ref, tuple) else any(r in removed for r in ref):
                return True
    return False


def _io_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The compute nodes that read the model's input or write its output (looking through views)."""
    nodes: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            nodes.update(c for c in _consumers(n) if c.op == "call_function")
        elif n.op == "output":
            nodes.update(p for p in _producers(n) if p.op == "call_function")
    return nodes


def policy_quantizer(base: type, config: Any, *, float_io: bool = False) -> Any:
    """A PT2E quantizer of class `base` (global `config`) with the float policy applied.

    The policy is applied after the quantizer's own annotation: strip the annotations of
    nodes the policy keeps float, then of every node that shares a scale with a stripped one
    (the quantizers' `propagate_annotation` hands scales on to data-movement ops without
    consulting any filter: it quantized a LayerNorm's first mean). Generic over the base so
    litert-torch's PT2EQuantizer takes the same policy inside the converter venv.
    `float_io`: the ops that read the image and write the logits stay float too, so the file
    takes float images and gives float logits (LiteRT's STATIC conversion otherwise turns a
    quantized first input / last output into int8 model inputs / outputs)."""

    class PolicyQuantizer(base):  # type: ignore[misc,valid-type]
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            io = _io_nodes(model.graph) if float_io else set()
            removed = {n for n in model.graph.nodes if (keeps_float(n) or n in io) and n.meta.pop(_ANNOTATION, None)}
            while removed:
                removed = {n for n in model.graph.nodes if _shares_with(n, removed) and n.meta.pop(_ANNOTATION)}
            return model

    return PolicyQuantizer().set_global(config)


class DecomposedHardswish(nn.Module):
    """x * relu6(x + 3) / 6: hard-swish as add, clamp and mul, which LiteRT's XNNPACK delegate
    runs in int8 (it has no int8 HARD_SWISH: a fused one stays on LiteRT's own kernels, outside
    the delegate, and splits the graph at every activation).

    On a feature map the constants are 1 x 1 x 1 x 1 tensors, not Python scalars: quantized,
    a scalar becomes a 0-d tensor input, and litert-torch's layout pass then keeps the add /
    mul in NCHW with a transpose on each side of every activation (measured: 37 extra
    TRANSPOSEs in the smallest imagenet subnet at 224 px); a 4-d constant lets them run NHWC.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("three", torch.full((1, 1, 1, 1), 3.0), persistent=False)
        self.sixth = nn.Parameter(torch.full((1, 1, 1, 1), 1.0 / 6.0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x * F.relu6(x + self.three) * self.sixth
        return x * F.relu6(x + 3.0) * (1.0 / 6.0)


class PoolAsDepthwise(nn.Module):
    """A k x k / stride k average pool as a depthwise conv with fixed 1/k^2 weights: XNNPACK in
    LiteRT has no int8 AVERAGE_POOL_2D, it has int8 depthwise convs (1/k^2 is exact at 8 bits
    per channel: the weights all share one value).

    `ceil`: the ceil-mode pool that averages only what a partial last window covers
    (`count_include_pad=False`, the down-sampling shortcut on an odd side). Where that window
    covers one row / column (every stride-2 pool), appending k - 1 copies of the last row /
    column makes the full window's average equal the partial one's, exactly: the copies are a
    slice and a concatenation, which XNNPACK runs in int8 (sharing the input's scale), so the
    pool stays inside the delegate. A partial window of 2..k-1 elements keeps the pool.
    """

    def __init__(self, channels: int, k: int, ceil: bool = False) -> None:
        super().__init__()
        self.k = k
        self.ceil = ceil
        self.weight = nn.Parameter(torch.full((channels, 1, k, k), 1.0 / (k * k)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        left = (x.shape[-2] % k, x.shape[-1] % k)  # static under export: the branch is traced once
        if self.ceil:
            if any(r > 1 for r in left):
                return F.avg_pool2d(x, k, ceil_mode=True, count_include_pad=False)
            if left[0] == 1:
                x = torch.cat([x] + [x[:, :, -1:, :]] * (k - 1), 2)
            if left[1] == 1:
                x = torch.cat([x] + [x[:, :, :, -1:]] * (k - 1), 3)
        return F.conv2d(x, self.weight, stride=k, groups=x.shape[1])


def litert_int8_forms(module: nn.Module) -> nn.Module:
    """`module` (in place) with the forms LiteRT's XNNPACK delegate runs in int8: every
    `nn.Hardswish` -> `DecomposedHardswish`, every k x k / stride k `nn.AvgPool2d` without
    padding feeding a conv (plain, or ceil-mode averaging only what a partial window covers)
    -> `PoolAsDepthwise`. Float outputs are the same up to rounding. Used by the LiteRT int8
    export only (ExecuTorch's XNNPACK has both ops in int8 or keeps them float without
    splitting)."""
    children = dict(module.named_children())
    conv = children.get("conv")
    for name, child in children.items():
        if isinstance(child, nn.Hardswish):
            setattr(module, name, DecomposedHardswish())
        elif (isinstance(child, nn.AvgPool2d) and child.padding in (0, (0, 0))
              and (not child.ceil_mode or not child.count_include_pad)
              and child.kernel_size == child.stride and isinstance(child.kernel_size, int)
              and isinstance(conv, nn.Conv2d)):
            setattr(module, name, PoolAsDepthwise(conv.in_channels, child.kernel_size, ceil=child.ceil_mode))
        else:
            litert_int8_forms(child)
    return module


def xnnpack_quantizer() -> Any:
    """ExecuTorch's XNNPACKQuantizer with the policy: symmetric per-channel int8 weights,
    static per-tensor int8 activations."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return policy_quantizer(XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True,
                                                                                 is_dynamic=False))


def quantize_int8(module: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor],
                  quantizer: Any = None, *, fold_quantize: bool = True) -> torch.fx.GraphModule:
    """The eval-mode `module` quantized by PT2E (XNNPACK quantizer, policy above). `module`
    may also be an ExportedProgram's `.module()` (a latency table's block, in the converter venv).

    `example` fixes the traced input shape (batch 1 in evit's exports); `calibration` are
    input batches whose activation ranges set the scales (the traced graph is specialised
    to the example's batch, so each batch is fed in slices of that size).
    `quantizer`: default `xnnpack_quantizer()` (the LiteRT worker passes litert-torch's
    `policy_quantizer(PT2EQuantizer, ..., float_io=True)` and `fold_quantize=False`). Raises ValueError
    when no calibration input is given (the scales would be undefined).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batches = [b for b in calibration if b.shape[0] > 0]
    if not batches:
        raise ValueError("int8 quantization needs at least one calibration input")
    was = module.training
    exported = isinstance(module, torch.fx.GraphModule)  # an ExportedProgram's module: traced in eval mode,
    if not exported:                                     # and it refuses eval() / train()
        module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.export.export(module, (example,)).module()
            prepared = prepare_pt2e(traced, quantizer or xnnpack_quantizer())
            for batch in batches:
                for x in batch.split(example.shape[0]):
                    prepared(x)
            return convert_pt2e(prepared, fold_quantize=fold_quantize)
    finally:
        if not exported:
            module.train(was)


@dataclass(frozen=True)
class QuantReport:
    """Which compute ops of a quantized graph run int8 and which stayed float, per block."""

    int8: dict[str, int]
    float: dict[str, int]
    float_by_block: dict[str, dict[str, int]]
    """Top-level block (the StaticSubnet index; '' for a lone block) -> float op counts."""
    calibration_inputs: int

    def to_dict(self) -> dict[str, Any]:
        return {"policy": INT8_POLICY, "calibration_inputs": self.calibration_inputs,
                "int8_ops": dict(self.int8), "float_ops": dict(self.float),
                "float_ops_by_block": {k: dict(v) for k, v in self.float_by_block.items()}}


def _name(node: torch.fx.Node) -> str:
    """The op's short name: `aten.conv2d.default` -> `conv2d` (a builtin: its whole text)."""
    parts = str(node.target).split(".")
    return parts[-2] if len(parts) >= 3 else parts[0]


def _is_q(node: Any, kind: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and _name(node).startswith(kind)


def _is_view(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(k in _name(node) for k in _NOT_COMPUTE) and not (
        _is_q(node, "quantize") or _is_q(node, "dequantize"))


def _producers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes whose tensors `node` reads, looking through views."""
    out = []
    for a in node.all_input_nodes:
        out.extend(_producers(a) if _is_view(a) else [a])
    return out


def _consumers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read `node`'s tensor, looking through views."""
    out = []
    for u in node.users:
        out.extend(_consumers(u) if _is_view(u) else [u])
    return out


_FUSED_ACT = ("relu", "hardtanh")
"""Activations the quantizer fuses into the conv / linear / add before them (one int8 op)."""


def _reads_int8(node: torch.fx.Node) -> bool:
    return any(_is_q(p, "dequantize") or (_name(node).startswith(_FUSED_ACT) and _reads_int8(p))
               for p in _producers(node))


def _writes_int8(node: torch.fx.Node) -> bool:
    return any(_is_q(u, "quantize") or (_name(u).startswith(_FUSED_ACT) and _writes_int8(u))
               for u in _consumers(node))


def _block(node: torch.fx.Node) -> str:
    """The top-level block a node belongs to (the first named module path's first part)."""
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        if path:
            return str(path).split(".")[0]
    return ""


def quantization_report(graph_module: torch.fx.GraphModule, calibration_inputs: int) -> QuantReport:
    """Read a converted (`quantize_int8`) graph back: a compute op is int8 when it reads a
    dequantized tensor and its result is quantized again (looking through views, and
    through a fused relu); every other compute op runs float."""
    int8: Counter[str] = Counter()
    flt: Counter[str] = Counter()
    by_block: dict[str, Counter[str]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or any(k in _name(node) for k in _NOT_COMPUTE):
            continue
        name = _name(node).rstrip("_")
        if _reads_int8(node) and _writes_int8(node):
            int8[name] += 1
        else:
            flt[name] += 1
            by_block.setdefault(_block(node), Counter())[name] += 1
    return QuantReport(dict(int8), dict(flt), {k: dict(v) for k, v in sorted(by_block.items())},
                       calibration_inputs)
