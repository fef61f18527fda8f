"""evit.nn: the elastic supernet and the static subnets cut out of it.

- `evit.nn.supernet.Supernet(space)(x, arch)`: all subnets on shared, sliced weights.
- `evit.nn.static`: `build_block(block)` (one module per `evit.flops.Block`), `StaticSubnet`,
  `extract(supernet, arch)`, `load_static(arch, space, state_dict)`.
- `evit.nn.export`: `export_onnx`, `export_torchscript`.
- `evit.nn.elastic`: the elastic blocks; `evit.nn.common`: what both sides share.
- `evit.nn.reference` / `evit.nn.reference_static`: the variant with the parameter layout
  and forward of the paper's released supernet (`space.variant == "reference"`);
  `evit.nn.supernet.build_supernet(space)` picks the module family of a space.
"""
