"""File formats a static subnet (or one block of it) is written in, and run back from.

One small module per format, below both the latency devices (which time these files) and
the export stage (which ships them): `onnx`, `torchscript`, `pte` (ExecuTorch), `tflite`
(LiteRT, through the converter's own environment: `litert_env`, `litert_worker`), and
`bundle`, the exported folder itself (its file names, written and loaded in one place).

Kept free of imports here: the LiteRT converter's environment imports
`evit.formats.litert_worker` and `evit.formats.bundle` with a different set of packages.
"""
