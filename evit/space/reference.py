"""Search spaces built from the reference implementation's own space config.

The paper's supernet was trained from a YAML file (`final_3min_space.yaml` in
microsoft/Moonlit `ElasticViT/configs/`); its `search_space` section fixes the tensor
shapes of the released checkpoint. `reference_space(config)` turns that config into a
`SearchSpace` with `variant="reference"`, which `evit.nn.factory.build_supernet` builds as
`evit.nn.reference.ReferenceSupernet`. Accepted inputs: the YAML file itself, or a JSON
file holding it under a `yaml` key (the fixture's `space.json`).

What the reference hard-codes rather than reads from the YAML (and so do we): first-conv /
stem widths {16, 24} (one value for both), stem depths {1, 2}, kernels {3, 5}, head dim 16,
the transformer downsampling block (expansion 6 of its input width, kernel 3, SE). Width
choices step by 8 in MBConv stages and by the head dim in transformer stages, from
`min_channels` to `max_channels`. Levels: `min_flops`..`limit_flops` by 100 plus
`big_bank_choices`, window `flops_bound` (override them in `params.yaml` for a shrunk space).
Fields the forward ignores (`num_heads`, `kr_size`, `input_size`, ...) are not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evit.errors import UserError
from evit.io import read_user_yaml
from evit.space.core import SearchSpace, StageSpace

STEM_WIDTHS = (16, 24)
STEM_DEPTHS = (1, 2)
KERNELS = (3, 5)
MB_WIDTH_STEP = 8


class ReferenceConfigError(UserError, ValueError):
    """A reference space config that is unreadable or outside what the reference code builds."""


REFERENCE_EXPECTED = ("the reference's space config (a YAML mapping with a 'search_space' section, e.g. "
                      "final_3min_space.yaml), or a JSON file holding it under 'yaml'")


def read_reference_config(path: str | Path) -> dict[str, Any]:
    """The reference config dict from a YAML file or a JSON file holding it under `yaml`."""
    p = Path(path)
    data = read_user_yaml(p, "reference space config", expect=REFERENCE_EXPECTED,
                          error=ReferenceConfigError)  # JSON is YAML too
    if "search_space" not in data and isinstance(data.get("yaml"), dict):
        data = data["yaml"]
    if not isinstance(data.get("search_space"), dict):
        raise ReferenceConfigError(f"reference space config {str(p)!r} has no 'search_space' mapping; expected "
                                   f"{REFERENCE_EXPECTED}")
    return data


def reference_space(config: dict[str, Any], *, num_classes: int | None = None,
                    name: str = "reference") -> SearchSpace:
    """The `variant="reference"` SearchSpace that the reference builds from `config`."""
    ss = config["search_space"]
    if str(config.get("norm_layer", "LN")) != "LN" or not config.get("pre_norm", True):
        raise ReferenceConfigError(f"reference config: norm_layer {config.get('norm_layer')!r} / pre_norm "
                                   f"{config.get('pre_norm')!r}; only the released LN + pre-norm supernet is supported")

    def get(key: str) -> Any:
        if key not in ss:
            raise ReferenceConfigError(f"reference config: search_space.{key} is missing")
        return ss[key]

    kinds = [str(k) for k in get("stage")]
    n = len(kinds)
    n_mb = kinds.count("C")
    if kinds != ["C"] * n_mb + ["T"] * (n - n_mb) or n_mb < 1 or n_mb == n:
        raise ReferenceConfigError(f"reference config: search_space.stage = {kinds}; expected 'C' stages then 'T' stages")
    per_stage = {k: list(get(k)) for k in ("max_channels", "min_channels", "max_depth", "min_depth", "downsampling",
                                           "se")}
    for k, v in per_stage.items():
        if len(v) != n:
            raise ReferenceConfigError(f"reference config: search_space.{k} has {len(v)} entries; {n} stages")
    head_dim = int(ss.get("head_dims", 16))
    n_t = n - n_mb
    v_scale = list(get("v_scale"))
    if len(v_scale) != n_t:
        raise ReferenceConfigError(f"reference config: search_space.v_scale needs one list per transformer stage ({n_t})")
    for key in ("qk_scale", "windows_size"):
        vals = {int(x) for per in ss.get(key, [[1]]) for x in per}
        if vals != {1}:
            raise ReferenceConfigError(f"reference config: search_space.{key} = {ss.get(key)}; only 1 is supported "
                                       "(the public reference code has no other)")
    mlp = [int(x) for x in get("mlp_ratio")]
    if mlp[0] != max(mlp):
        raise ReferenceConfigError(f"reference config: search_space.mlp_ratio = {mlp}; the reference sizes its "
                                   "FFNs on the first entry, so it must be the largest")
    expansions = tuple(sorted({int(x) for x in get("conv_ratio")}))
    stages = []
    for i, kind in enumerate(kinds):
        lo, hi = int(per_stage["min_channels"][i]), int(per_stage["max_channels"][i])
        step = MB_WIDTH_STEP if kind == "C" else head_dim
        widths = tuple(range(lo, hi + 1, step))
        if not widths or widths[-1] != hi:
            raise ReferenceConfigError(f"reference config: stage {i} channels {lo}..{hi} are not on a step of {step}")
        depths = tuple(range(int(per_stage["min_depth"][i]), int(per_stage["max_depth"][i]) + 1))
        stride = 2 if per_stage["downsampling"][i] else 1
        if kind == "C":
            stages.append(StageSpace("mbconv", widths, depths, stride, expansions=expansions, kernels=KERNELS,
                                     se=bool(per_stage["se"][i]), variant="reference"))
        else:
            stages.append(StageSpace("transformer", widths, depths, stride, mlp_ratios=tuple(sorted(set(mlp))),
                                     v_scales=tuple(sorted({int(x) for x in v_scale[i - n_mb]})),
                                     variant="reference"))
    maxima = [max(STEM_WIDTHS), *(max(s.widths) for s in stages)]
    if any(b < a for a, b in zip(maxima, maxima[1:])):
        raise ReferenceConfigError(f"reference config: max widths {maxima[1:]} (after the stem's {maxima[0]}) "
                                   "decrease; the reference sizes each block on its own stage's max width, so "
                                   "they must not")
    head_dims = list(config.get("classifer_head_dim") or [])  # sic
    if len(head_dims) < 2:
        raise ReferenceConfigError("reference config: classifer_head_dim needs two entries (the second is used)")
    classes = num_classes if num_classes is not None else int((config.get("dataloader") or {}).get("num_classes", 1000))
    lo_f, hi_f = ss.get("min_flops"), ss.get("limit_flops")
    levels = list(range(int(lo_f), int(hi_f) + 1, 100)) if lo_f is not None and hi_f is not None else []
    levels += [int(x) for x in ss.get("big_bank_choices") or [] if int(x) not in levels]
    return SearchSpace(
        name=name,
        resolutions=tuple(int(r) for r in get("res")),
        stem_widths=STEM_WIDTHS, stem_depths=STEM_DEPTHS, stem_kernels=KERNELS,
        stages=tuple(stages),
        first_stride=2,
        head_expansion=int(get("classifier_mul")),
        head_width=int(head_dims[1]),
        head_dropout=0.0,  # the reference trains with head dropout 0 (set_regularization_mode)
        head_dim=head_dim,
        ds_expansion=6,
        se_reduction=4,
        levels=tuple(sorted(levels)),
        tolerance=float(ss.get("flops_bound", 10)),
        num_classes=classes,
        variant="reference",
    )


def load_reference_space(path: str | Path | None, *, num_classes: int | None = None) -> SearchSpace:
    """`reference_space` of the config file at `path` (`params.space.reference_config`)."""
    if path is None:
        raise ReferenceConfigError("space.preset is 'reference' but space.reference_config is not set; "
                                   "give the reference's space YAML (e.g. final_3min_space.yaml)")
    config = read_reference_config(path)
    where = f"reference space config {str(path)!r}"
    try:
        return reference_space(config, num_classes=num_classes)
    except ReferenceConfigError as exc:
        raise ReferenceConfigError(f"{where}: {str(exc).removeprefix('reference config: ')}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a list where a number belongs, ...
        raise ReferenceConfigError(f"{where}: a value of the wrong type ({type(exc).__name__}: {exc}); expected "
                                   f"{REFERENCE_EXPECTED}") from None
