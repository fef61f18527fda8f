"""evit: ElasticViT (hardware-aware NAS for fast vision transformers) as an MLOps pipeline."""

__version__ = "0.1.0"
