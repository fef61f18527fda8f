"""The MLflow model registry: register exported subnets, move aliases, fetch and verify.

- `evit.registry.tags`: what a version says about itself (card tags, content hash, aliases);
- `evit.registry.register`: `register_export` (one version per exported subnet, aliases
  that only move forward, rollback of a failed attempt), `restore_registrations`;
- `evit.registry.fetch`: `fetch_model` (download, verify every file, write one format);
- `evit.registry.connection`: the client, the HTTP policy and the retries.
"""

from evit.registry.fetch import FORMATS, ModelRef, fetch_model, fetch_report, parse_ref, verify_files
from evit.registry.register import missing_registrations, register_export, restore_registrations
from evit.registry.tags import CHAMPION, FILE_TAG_PREFIX, HASH_TAG, PT2_TAG, card_tags, content_hash, sanitize_alias

__all__ = ["CHAMPION", "FILE_TAG_PREFIX", "FORMATS", "HASH_TAG", "PT2_TAG", "ModelRef", "card_tags", "content_hash",
           "fetch_model", "fetch_report", "missing_registrations", "parse_ref", "register_export",
           "restore_registrations", "sanitize_alias", "verify_files"]
