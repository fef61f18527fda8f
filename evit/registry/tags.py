"""What a registered model version says about itself: its tags, its identity, its aliases.

Every fact of the model card is a version tag (`evit.*`), including the sha256 of each
file (`evit.sha256.<file>`) and a content hash of the model itself (`evit.content_hash`:
architecture + weights + space), which is how a re-registration of the same model is
found. Aliases: one per budget label (MLflow aliases allow only letters, digits, `_` and
`-`) and `champion`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from evit.formats import bundle
from evit.io import sha256_json
from evit.space import NON_STRUCTURAL

CHAMPION = "champion"
TAG_PREFIX = "evit."
HASH_TAG = "evit.content_hash"
RUN_HASH_TAG = "evit.register_hash"
PT2_TAG = "evit.pt2_sha256"
"""sha256 of the logged `data/model.pt2` (MLflow writes it, so it is hashed after logging)."""
FILE_TAG_PREFIX = "evit.sha256."


def sanitize_alias(label: str) -> str:
    """A budget label as an MLflow alias: only [A-Za-z0-9_-], not `latest`, not `v<digits>`."""
    alias = re.sub(r"[^A-Za-z0-9_-]", "_", label)
    if not alias or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        alias = f"budget-{alias}"
    return alias


def content_hash(card: dict[str, Any]) -> str:
    """Identity of the model itself: architecture, weights and space (not budget, not timings)."""
    weights = card.get("weights_sha256") or card["files"][bundle.WEIGHTS]
    return sha256_json({"arch": card["arch"], "weights": weights,
                        "space": {k: v for k, v in card["space"].items() if k not in NON_STRUCTURAL}})


def card_tags(card: dict[str, Any], card_files: dict[str, str]) -> dict[str, str]:
    """Everything on the card as flat MLflow tags (values are strings, JSON for structures)."""
    m, lat, prov, b = card["metrics"], card["latency"], card["provenance"], card["budget"]

    def js(obj: Any) -> str:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))

    tags = {
        "evit.device": card["device"]["name"],
        "evit.budget": b["label"],
        "evit.budgets": b["label"],
        "evit.budget_kind": b["kind"],
        "evit.budget_value": repr(float(b["value"])),
        "evit.arch": js(card["arch"]),
        "evit.arch_key": card["arch_key"],
        "evit.resolution": str(card["arch"]["resolution"]),
        "evit.num_classes": str(card["num_classes"]),
        "evit.classes": _classes_tag(card.get("classes")),
        "evit.input": js(card["input"]),
        "evit.val_top1": repr(float(m["val_top1"])),
        "evit.search_top1": repr(float(m["search_top1"])),
        "evit.flops_m": repr(float(m["flops_m"])),
        "evit.params_m": repr(float(m["params_m"])),
        "evit.latency_predicted_ms": repr(float(lat["predicted_ms"])),
        "evit.latency_measured_ms": repr(float(lat["measured_ms"])),
        "evit.data_version": str(prov["data_version"]),
        "evit.supernet_sha256": str(prov["supernet_sha256"]),
        "evit.lut_sha256": str(prov.get("lut_sha256", "unknown")),
        "evit.git_commit": str(prov["git_commit"]),
        "evit.evit_version": str(prov["evit_version"]),
        "evit.device_params": js(card["device"]["params"]),
        "evit.device_host": js(card["device"]["host"]),
        "evit.space": js(card["space"]),
        "evit.onnx_opset": str(card["onnx"]["opset"]),
        "evit.weights_sha256": str(card.get("weights_sha256", "")),
        HASH_TAG: content_hash(card),
    }
    for name, digest in card_files.items():
        tags[FILE_TAG_PREFIX + name] = digest
    return tags


CLASSES_TAG_LIMIT = 5000
"""Longest `evit.classes` tag value (MLflow limits tag values); longer lists stay in card.json."""


def _classes_tag(classes: list[str] | None) -> str:
    """The class names in logit order as a JSON list, or a pointer to card.json when too long."""
    if not classes:
        return "unknown (card without class names)"
    text = json.dumps(classes, separators=(",", ":"))
    return text if len(text) <= CLASSES_TAG_LIMIT else f"{len(classes)} classes: see card.json (`classes`)"


def accuracy(mv: Any) -> float:
    """The val top-1 a version was registered with (tag `evit.val_top1`); -inf when unreadable."""
    try:
        return float(mv.tags.get("evit.val_top1"))
    except (TypeError, ValueError):
        return float("-inf")
