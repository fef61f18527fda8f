"""The `evit` command line: thin shells over the stage functions in `evit.stages`.

Every command takes `--params` and validates the whole file before doing anything, so a
typo fails in milliseconds, not after an hour of training. Errors the user can fix
(`ConfigError`, `ArchError`, `DataError`, ...) are printed as one clear message with exit
code 2, never as a stack trace.

Every argument that names a file or folder says what it expects with a `PathArg` in its
annotation; the files are read through `evit.io`'s one reader, and tests/test_cli_sweep.py
feeds each such argument every kind of damaged file.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from evit.errors import UserError

app = typer.Typer(help="ElasticViT pipeline: prepare, train, lut, search, export, fetch.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
arch_app = typer.Typer(help="Inspect architectures and search spaces.", no_args_is_help=True)
app.add_typer(arch_app, name="arch")



class PathArg(enum.Enum):
    """What an argument that names a file or folder expects. Every such argument carries one in
    its annotation (`Annotated[Path, typer.Option(...), PathArg.PARAMS]`); tests/test_cli_sweep.py
    finds them there and feeds each the bad inputs of its kind, so a new one is swept too."""

    PARAMS = "a params YAML file"
    OVERRIDE = "KEY=VALUE or an override YAML file"
    ARCH = "a released model name or an arch JSON file"
    REFERENCE_CONFIG = "the reference's space config (YAML, or JSON holding it under 'yaml')"
    CHECKPOINT = "a checkpoint file to read (.pth, .safetensors)"
    OUTPUT_FILE = "a file to write"
    OUTPUT_DIR = "a folder to write into"


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (default: params.yaml or $EVIT_PARAMS)"),
                      PathArg.PARAMS]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE|FILE.yaml",
    help="override params (repeatable): KEY=VALUE (e.g. train.epochs=2, devices.cpu-4t.repeats=5) or a YAML "
         "file merged on top; also read from $EVIT_OVERRIDES (one item per line)"), PathArg.OVERRIDE]
F = TypeVar("F", bound=Callable[..., Any])


def _friendly(fn: F) -> F:
    """Turn the errors a user can act on into one line on stderr and exit code 2, and a stop by
    SIGTERM / SIGINT (`evit.cancel`) into one line and exit code 143 / 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from evit import cancel

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except cancel.Cancelled as exc:
            typer.secho(f"stopped: {exc}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("stopped: interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(cancel.exit_code(cancel.requested() or signal.SIGINT)) from None
        except BaseException as exc:  # Prefect's SIGTERM bridge in a flow (a BaseException)
            if type(exc).__name__ != "TerminationSignal":
                raise
            typer.secho(f"stopped: {exc}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(cancel.exit_code(getattr(exc, "signal", None) or signal.SIGTERM)) from None

    return wrapper  # type: ignore[return-value]


NoWaitOpt = Annotated[bool, typer.Option(
    "--no-wait", help="fail at once if another run holds this workspace, instead of waiting for it")]


@contextlib.contextmanager
def _writer(what: str, no_wait: bool) -> Iterator[None]:
    """Hold this workspace (the current directory) while a stage writes into it; SIGTERM /
    Ctrl-C stop the stage after its current step (`evit.cancel`)."""
    from evit import cancel
    from evit.workspace import workspace_lock

    cancel.install()
    with workspace_lock(Path.cwd(), what, wait=not no_wait):
        yield


def _setup_logging() -> None:
    level = os.environ.get("EVIT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _params(path: Path | None, overrides: list[str] | None = None, *, to_children: bool = False) -> Any:
    """Validated params with the `--set` overrides on top (after $EVIT_OVERRIDES).

    `to_children`: also put the overrides into $EVIT_OVERRIDES, for commands whose work runs
    in other processes that load params themselves (pipeline: Prefect tasks, dvc, torchrun).
    """
    from evit.config import OVERRIDES_ENV, override_items
    from evit.stages import load

    items = list(overrides or [])
    p = load(path, items)  # before the environment changes: a bad item leaves it as it was
    if to_children and items:  # files as absolute paths: the children may run elsewhere
        os.environ[OVERRIDES_ENV] = "\n".join(override_items(
            [os.path.abspath(o) if os.path.lexists(o) else o for o in items]))
    return p


def _record_hand_run(kind: str, params_path: Path, device: str | None = None, *,
                     overrides: list[str] | None = None) -> None:
    """Record a stage run by hand in dvc.lock, as `evit pipeline` and `dvc repro` do, so that
    neither later overwrites what it produced. Only when this run is exactly the stage that
    dvc.yaml declares: run from the project root, with the params file dvc.yaml was rendered
    from; not under `dvc repro` (DVC records it) nor inside the pipeline's torchrun."""
    from evit.config import OVERRIDES_ENV
    from flows import dvcfile, dvcrepo

    if os.environ.get("DVC_STAGE") or os.environ.get(dvcrepo.PIPELINE_ENV) or os.environ.get("RANK", "0") != "0":
        return
    root = params_path.expanduser().resolve().parent
    if Path.cwd().resolve() != root or not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return

    name = dvcfile.stage_name(kind, device)
    if overrides or os.environ.get(OVERRIDES_ENV):
        logging.getLogger("evit").warning(
            "%s: not recorded in dvc.lock: it ran with --set/$%s overrides that dvc.yaml does not declare; "
            "write lasting changes into %s", name, OVERRIDES_ENV, params_path)
        return
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
def prepare(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None, no_wait: NoWaitOpt = False) -> None:
    """Prepare the dataset: stratified train/search/val shards + manifest under data.out_dir."""
    from evit import stages

    p = _params(params, overrides)
    with _writer("evit prepare", no_wait):
        out = stages.prepare(p)
        _record_hand_run("prepare", params, overrides=overrides)
    _echo_json(out)


@arch_app.command("list")
@_friendly
def arch_list() -> None:
    """The paper's released models (usable by name in `arch info`, `export --arch`, search.fixed_archs)."""
    from evit import flops
    from evit.released import RELEASED, RELEASED_SPACE
    from evit.space import get_space

    sp = get_space(RELEASED_SPACE)
    rows = []
    for m in RELEASED.values():
        f = flops.flops_by_convention(m.arch, sp)
        rows.append({"name": m.name, "key": m.arch.key, "resolution": m.arch.resolution,
                     "paper_flops_m": m.reference_flops_m, "flops_reference_m": round(f["reference"], 4),
                     "flops_true_m": round(f["true"], 4), "params_m": round(flops.params_m(m.arch, sp), 4)})
    _echo_json({"space": RELEASED_SPACE, "models": rows})


@arch_app.command("info")
@_friendly
def arch_info(
    arch: Annotated[str | None, typer.Argument(help="a released model name (`evit arch list`) or an arch JSON file"),
                    PathArg.ARCH] = None,
    space: Annotated[str | None, typer.Option(
        help="search space preset: cpu or imagenet (default: --params's, imagenet for a released name, else cpu)")]
    = None,
    convention: Annotated[str | None, typer.Option(
        help="FLOPs convention of `flops_m`: true or reference (default: --params's space.flops_convention, "
             "else true); both are always printed as flops_true_m and flops_reference_m")] = None,
    num_classes: Annotated[int | None, typer.Option(help="classifier width (default: the preset's)")] = None,
    supernet: Annotated[bool, typer.Option("--supernet", help="report the supernet's parameter count")] = False,
    params: Annotated[Path | None, typer.Option("--params", "-p", help="take space and convention from this "
                                                                         "params file"), PathArg.PARAMS] = None,
    overrides: SetOpt = None,
) -> None:
    """Print FLOPs (MMACs, both conventions) and params of an architecture, or of the whole supernet."""
    from evit import flops
    from evit.released import released, resolve_arch
    from evit.space import get_space

    # --set alone applies to the default params file (params.yaml or $EVIT_PARAMS); it was ignored
    p = _params(params, overrides) if params is not None or overrides else None
    named = released(arch) if arch else None
    preset = space or (p.space.preset if p else None) or ("imagenet" if named else "cpu")
    conv = convention or (p.space.flops_convention if p else None) or "true"
    sp = get_space(preset, p.space.levels if p else None, p.space.tolerance if p else None, num_classes, conv)
    if supernet:
        from evit.nn.supernet import Supernet

        net = Supernet(sp)
        _echo_json({"space": sp.name, "num_classes": sp.num_classes,
                    "supernet_params": sum(p.numel() for p in net.parameters()),
                    "supernet_params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
                    "flops_convention": sp.flops_convention, "flops_range_m": list(flops.flops_range(sp))})
        return
    if arch is None:
        raise UserError("give a released model name (`evit arch list`), an ARCH.json file, or --supernet")
    name, a = resolve_arch(arch)
    a = sp.validate_computable(a)
    rule = sp.width_rule(a)
    if rule is not None:  # the weights compute it; sampling and search never draw it
        typer.echo(f"warning: {rule} (the supernet computes it, but sampling, mutation and search do not draw "
                   "such subnets)", err=True)
    cost = flops.count(a, sp)
    both = flops.flops_by_convention(a, sp)
    out = {"arch": a.to_dict(), "key": a.key, "space": sp.name, "flops_convention": sp.flops_convention,
           "flops_m": round(cost.flops_m, 4), "flops_true_m": round(both["true"], 4),
           "flops_reference_m": round(both["reference"], 4), "params_m": round(cost.params_m, 4),
           "level": sp.level_of(cost.flops_m)}
    if named is not None:
        out.update(name=named.name, paper_flops_m=named.reference_flops_m)
    _echo_json(out)


DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="device name from params.yaml `devices:`")]


@app.command()
@_friendly
def train(
    params: ParamsOpt = Path("params.yaml"),
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore models/last.pt and start over")] = False,
    init: Annotated[Path | None, typer.Option(
        "--init", help="start from this trained supernet (evit's supernet.pt copied out of models/, or "
        "`evit import-reference`'s output): fine-tuning; same as --set train.init=PATH"),
        PathArg.CHECKPOINT] = None,
    overrides: SetOpt = None,
    no_wait: NoWaitOpt = False,
) -> None:
    """Train the weight-sharing supernet with the configured sampler (resumes by default).

    SIGTERM / Ctrl-C stop it after the current step with a checkpoint of that step (exit 143 / 130)."""
    from evit import stages

    if init is not None:  # the file first: a bad one is named before params, data or locks
        from evit.train.warm_start import check_init_file

        check_init_file(init)
        overrides = [*(overrides or []), f"train.init={init}"]
    p = _params(params, overrides)
    with _writer("evit train", no_wait):
        out = stages.train(p, resume=not fresh)
        _record_hand_run("train", params, overrides=overrides)
    _echo_json(out)


@app.command()
@_friendly
def ablate(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None, no_wait: NoWaitOpt = False) -> None:
    """Train the same budget with each sampler and seed; compare accuracy per FLOPs level."""
    from evit import stages

    p = _params(params, overrides)
    with _writer("evit ablate", no_wait):
        out = stages.ablate(p)
    _echo_json(out)


@app.command()
@_friendly
def baselines(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None, no_wait: NoWaitOpt = False) -> None:
    """Train the standalone timm models of `baselines.models` with the supernet's recipe; time them per device."""
    from evit import stages

    p = _params(params, overrides)
    with _writer("evit baselines", no_wait):
        out = stages.baselines(p)
        _record_hand_run("baselines", params, overrides=overrides)
    _echo_json(out)


def _device_stage(stage: str, device: str, params_path: Path, overrides: list[str] | None = None,
                  no_wait: bool = False) -> None:
    """Validate params and the device name up front, then run one per-device stage."""
    from evit import stages

    p = _params(params_path, overrides)
    p.device(device)
    if stage == "export":  # it registers: a missing login fails now, not after the export
        from evit import tracking

        tracking.check_server(p)
    with _writer(f"evit {stage} -d {device}", no_wait):
        out = getattr(stages, stage)(p, device)
        _record_hand_run(stage, params_path, device, overrides=overrides)
    _echo_json(out)


@app.command()
@_friendly
def lut(device: DeviceOpt, params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
        no_wait: NoWaitOpt = False) -> None:
    """Build (or resume) the latency lookup table of one device and validate it."""
    _device_stage("lut", device, params, overrides, no_wait)


@app.command()
@_friendly
def search(device: DeviceOpt, params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
           no_wait: NoWaitOpt = False) -> None:
    """Evolutionary search of the best subnet per latency budget of one device (+ search.fixed_archs)."""
    _device_stage("search", device, params, overrides, no_wait)


@app.command()
@_friendly
def export(
    device: DeviceOpt,
    params: ParamsOpt = Path("params.yaml"),
    register_only: Annotated[bool, typer.Option(
        "--register-only", help="export nothing; register the already exported subnets the registry lacks "
                                "(a new MLflow server, a wiped database)")] = False,
    arch: Annotated[list[str] | None, typer.Option(
        "--arch", help="export this architecture instead of the search result (repeatable): a released "
                       "model name (`evit arch list`) or an arch JSON file; added beside the searched ones"),
        PathArg.ARCH] = None,
    overrides: SetOpt = None,
    no_wait: NoWaitOpt = False,
) -> None:
    """Export the chosen subnets of one device (ONNX, safetensors, card) and register them."""
    if not register_only and not arch:
        _device_stage("export", device, params, overrides, no_wait)
        return
    from evit import stages, tracking
    from evit.released import resolve_arch

    p = _params(params, overrides)
    p.device(device)
    tracking.check_server(p)
    for spec in arch or []:  # a bad name or file fails before the workspace is taken
        resolve_arch(spec)
    with _writer(f"evit export -d {device}", no_wait):
        out = ({"device": device, "registered_again": stages.restore_registrations(p, device)} if register_only
               else stages.export(p, device, archs=arch))
    _echo_json(out)


@app.command()
@_friendly
def fetch(
    ref: Annotated[str, typer.Argument(help="registered model, e.g. evit-cpu-1t@champion or evit-cpu-1t/3")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript | pytorch | tflite | pte")] = "onnx",
    precision: Annotated[str, typer.Option("--precision", help="fp32 | int8 (int8: pte only, when exported)")] = "fp32",
    out: Annotated[Path, typer.Option("--out", help="directory to write the model files to"),
                   PathArg.OUTPUT_DIR] = Path("fetched"),
    params: ParamsOpt = Path("params.yaml"),
    card: Annotated[bool, typer.Option("--card", help="print the full card and file list as JSON")] = False,
    overrides: SetOpt = None,
) -> None:
    """Download a registered model, verify its files against the recorded hashes, print a summary."""
    from evit import tracking
    from evit.registry import fetch_model, fetch_report

    p = _params(params, overrides)
    tracking.check_server(p)
    summary = fetch_model(p, ref, fmt, out, precision)
    if card:
        _echo_json(summary)
    else:
        typer.echo(fetch_report(summary))


@app.command("grant-roles")
@_friendly
def grant_roles(
    params: ParamsOpt = Path("params.yaml"),
    pipeline_user: Annotated[str, typer.Option("--pipeline", help="the account that runs the pipeline (EDIT)")]
    = "pipeline",
    reader_user: Annotated[str, typer.Option("--reader", help="the account that fetches models (READ)")] = "reader",
    overrides: SetOpt = None,
) -> None:
    """Team mode: create the `pipeline` and `reader` MLflow accounts and grant them the experiment and
    the models of params (run as the MLflow admin; new passwords from EVIT_PIPELINE_PASSWORD /
    EVIT_READER_PASSWORD). Idempotent: run it again after adding a device."""
    from evit.registry.access import grant_roles as grant

    _echo_json(grant(_params(params, overrides), pipeline=pipeline_user, reader=reader_user))


@app.command("import-reference")
@_friendly
def import_reference(
    weights: Annotated[Path, typer.Argument(help="the reference's checkpoint: .pth as released, or .safetensors"),
                       PathArg.CHECKPOINT],
    config: Annotated[Path, typer.Option("--config", help="the reference's space YAML it was trained with "
                                         "(e.g. final_3min_space.yaml)"), PathArg.REFERENCE_CONFIG],
    out: Annotated[Path, typer.Option("--out", help="evit checkpoint to write (models/supernet.pt for the pipeline)"),
                   PathArg.OUTPUT_FILE],
    prefer: Annotated[str, typer.Option("--prefer", help="auto (EMA when present, like the reference) | ema | raw")]
    = "auto",
) -> None:
    """Import the paper's released supernet (microsoft/Moonlit ElasticViT) as an evit checkpoint."""
    from evit.train.import_reference import ReferenceImportError
    from evit.train.import_reference import import_reference as run_import

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
    overrides: SetOpt = None,
    no_wait: NoWaitOpt = False,
) -> None:
    """Run the pipeline as a Prefect flow (ephemeral, no server needed); unchanged stages are cache hits.

    SIGTERM / Ctrl-C stop every running stage after its current step (exit 143 / 130)."""
    from evit import cancel, tracking
    from flows.access import check_prefect_api
    from flows.pipeline import check_selection, run_pipeline
    from flows.report import subnets_table

    # validate before Prefect (or any server) starts, and pass the overrides on to its tasks
    p = _params(params, overrides, to_children=True)
    check_selection(p, stage, device, force)
    tracking.check_server(p)
    check_prefect_api()
    cancel.install()
    summary = run_pipeline(str(params), stages=stage or None, devices=device or None, force=force or None,
                           wait=not no_wait)
    _echo_json(summary)  # stdout: the machine-readable summary; the table below is for people (stderr)
    typer.echo(f"\nChosen subnets ({len(summary['ran'])} stage(s) ran, {len(summary['cached'])} cached):\n"
               f"{subnets_table(summary.get('subnets', []))}", err=True)


@app.command()
@_friendly
def serve(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Serve the scheduled deployments (nightly re-search, weekly retraining) on this machine."""
    from flows.access import check_prefect_api
    from flows.deploy import serve_deployments

    _params(params, overrides, to_children=True)
    check_prefect_api()
    serve_deployments(str(params))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
