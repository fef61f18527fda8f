"""Per-device latency: devices, lookup tables (LUTs) and the predictor search scores with.

Entry points: `evit.latency.stage.build_lut(params, device)` (the `lut@<device>` stage),
`evit.latency.predictor.LatencyPredictor.load(path, space)` (search, export) and
`evit.latency.devices.get_device(device_params)`. See README.md in this folder.
"""
