"""The export stage: each chosen subnet -> a checked bundle of deployable files, registered.

- `stage`: `export_device(params, device)`: the files (through `evit.formats`), the card
  (`evit.card`), the registration (`evit.registry`);
- `checks`: each file run in its own runtime against eager PyTorch before it ships.
"""
