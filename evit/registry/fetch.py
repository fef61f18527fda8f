"""Fetching a registered subnet: download, verify against the hashes recorded, write one format.

`fetch_model` (`evit fetch NAME@ALIAS|NAME/VERSION --format onnx|torchscript|pytorch|tflite|pte
[--precision fp32|int8]`) downloads a version's files (the int8 .pte / .tflite are files of
the same version, registered and verified like the others), checks every file against the sha256 tags recorded at
registration (a corrupt or tampered artifact store is an error, not a silent success),
writes the requested format and returns the card.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evit.card import classes_text
from evit.config import Params
from evit.errors import RegistryError
from evit.formats import bundle
from evit.io import check_output_dir, sha256_file, write_text_atomic
from evit.registry.connection import http_policy, mlflow_client, retrying
from evit.registry.tags import FILE_TAG_PREFIX, PT2_TAG
from evit.retry import is_transient, short
from evit.tracking import registry_uri

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "pytorch", "tflite", "pte")
_REF_RE = re.compile(r"^(?:models:/)?(?P<name>[^@/\s]+)(?:@(?P<alias>[^@/\s]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_ref(ref: str) -> ModelRef:
    m = _REF_RE.match(ref.strip())
    if not m:
        raise RegistryError(
            f"model reference {ref!r} is not understood; accepted: NAME@ALIAS (e.g. evit-cpu-1t@champion, "
            "evit-cpu-1t@1_5ms) or NAME/VERSION (e.g. evit-cpu-1t/3), optionally prefixed with models:/"
        )
    return ModelRef(m["name"], m["alias"], m["version"])


def resolve(client: Any, ref: ModelRef, uri: str) -> Any:
    """The ModelVersion that `ref` names; RegistryError naming what exists when it does not."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        if is_transient(exc):
            raise
        try:
            model = client.get_registered_model(ref.name)
        except MlflowException:
            names = sorted(m.name for m in client.search_registered_models(max_results=100))
            raise RegistryError(f"no registered model {ref.name!r} in {uri}; registered: {names or 'none'}") from None
        aliases = sorted(getattr(model, "aliases", {}) or {})
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{ref.name}'"))
        raise RegistryError(f"{ref} does not exist in {uri}; {ref.name} has aliases {aliases or 'none'} and "
                            f"versions {versions or 'none'}") from None


def verify_files(folder: Path, tags: dict[str, str], where: str) -> dict[str, str]:
    """Check every file with a recorded sha256 tag; returns name -> sha256."""
    expected = {k[len(FILE_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(FILE_TAG_PREFIX)}
    if not expected:
        raise RegistryError(f"{where} has no recorded file hashes (tags {FILE_TAG_PREFIX}*); it was not "
                            "registered by evit and cannot be verified")
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise RegistryError(f"{where}: file {name} recorded at registration is missing from the download")
        got = sha256_file(path)
        if got != digest:
            raise RegistryError(f"{where}: {name} has sha256 {got} but {digest} was recorded at registration; "
                                "the stored artifact is corrupt or was modified. Not using it.")
    return expected


def check_precision(fmt: str, precision: str) -> None:
    """Refuse a format / precision pair no export makes, before any download."""
    if precision not in bundle.PRECISIONS:
        raise RegistryError(f"--precision {precision!r} is not supported; accepted: {', '.join(bundle.PRECISIONS)}")
    if precision == "int8" and bundle.mobile_file(fmt, "int8") is None:
        raise RegistryError(f"--precision int8 exists for --format {', '.join(bundle.INT8_FILES)} only "
                            f"(got --format {fmt})")


def _write_format(fmt: str, src: Path, model_dir: Path, out: Path, precision: str = "fp32") -> dict[str, str]:
    """Write the requested format (at `precision`) into `out`; returns role -> path."""
    files: dict[str, str] = {}

    def copy(name: str, base: Path = src) -> None:
        target = out / name
        tmp = out / f".{name}.tmp"
        shutil.copyfile(base / name, tmp)
        os.replace(tmp, target)
        files[name] = str(target)

    if precision == "int8":  # check_precision let only formats with an int8 file through
        name = bundle.INT8_FILES[fmt]
        if not (src / name).is_file():
            raise RegistryError(f"this model version has no {name} (it was exported without int8 in "
                                "export.quantize); fetch --precision fp32, or export again with "
                                "export.quantize: [fp32, int8]")
        for f in (bundle.CARD, bundle.CARD_MD, name):
            copy(f)
        return files
    if fmt in bundle.MOBILE_FILES and not (src / bundle.MOBILE_FILES[fmt]).is_file():
        raise RegistryError(f"this model version has no {bundle.MOBILE_FILES[fmt]} (it was exported without "
                            f"'{fmt}' in export.formats); accepted here: onnx, torchscript, pytorch"
                            + "".join(f", {k}" for k, f in bundle.MOBILE_FILES.items() if (src / f).is_file()))
    copy(bundle.CARD)
    copy(bundle.CARD_MD)
    if fmt in bundle.MOBILE_FILES:
        copy(bundle.MOBILE_FILES[fmt])
    elif fmt == "onnx":
        copy(bundle.ONNX)
    elif fmt == "pytorch":
        copy(bundle.ARCH)
        copy(bundle.WEIGHTS)
        pt2 = model_dir / "data" / "model.pt2"
        if pt2.is_file():
            copy("model.pt2", pt2.parent)
    elif fmt == "torchscript":
        import torch

        module = bundle.load_static(src)
        r = module.arch.resolution
        try:
            scripted = torch.jit.script(module)
        except Exception as exc:  # noqa: BLE001 - scripting is best effort; tracing is exact for static nets
            log.info("torch.jit.script failed (%s); tracing instead", short(exc))
            with torch.no_grad():
                scripted = torch.jit.trace(module, torch.zeros(1, 3, r, r))
        target = out / "model.torchscript.pt"
        tmp = out / ".model.torchscript.pt.tmp"
        torch.jit.save(scripted, str(tmp))
        os.replace(tmp, target)
        files["model.torchscript.pt"] = str(target)
    return files


def fetch_model(params: Params, ref: str, fmt: str, out: str | os.PathLike[str],
                precision: str = "fp32") -> dict[str, Any]:
    """Download `ref`, verify it against its recorded hashes, write `fmt` (at `precision`) into
    `out`, return the card."""
    import mlflow

    if fmt not in FORMATS:
        raise RegistryError(f"--format {fmt!r} is not supported; accepted: {', '.join(FORMATS)}")
    check_precision(fmt, precision)
    check_output_dir(out, "--out folder", error=RegistryError)  # before any download
    model_ref = parse_ref(ref)
    uri = registry_uri(params)
    retries = params.tracking.retries
    out = Path(out)
    with http_policy(timeout_s=120):
        client = mlflow_client(params)
        mv = retrying(f"looking up {model_ref}", lambda: resolve(client, model_ref, uri), retries, uri)
        where = f"{mv.name}/{mv.version}"
        with tempfile.TemporaryDirectory(prefix="evit-fetch-") as tmp:
            local = retrying(
                f"downloading {where}",
                lambda: mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                            dst_path=tmp),
                retries, uri)
            model_dir = Path(local)
            extra = model_dir / "extra_files"
            verify_files(extra, mv.tags, where)
            card = bundle.read_card(extra)
            out.mkdir(parents=True, exist_ok=True)
            if fmt == "pytorch" and PT2_TAG in mv.tags:
                got = sha256_file(model_dir / "data" / "model.pt2")
                if got != mv.tags[PT2_TAG]:
                    raise RegistryError(f"{where}: data/model.pt2 has sha256 {got} but {mv.tags[PT2_TAG]} was "
                                        "recorded at registration; the stored artifact is corrupt or was modified")
            files = _write_format(fmt, extra, model_dir, out, precision)
    aliases = sorted(getattr(mv, "aliases", []) or [])
    summary = {"model": mv.name, "version": str(mv.version), "aliases": aliases, "format": fmt,
               "precision": precision, "out": str(out), "files": files, "card": card}
    write_text_atomic(out / "fetch.json", json.dumps({k: v for k, v in summary.items() if k != "card"},
                                                     indent=2, sort_keys=True) + "\n")
    log.info("fetched %s (%s, %s) into %s, files verified", where, fmt, precision, out)
    return summary


def fetch_report(summary: dict[str, Any]) -> str:
    """What `evit fetch` prints: a few lines a person reads (the full card is in card.json)."""
    card = summary["card"]
    m, lat, inp = card["metrics"], card["latency"], card["input"]
    r = inp.get("resolution", card["arch"]["resolution"])
    aliases = ", ".join(summary["aliases"]) or "none"
    classes = card.get("classes")
    lines = [
        f"{summary['model']} version {summary['version']} (aliases: {aliases}) -> {summary['out']}",
        f"  files:      {', '.join(sorted(Path(p).name for p in summary['files'].values()))} (sha256 verified)",
        f"  input:      1 x 3 x {r} x {r} float32 NCHW; {inp.get('normalization', '')}",
        f"  classes:    {classes_text(classes) if classes else str(card['num_classes']) + ' (names not recorded)'}",
        f"  val top-1:  {float(m['val_top1']):.4f}",
        f"  latency:    {float(lat['measured_ms']):.3f} ms measured, {float(lat['predicted_ms']):.3f} ms predicted "
        f"on {card['device']['name']} (budget {card['budget'].get('text', card['budget'].get('label'))})",
        f"  card:       {Path(summary['out']) / 'card.md'} (the full card: --card)",
    ]
    return "\n".join(lines)

