"""The one analytic FLOPs/params counter, and the block decomposition it is built on.

Convention (documented once, used by sampling, training levels, search and reports):
- FLOPs are multiply-accumulates (MACs), reported in millions (`flops_m`).
- Counted: every convolution (Cout * Hout * Wout * Cin/groups * k * k, including the
  squeeze-excite 1x1 convs at 1x1 spatial size and the 1x1 shortcut convs), every linear
  layer (tokens * in * out), and in attention Q.K^T (h*N*N*16), A.V (h*N*N*16*v) and
  one MAC per attention score for the softmax (h*N*N).
- Not counted: biases, normalisation layers, activations, pooling, the residual adds and
  the relative-position-bias add. (The reference also skips the SE of the transformer
  downsampling block; we count it, since it is real work on the device.)
- Params: every `nn.Parameter` of the extracted static subnet, including norms and the
  relative-position-bias table cropped to the subnet's token map ((2H-1)^2 per head).

`tests/test_flops_hooks.py` checks these numbers, block by block, against forward hooks on
the real static modules (`evit.nn.static`).

The decomposition into `Block`s is shared with the latency lookup tables: a subnet's
predicted latency is the sum over the same blocks that its FLOPs are the sum over.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from evit.arch import Arch, MBStage, Stage
from evit.space import SearchSpace, StageSpace


@dataclass(frozen=True, order=True)
class Block:
    """One unit of computation with everything that decides its cost.

    kind: "first_conv" | "mbconv" | "attn" | "head". `h` is the input feature map side
    (tokens side for "attn"); unused fields are 0.
    """

    kind: str
    h: int
    c_in: int
    c_out: int
    expansion: int = 0
    kernel: int = 0
    stride: int = 1
    se: bool = False
    mlp_ratio: int = 0
    v_scale: int = 0
    head_dim: int = 0
    head_width: int = 0
    se_reduction: int = 4

    @property
    def key(self) -> str:
        """Human-readable key used in LUT JSON files."""
        if self.kind == "first_conv":
            return f"first_conv|r{self.h}|c{self.c_out}|s{self.stride}"
        if self.kind == "mbconv":
            return (f"mbconv|h{self.h}|i{self.c_in}|o{self.c_out}|e{self.expansion}|k{self.kernel}"
                    f"|s{self.stride}|se{int(self.se)}")
        if self.kind == "attn":
            return f"attn|h{self.h}|w{self.c_in}|m{self.mlp_ratio}|v{self.v_scale}"
        return f"head|h{self.h}|i{self.c_in}|f{self.head_width}|o{self.c_out}"

    @property
    def h_out(self) -> int:
        return out_side(self.h, self.stride)


def out_side(h: int, stride: int) -> int:
    """Feature-map side after a 'same'-padded conv (or ceil-mode pool) with this stride."""
    return -(-h // stride)


def mbconv_mid(c_in: int, expansion: int) -> int:
    return c_in * expansion


def se_channels(mid: int, reduction: int) -> int:
    return max(1, mid // reduction)


# --- per-block costs ---------------------------------------------------------------------

def block_flops(b: Block) -> int:
    """MACs of one block under the convention above."""
    if b.kind == "first_conv":
        ho = b.h_out
        return 3 * b.c_out * 9 * ho * ho
    if b.kind == "mbconv":
        hi, ho = b.h, b.h_out
        mid = mbconv_mid(b.c_in, b.expansion)
        f = 0
        if b.expansion != 1:
            f += b.c_in * mid * hi * hi
        f += mid * b.kernel * b.kernel * ho * ho
        if b.se:
            rd = se_channels(mid, b.se_reduction)
            f += 2 * mid * rd
        f += mid * b.c_out * ho * ho
        if b.c_in != b.c_out or b.stride != 1:
            f += b.c_in * b.c_out * ho * ho
        return f
    if b.kind == "attn":
        n = b.h * b.h
        w = b.c_in
        heads = w // b.head_dim
        dv = heads * b.head_dim * b.v_scale
        qk = heads * b.head_dim
        f = n * w * (2 * qk + dv)  # qkv projection
        f += dv * 9 * n  # depthwise 3x3 on V
        f += heads * n * n * b.head_dim  # Q.K^T
        f += heads * n * n  # softmax
        f += heads * n * n * b.head_dim * b.v_scale  # A.V
        f += n * dv * w  # output projection
        f += 2 * n * w * (b.mlp_ratio * w)  # MLP
        return f
    if b.kind == "head":
        n = b.h * b.h
        c6 = b.expansion * b.c_in
        return n * b.c_in * c6 + c6 * b.head_width + b.head_width * b.c_out
    raise ValueError(f"unknown block kind {b.kind!r}")


def block_params(b: Block) -> int:
    """Parameters of the static module for this block (norm affine params included)."""
    if b.kind == "first_conv":
        return 3 * 9 * b.c_out + 2 * b.c_out
    if b.kind == "mbconv":
        mid = mbconv_mid(b.c_in, b.expansion)
        p = 0
        if b.expansion != 1:
            p += b.c_in * mid + 2 * mid
        p += mid * b.kernel * b.kernel + 2 * mid
        if b.se:
            rd = se_channels(mid, b.se_reduction)
            p += mid * rd + rd + rd * mid + mid
        p += mid * b.c_out + 2 * b.c_out
        if b.c_in != b.c_out or b.stride != 1:
            p += b.c_in * b.c_out + 2 * b.c_out
        return p
    if b.kind == "attn":
        w = b.c_in
        heads = w // b.head_dim
        dv = heads * b.head_dim * b.v_scale
        qkv = 2 * heads * b.head_dim + dv
        hidden = b.mlp_ratio * w
        p = 2 * w  # norm1
        p += w * qkv + qkv
        p += dv * 9 + dv  # depthwise V conv (with bias)
        p += (2 * b.h - 1) ** 2 * heads  # relative-position bias, cropped
        p += dv * w + w  # proj
        p += 2 * w  # norm2
        p += w * hidden + hidden + hidden * w + w
        return p
    if b.kind == "head":
        c6 = b.expansion * b.c_in
        return b.c_in * c6 + 2 * c6 + c6 * b.head_width + b.head_width + b.head_width * b.c_out + b.c_out
    raise ValueError(f"unknown block kind {b.kind!r}")


# --- decomposition of an arch into blocks -------------------------------------------------

@lru_cache(maxsize=1 << 16)
def stage_blocks(ss: StageSpace, h: int, c_in: int, stage: Stage, head_dim: int, ds_expansion: int,
                 se_reduction: int) -> tuple[Block, ...]:
    """Blocks of one stage given its input side and width (cached: the hot path of counting)."""
    blocks: list[Block] = []
    if isinstance(stage, MBStage):
        for j in range(stage.depth):
            stride = ss.stride if j == 0 else 1
            blocks.append(Block("mbconv", h, c_in if j == 0 else stage.width, stage.width,
                                expansion=stage.expansion, kernel=stage.kernel, stride=stride, se=ss.se,
                                se_reduction=se_reduction))
            h = out_side(h, stride)
        return tuple(blocks)
    ds = Block("mbconv", h, c_in, stage.width, expansion=ds_expansion, kernel=3, stride=ss.stride, se=True,
               se_reduction=se_reduction)
    blocks.append(ds)
    h = ds.h_out
    for _ in range(stage.depth):
        blocks.append(Block("attn", h, stage.width, stage.width, mlp_ratio=stage.mlp_ratio,
                            v_scale=stage.v_scale, head_dim=head_dim))
    return tuple(blocks)


def arch_blocks(arch: Arch, space: SearchSpace) -> list[Block]:
    """All blocks of `arch` in forward order (first conv, stem, stages, head)."""
    blocks: list[Block] = []
    r = arch.resolution
    c0 = arch.stem.width
    first = Block("first_conv", r, 3, c0, stride=space.first_stride)
    blocks.append(first)
    h = first.h_out
    for _ in range(arch.stem.depth):
        blocks.append(Block("mbconv", h, c0, c0, expansion=1, kernel=arch.stem.kernel, stride=1, se=False,
                            se_reduction=space.se_reduction))
    c = c0
    for ss, st in zip(space.stages, arch.stages):
        sb = stage_blocks(ss, h, c, st, space.head_dim, space.ds_expansion, space.se_reduction)
        blocks.extend(sb)
        h = sb[0].h_out if len(sb) else h
        # strides only happen on a stage's first block
        c = st.width
    blocks.append(_head(space, h, c))
    return blocks


def _head(space: SearchSpace, h: int, c: int) -> Block:
    return Block("head", h, c, space.num_classes, expansion=space.head_expansion, head_width=space.head_width)


def stage_sides(arch: Arch, space: SearchSpace) -> list[int]:
    """Input feature-map side of every stage (and, last, of the head)."""
    h = out_side(arch.resolution, space.first_stride)
    sides = []
    for ss in space.stages:
        sides.append(h)
        h = out_side(h, ss.stride)
    sides.append(h)
    return sides


@dataclass(frozen=True)
class Cost:
    flops_m: float
    params_m: float

    def to_dict(self) -> dict[str, float]:
        return {"flops_m": self.flops_m, "params_m": self.params_m}


@lru_cache(maxsize=1 << 18)
def _stage_cost(ss: StageSpace, h: int, c_in: int, stage: Stage, head_dim: int, ds_expansion: int,
                se_reduction: int) -> tuple[int, int]:
    blocks = stage_blocks(ss, h, c_in, stage, head_dim, ds_expansion, se_reduction)
    return sum(block_flops(b) for b in blocks), sum(block_params(b) for b in blocks)


@lru_cache(maxsize=1 << 14)
def _prefix_cost(space: SearchSpace, resolution: int, c0: int, depth: int, kernel: int) -> tuple[int, int]:
    first = Block("first_conv", resolution, 3, c0, stride=space.first_stride)
    stem = Block("mbconv", first.h_out, c0, c0, expansion=1, kernel=kernel, stride=1, se=False,
                 se_reduction=space.se_reduction)
    return (block_flops(first) + depth * block_flops(stem), block_params(first) + depth * block_params(stem))


@lru_cache(maxsize=1 << 12)
def _head_cost(space: SearchSpace, h: int, c: int) -> tuple[int, int]:
    b = _head(space, h, c)
    return block_flops(b), block_params(b)


def count(arch: Arch, space: SearchSpace) -> Cost:
    """FLOPs (MMACs) and params (M) of `arch` in `space`; no forward pass, cached per stage."""
    f, p = _prefix_cost(space, arch.resolution, arch.stem.width, arch.stem.depth, arch.stem.kernel)
    h = out_side(arch.resolution, space.first_stride)
    c = arch.stem.width
    for ss, st in zip(space.stages, arch.stages):
        sf, sp = _stage_cost(ss, h, c, st, space.head_dim, space.ds_expansion, space.se_reduction)
        f += sf
        p += sp
        h = out_side(h, ss.stride)
        c = st.width
    hf, hp = _head_cost(space, h, c)
    return Cost((f + hf) / 1e6, (p + hp) / 1e6)


def flops_m(arch: Arch, space: SearchSpace) -> float:
    return count(arch, space).flops_m


def params_m(arch: Arch, space: SearchSpace) -> float:
    return count(arch, space).params_m


def flops_range(space: SearchSpace) -> tuple[float, float]:
    return flops_m(space.smallest(), space), flops_m(space.largest(), space)

