"""dvc.yaml, rendered from params.yaml: the one declaration of every stage's inputs and outputs.

DVC and the Prefect flow share it: `dvc repro` runs the stages from it, and the flow asks
DVC (through `flows.dvcrepo`) what a stage depends on, whether it is up to date, and
records each stage it ran in `dvc.lock`. So both drivers agree on what "changed" means.

Why rendered and not hand-written: per-device stages are a `foreach` over the device
names (`lut@cpu-1t`, `search@cpu-1t`, ...) and each must depend on *its own* entry of the
`devices:` list only (`devices.<index>`), so that changing one device's settings reruns
only that device's branch. DVC cannot select a list entry by name, so the mapping
name -> index is written into dvc.yaml; `evit pipeline` re-renders the file whenever the
devices or paths in params.yaml change (`python -m flows.dvcfile` does it by hand), and
a test keeps the committed dvc.yaml equal to the rendering of the committed params.yaml.
Reordering devices changes their indices, so it reruns the reordered branches.

Cache keys are exactly what each stage reads. A device's `lut` reads every key of its entry
but `budgets_ms` (the budgets only steer search and export), so it depends on those keys one
by one (`devices.<index>.<key>`) and a budget change reruns only the device's search and
export. DVC fails on a params key missing from the file, so only keys present in the
entry are listed (a key left out is its default); adding or removing a key in an entry
re-renders dvc.yaml like adding a device does.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path, PurePosixPath

import yaml

from evit import paths
from evit.config import Params, load_params
from evit.io import write_text_atomic

log = logging.getLogger(__name__)

DVC_YAML = "dvc.yaml"
DEFAULT_PARAMS_FILE = "params.yaml"

STAGE_KINDS = ("prepare", "train", "baselines", "lut", "search", "export")
PER_DEVICE = ("lut", "search", "export")
NOT_READ_BY_LUT = ("budgets_ms", "convert_jobs")
"""Keys of a `devices:` entry a table does not depend on: the budgets (only search and export
read them) and how many conversions run at once (speed only)."""


def stage_name(kind: str, device: str | None = None) -> str:
    """The DVC stage name: `prepare`, `train`, or `<kind>@<device>` for per-device stages."""
    if kind in PER_DEVICE:
        if not device:
            raise ValueError(f"stage {kind!r} is per device; give a device name")
        return f"{kind}@{device}"
    return kind


def _posix(p: Path | str) -> str:
    return PurePosixPath(Path(p).as_posix()).as_posix()


def _device_path(path: Path, device: str) -> str:
    """A per-device path with the device name replaced by DVC's `${key}`."""
    text = _posix(path)
    if device not in text:
        raise AssertionError(f"path {text} does not contain the device name {device}")
    return text.replace(device, "${key}")


def _dep_path(path: str, root: Path) -> str:
    """A local path as DVC writes a dependency: relative to the project root when inside it."""
    src = Path(path).expanduser()
    full = src if src.is_absolute() else root / src
    try:
        return _posix(full.resolve().relative_to(root.resolve()))
    except ValueError:
        return _posix(full.resolve())


def _source_dep(params: Params, root: Path) -> str | None:
    """The data source as a DVC dependency when it is a local directory (S3 and digits are not)."""
    source = params.data.source
    if source == "digits" or source.startswith("s3://"):
        return None
    return _dep_path(source, root)


def _declared(params_file: str, root: Path) -> tuple[set[str], list[list[str]]]:
    """Top-level sections present in the params file, and the keys of each `devices:` entry.

    DVC fails a stage whose params key is absent from the file, and a section left out of
    the file is all defaults anyway: only present sections are declared (adding one later
    re-renders dvc.yaml, and DVC rightly reruns the stages that now depend on it)."""
    path = root / params_file
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if not isinstance(data, dict):
        return set(), []
    devices = data.get("devices")
    entries = [[str(k) for k in d] if isinstance(d, dict) else [] for d in devices] if isinstance(devices, list) else []
    return {str(k) for k in data}, entries


def _lut_items(entries: list[list[str]], devices: list[str]) -> tuple[str, list[str]]:
    """The lut stage's foreach items and its params template: per device, one item field per
    key it reads (`name`, then the union of the entries' keys but budgets_ms); a key an entry
    lacks points at that entry's `name`, so every device fills the same template."""
    keys = ["name"] + sorted({k for e in entries for k in e} - {"name", *NOT_READ_BY_LUT})
    lines = []
    for i, (name, entry) in enumerate(zip(devices, entries, strict=True)):
        fields = "".join(f"        {k}: devices.{i}.{k if k in entry else 'name'}\n" for k in keys)
        lines.append(f"      {name}:\n{fields}")
    return "".join(lines), [f"${{item.{k}}}" for k in keys]


def _params_block(params_file: str, keys: list[str], indent: str) -> str:
    if not keys:
        return ""
    if params_file == DEFAULT_PARAMS_FILE:
        return "".join(f"{indent}- {k}\n" for k in keys)
    inner = "".join(f"{indent}    - {k}\n" for k in keys)
    return f"{indent}- {params_file}:\n{inner}"


def render(params: Params, params_file: str = DEFAULT_PARAMS_FILE, root: Path | None = None) -> str:
    """The text of dvc.yaml for `params` (read from `params_file`, relative to the project root)."""
    root = root or Path.cwd()
    params_file = _posix(params_file)
    p_arg = "" if params_file == DEFAULT_PARAMS_FILE else f" --params {params_file}"
    prepared = _posix(paths.prepared_dir(params))
    manifest = _posix(paths.manifest_path(params))
    models = _posix(paths.train_dir(params))
    supernet = _posix(paths.checkpoint_path(params))
    devices = [d.name for d in params.devices]
    first = devices[0] if devices else "DEVICE"
    lut_out = _device_path(paths.lut_path(params, first), first)
    lut_metrics = _device_path(paths.lut_metrics_path(first), first)
    search_out = _device_path(paths.search_dir(params, first), first)
    search_metrics = _device_path(paths.search_metrics_path(first), first)
    export_out = _device_path(paths.export_dir(params, first), first)
    export_metrics = _device_path(paths.export_metrics_path(first), first)
    plots = _posix(paths.plots_dir())
    train_metrics = _posix(paths.train_metrics_path())
    source = _source_dep(params, root)
    present, entries = _declared(params_file, root)
    listed = len(entries) == len(devices) and bool(devices)
    lut_items, lut_keys = _lut_items(entries, devices) if listed else ("", [])

    def keys(*names: str) -> list[str]:
        out = [n for n in names if n in present and n != "devices"]
        if "devices" in names and listed:
            out.append("devices.${item}")
        return out

    def params_section(names: list[str], indent: str) -> str:
        return f"{indent[:-2]}params:\n{_params_block(params_file, names, indent)}" if names else ""
    foreach = "".join(f"      {name}: {i}\n" for i, name in enumerate(devices)) or "      {}\n"

    def per_device(kind: str) -> str:
        if kind == "lut" and lut_items:
            return (f"    foreach:  # device name -> the keys of its `devices:` entry in {params_file} that its LUT\n"
                    f"      # reads: all but budgets_ms (a key the entry lacks points at its name)\n{lut_items}")
        return f"    foreach:  # device name -> its index in `devices:` of {params_file}\n{foreach}"

    prepare_deps = f"    deps:\n      - {source}\n" if source else ""
    init_dep = f"      - {_dep_path(params.train.init, root)}  # train.init: the supernet it starts from\n" \
        if params.train.init else ""
    baselines_stage, baselines_dep = "", ""
    if params.baselines.models:  # evit/baselines: standalone models the search result compares against
        base_result = _posix(paths.baselines_result_path(params))
        baselines_dep = f"        - {base_result}\n"
        base_csvs = "".join(f"      - {plots}/baselines-{d}.csv  # latency vs val top-1, beside the search plot\n"
                            for d in devices)
        baselines_stage = f"""
  baselines:
    cmd: evit baselines{p_arg}
    deps:
      - {prepared}
{params_section(keys("space", "train", "baselines") + (["devices"] if "devices" in present else []), "      ")}\
    outs:
      - {_posix(paths.baselines_dir(params))}:
          persist: true  # <model>.last.pt: a killed run resumes
      - {base_result}
{base_csvs}    metrics:
      - {_posix(paths.baselines_metrics_path())}
"""
    return f"""\
# Rendered from {params_file} by `python -m flows.dvcfile` (and by `evit pipeline` when the
# devices or output paths change): edit {params_file}, not this file.
#
# Every stage runs through the `evit` CLI. `dvc repro` and `evit pipeline` (the Prefect flow)
# record the same dvc.lock, so either one finds nothing to redo after the other.
# Per-device stages depend on their own `devices.<index>` entry only (a LUT: not on its budgets).
# Plots are PNG images (no Vega charts), so `dvc plots show` renders offline.
stages:
  prepare:
    cmd: evit prepare{p_arg}
{prepare_deps}{params_section(keys("data"), "      ")}    outs:
      - {prepared}

  train:
    cmd: evit train{p_arg}
    deps:
      - {prepared}
{init_dep}{params_section(keys("space", "train"), "      ")}    outs:
      - {models}:
          persist: true  # models/last.pt: a killed or extended run resumes
    metrics:
      - {train_metrics}
    plots:
      - {plots}/train-loss.png
      - {plots}/train-flops.png
{baselines_stage}
  lut:
{per_device("lut")}    do:
      cmd: evit lut --device ${{key}}{p_arg}
      deps:
        - {manifest}
{params_section(keys("space") + lut_keys, "        ")}      outs:
        - {lut_out}
        - {plots}/lut-${{key}}.csv  # the points of the PNG plot, for other tools
      metrics:
        - {lut_metrics}
      plots:
        - {plots}/lut-${{key}}.png

  search:
{per_device("search")}    do:
      cmd: evit search --device ${{key}}{p_arg}
      deps:
        - {prepared}
        - {supernet}
        - {lut_out}
{baselines_dep}{params_section(keys("space", "search", "devices"), "        ")}      outs:
        - {search_out}:
            persist: true  # fitness-cache.json: no subnet is evaluated twice
        - {plots}/search-${{key}}.csv  # the Pareto front of the PNG plot, for other tools
      metrics:
        - {search_metrics}
      plots:
        - {plots}/search-${{key}}.png

  export:
{per_device("export")}    do:
      cmd: evit export --device ${{key}}{p_arg}
      deps:
        - {prepared}
        - {supernet}
        - {search_out}/result.json
{params_section(keys("export"), "        ")}      outs:
        - {export_out}
      metrics:
        - {export_metrics}
"""


def sync(params: Params, params_file: str = DEFAULT_PARAMS_FILE, root: Path | None = None) -> bool:
    """Write dvc.yaml into `root` when it differs from the rendering; True if it was (re)written."""
    root = root or Path.cwd()
    text = render(params, params_file, root)
    target = root / DVC_YAML
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return False
    log.info("%s %s from %s (devices: %s)", "updated" if target.exists() else "wrote", target, params_file,
             [d.name for d in params.devices])
    write_text_atomic(target, text)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Render dvc.yaml from params.yaml (run in the project root).")
    ap.add_argument("--params", "-p", default=DEFAULT_PARAMS_FILE)
    ap.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is out of date; write nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    if args.check:
        current = Path(DVC_YAML).read_text(encoding="utf-8") if Path(DVC_YAML).is_file() else ""
        raise SystemExit(0 if current == render(params, args.params) else 1)
    sync(params, args.params)


if __name__ == "__main__":  # pragma: no cover
    main()
