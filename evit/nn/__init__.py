"""evit.nn: the elastic supernet and the static subnets cut out of it.

- `evit.nn.factory.build_supernet(space)`: the supernet module family of a space;
- `evit.nn.supernet.Supernet(space)(x, arch)`: all subnets on shared, sliced weights
  (`evit.nn.supernet_base`: what both families share: `active(arch)`, `forward`);
- `evit.nn.static`: `build_block(block)` (one module per `evit.blocks.Block`), `StaticSubnet`,
  `extract(supernet, arch)`, `load_static(arch, space, state_dict)`;
- `evit.nn.elastic`: the elastic blocks; `evit.nn.common`: what both sides share;
- `evit.nn.reference` / `evit.nn.reference_static`: the variant with the parameter layout
  and forward of the paper's released supernet (`space.variant == "reference"`).

File formats (ONNX, TorchScript, ExecuTorch, LiteRT) are one layer up, in `evit.formats`.
"""
