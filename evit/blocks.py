"""The one decomposition of a subnet into blocks: what FLOPs, modules, LUTs and the predictor share.

A `Block` is one unit of computation with everything that decides its cost (kind, input
side, widths, expansion, kernel, stride, ...). `arch_blocks(arch, space)` lists a subnet's
blocks in forward order (first conv, stem, stages, head); everything that reasons about a
subnet part by part walks this same list:
- `evit.flops` counts each block's MACs and params;
- `evit.nn.static.build_block` builds each block's module (`evit.nn` pairs the supernet's
  positions with the same blocks);
- a latency table (`evit.latency`) holds one measured entry per `Block.key`, and the
  predictor sums a subnet's blocks.
`tests/test_flops_hooks.py` checks the FLOPs of every block against forward hooks on the
module built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from evit.arch import Arch, MBStage, Stage, Stem
from evit.space import SearchSpace, StageSpace


@dataclass(frozen=True, order=True)
class Block:
    """One unit of computation with everything that decides its cost.

    kind: "first_conv" | "mbconv" | "attn" | "head". `h` is the input feature map side
    (tokens side for "attn"); unused fields are 0. `variant` is the module family of a
    stage block (`StageSpace.variant`): "reference" blocks have no shortcut BN, a shortcut
    conv only where the width changes (a strided block of equal widths pools the input),
    and no qkv or V-conv bias. The first conv, stem and head are the same in both.
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
    variant: str = "default"
    downsample: bool = field(default=False, compare=False)
    """The downsampling MBConv that opens a transformer stage. Only the "reference" FLOPs
    convention reads it; it takes no part in equality, order or `key` (LUT entries)."""

    @property
    def key(self) -> str:
        """Human-readable key used in LUT JSON files."""
        return self._key if self.variant == "default" else f"{self._key}|{self.variant}"

    @property
    def reference(self) -> bool:
        return self.variant == "reference"

    @property
    def _key(self) -> str:
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


def has_shortcut_conv(b: Block) -> bool:
    """Whether an MBConv block's shortcut runs a 1x1 conv (else identity or pooled identity)."""
    if b.reference:
        return b.c_in != b.c_out
    return b.c_in != b.c_out or b.stride != 1


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
                                se_reduction=se_reduction, variant=ss.variant))
            h = out_side(h, stride)
        return tuple(blocks)
    ds = Block("mbconv", h, c_in, stage.width, expansion=ds_expansion, kernel=3, stride=ss.stride, se=True,
               se_reduction=se_reduction, variant=ss.variant, downsample=True)
    blocks.append(ds)
    h = ds.h_out
    for _ in range(stage.depth):
        blocks.append(Block("attn", h, stage.width, stage.width, mlp_ratio=stage.mlp_ratio,
                            v_scale=stage.v_scale, head_dim=head_dim, variant=ss.variant))
    return tuple(blocks)


stage_blocks_uncached = stage_blocks.__wrapped__
"""`stage_blocks` without its cache, for bulk table fills that would only churn the cache."""


def arch_blocks(arch: Arch, space: SearchSpace) -> list[Block]:
    """All blocks of `arch` in forward order (first conv, stem, stages, head)."""
    blocks: list[Block] = []
    blocks.extend(prefix_blocks(space, arch.resolution, arch.stem))
    h = blocks[0].h_out
    c = arch.stem.width
    for ss, st in zip(space.stages, arch.stages):
        sb = stage_blocks(ss, h, c, st, space.head_dim, space.ds_expansion, space.se_reduction)
        blocks.extend(sb)
        h = sb[0].h_out if len(sb) else h
        # strides only happen on a stage's first block
        c = st.width
    blocks.append(head_block(space, h, c))
    return blocks


def head_block(space: SearchSpace, h: int, c: int) -> Block:
    """The head after a last stage of width `c` at side `h`."""
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


def prefix_blocks(space: SearchSpace, resolution: int, stem: Stem) -> list[Block]:
    """First conv + stem blocks, in forward order."""
    first = Block("first_conv", resolution, 3, stem.width, stride=space.first_stride)
    stem_block = Block("mbconv", first.h_out, stem.width, stem.width, expansion=1, kernel=stem.kernel, stride=1,
                       se=False, se_reduction=space.se_reduction)
    return [first, *([stem_block] * stem.depth)]
