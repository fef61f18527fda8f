"""Data: the `prepare` stage and loading its output.

- `prepare.prepare_data(params)`: a source (digits / ImageFolder dir / s3://) -> stratified
  train/search/val shards + manifest.json under data.out_dir, atomically: uint8 `.npy`
  squares (`data.format: npy`) or WebDataset tars of the encoded images (`shards`).
- `loader.PreparedData(path)`: the prepared data as torch Datasets / DataLoaders with timm
  transforms at any resolution, or whole splits as tensors.
- `sources/` (one module per source: digits, a local ImageFolder, S3), `images`, `split`,
  `shards`, `tarshards`: listing and reading, decoding, the split rule and the two on-disk
  formats, each small enough to read in one sitting.
"""
