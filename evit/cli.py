"""The `evit` command line: thin shells over the stage functions in `evit.stages`.

Every command takes `--params` and validates the whole file before doing anything, so a
typo fails in milliseconds, not after an hour of training. Errors the user can fix
(`ConfigError`, `ArchError`, `DataError`, ...) are printed as one clear message with exit
code 2, never as a stack trace.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from evit.errors import UserError

app = typer.Typer(help="ElasticViT pipeline: prepare, train, lut, search, export, fetch.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
arch_app = typer.Typer(help="Inspect architectures and search spaces.", no_args_is_help=True)
app.add_typer(arch_app, name="arch")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (default: params.yaml or $EVIT_PARAMS)")]
F = TypeVar("F", bound=Callable[..., Any])


def _friendly(fn: F) -> F:
    """Turn the errors a user can act on into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging() -> None:
    level = os.environ.get("EVIT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _params(path: Path) -> Any:
    from evit.config import load_params

    return load_params(path)


def _record_hand_run(kind: str, params_path: Path, device: str | None = None) -> None:
    """Record a stage run by hand in dvc.lock, as `evit pipeline` and `dvc repro` do, so that
    neither later overwrites what it produced. Only when this run is exactly the stage that
    dvc.yaml declares: run from the project root, with the params file dvc.yaml was rendered
    from; not under `dvc repro` (DVC records it) nor inside the pipeline's torchrun."""
    from flows import dvcfile, dvcrepo

    if os.environ.get("DVC_STAGE") or os.environ.get(dvcrepo.PIPELINE_ENV) or os.environ.get("RANK", "0") != "0":
        return
    root = params_path.expanduser().resolve().parent
    if Path.cwd().resolve() != root or not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return

    name = dvcfile.stage_name(kind, device)
    if dvcfile.render(_params(params_path), params_path.name, root) != (root / "dvc.yaml").read_text(encoding="utf-8"):
        logging.getLogger("evit").warning(
            "%s: not recorded in dvc.lock: dvc.yaml declares another params file, devices or paths; "
            "`evit pipeline -p %s -s %s` re-renders it and records the stage", name, params_path, kind)
        return
    if dvcrepo.record_hand_run(root, name) is not None:
        logging.getLogger("evit").info("%s: recorded in dvc.lock, so `evit pipeline` and `dvc repro` keep these "
                                       "outputs", name)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


@app.callback()
def _main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _setup_logging()


@app.command()
@_friendly
def prepare(params: ParamsOpt = Path("params.yaml")) -> None:
    """Prepare the dataset: stratified train/search/val uint8 shards + manifest under data.out_dir."""
    from evit import stages

    out = stages.prepare(_params(params))
    _record_hand_run("prepare", params)
    _echo_json(out)


@arch_app.command("info")
@_friendly
def arch_info(
    arch_json: Annotated[Path | None, typer.Argument(help="arch JSON file")] = None,
    space: Annotated[str, typer.Option(help="search space preset: cpu or imagenet")] = "cpu",
    num_classes: Annotated[int | None, typer.Option(help="classifier width (default: the preset's)")] = None,
    supernet: Annotated[bool, typer.Option("--supernet", help="report the supernet's parameter count")] = False,
) -> None:
    """Print FLOPs (MMACs) and params of an architecture, or of the whole supernet."""
    from evit import flops
    from evit.arch import Arch
    from evit.space import get_space

    sp = get_space(space, num_classes=num_classes)
    if supernet:
        from evit.nn.supernet import Supernet

        net = Supernet(sp)
        _echo_json({"space": sp.name, "num_classes": sp.num_classes,
                    "supernet_params": sum(p.numel() for p in net.parameters()),
                    "supernet_params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
                    "flops_range_m": list(flops.flops_range(sp))})
        return
    if arch_json is None:
        raise UserError("give an ARCH.json file, or --supernet")
    if not arch_json.is_file():
        raise UserError(f"arch file {str(arch_json)!r} not found")
    arch = sp.validate(Arch.from_json(arch_json.read_text()))
    cost = flops.count(arch, sp)
    _echo_json({"arch": arch.to_dict(), "key": arch.key, "flops_m": round(cost.flops_m, 4),
                "params_m": round(cost.params_m, 4), "level": sp.level_of(cost.flops_m)})


DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="device name from params.yaml `devices:`")]


@app.command()
@_friendly
def train(
    params: ParamsOpt = Path("params.yaml"),
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore models/last.pt and start over")] = False,
) -> None:
    """Train the weight-sharing supernet with the configured sampler (resumes by default)."""
    from evit import stages

    out = stages.train(_params(params), resume=not fresh)
    _record_hand_run("train", params)
    _echo_json(out)


@app.command()
@_friendly
def ablate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Train the same budget with each sampler and seed; compare accuracy per FLOPs level."""
    from evit import stages

    _echo_json(stages.ablate(_params(params)))


@app.command()
@_friendly
def baselines(params: ParamsOpt = Path("params.yaml")) -> None:
    """Train the standalone timm models of `baselines.models` with the supernet's recipe; time them per device."""
    from evit import stages

    _echo_json(stages.baselines(_params(params)))
    _record_hand_run("baselines", params)


def _device_stage(stage: str, device: str, params_path: Path) -> None:
    """Validate params and the device name up front, then run one per-device stage."""
    from evit import stages

    p = _params(params_path)
    p.device(device)
    out = getattr(stages, stage)(p, device)
    _record_hand_run(stage, params_path, device)
    _echo_json(out)


@app.command()
@_friendly
def lut(device: DeviceOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Build (or resume) the latency lookup table of one device and validate it."""
    _device_stage("lut", device, params)


@app.command()
@_friendly
def search(device: DeviceOpt, params: ParamsOpt = Path("params.yaml")) -> None:
    """Evolutionary search of the best subnet per latency budget of one device."""
    _device_stage("search", device, params)


@app.command()
@_friendly
def export(
    device: DeviceOpt,
    params: ParamsOpt = Path("params.yaml"),
    register_only: Annotated[bool, typer.Option(
        "--register-only", help="export nothing; register the already exported subnets the registry lacks "
                                "(a new MLflow server, a wiped database)")] = False,
) -> None:
    """Export the chosen subnets of one device (ONNX, safetensors, card) and register them."""
    if not register_only:
        _device_stage("export", device, params)
        return
    from evit.registry import restore_registrations

    p = _params(params)
    p.device(device)
    _echo_json({"device": device, "registered_again": restore_registrations(p, device)})


@app.command()
@_friendly
def fetch(
    ref: Annotated[str, typer.Argument(help="registered model, e.g. evit-cpu-1t@champion or evit-cpu-1t/3")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript | pytorch")] = "onnx",
    out: Annotated[Path, typer.Option("--out", help="directory to write the model files to")] = Path("fetched"),
    params: ParamsOpt = Path("params.yaml"),
    card: Annotated[bool, typer.Option("--card", help="print the full card and file list as JSON")] = False,
) -> None:
    """Download a registered model, verify its files against the recorded hashes, print a summary."""
    from evit.registry import fetch_model, fetch_report

    summary = fetch_model(_params(params), ref, fmt, out)
    if card:
        _echo_json(summary)
    else:
        typer.echo(fetch_report(summary))


@app.command("import-reference")
@_friendly
def import_reference(
    weights: Annotated[Path, typer.Argument(help="the reference's checkpoint: .pth as released, or .safetensors")],
    config: Annotated[Path, typer.Option("--config", help="the reference's space YAML it was trained with "
                                         "(e.g. final_3min_space.yaml)")],
    out: Annotated[Path, typer.Option("--out", help="evit checkpoint to write (models/supernet.pt for the pipeline)")],
    prefer: Annotated[str, typer.Option("--prefer", help="auto (EMA when present, like the reference) | ema | raw")]
    = "auto",
) -> None:
    """Import the paper's released supernet (microsoft/Moonlit ElasticViT) as an evit checkpoint."""
    from evit.reference_import import ReferenceImportError, import_reference as run_import

    if prefer not in ("auto", "ema", "raw"):
        raise ReferenceImportError(f"--prefer {prefer!r}: accepted: auto, ema, raw")
    _echo_json(run_import(weights, config, out, prefer=prefer))  # type: ignore[arg-type]


@app.command()
@_friendly
def pipeline(
    params: ParamsOpt = Path("params.yaml"),
    stage: Annotated[list[str] | None, typer.Option(
        "--stage", "-s", help="run only these stage kinds (repeatable): prepare, train, lut, search, export")] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", "-d", help="run the per-device stages for these devices only (repeatable)")] = None,
    force: Annotated[list[str] | None, typer.Option(
        "--force", help="rerun these stage kinds even when cached (repeatable), e.g. --force prepare")] = None,
) -> None:
    """Run the pipeline as a Prefect flow (ephemeral, no server needed); unchanged stages are cache hits."""
    from flows.pipeline import run_pipeline, subnets_table

    _params(params)  # validate before Prefect starts
    summary = run_pipeline(str(params), stages=stage or None, devices=device or None, force=force or None)
    _echo_json(summary)  # stdout: the machine-readable summary; the table below is for people (stderr)
    typer.echo(f"\nChosen subnets ({len(summary['ran'])} stage(s) ran, {len(summary['cached'])} cached):\n"
               f"{subnets_table(summary.get('subnets', []))}", err=True)


@app.command()
@_friendly
def serve(params: ParamsOpt = Path("params.yaml")) -> None:
    """Serve the scheduled deployments (nightly re-search, weekly retraining) on this machine."""
    from flows.deploy import serve_deployments

    _params(params)
    serve_deployments(str(params))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
