"""The SDPA attention path computes what the explicit softmax path computes (forward and backward)."""

from __future__ import annotations

import random

import pytest
import torch

from evit.nn.elastic import ElasticAttention, resolve_attention_impl, set_attention_impl
from evit.nn.supernet import Supernet
from evit.space import CPU
from tests.test_nn import randomise


def _run(net: Supernet, impl: str, x: torch.Tensor, arch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    set_attention_impl(net, impl)
    net.zero_grad(set_to_none=True)
    out = net(x, arch)
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_matches_explicit_forward_and_backward(seed: int) -> None:
    net = Supernet(CPU)
    randomise(net, seed)  # a non-zero relative-position bias, so the mask matters
    net.train()
    arch = CPU.sample_uniform(random.Random(seed))
    x = torch.randn(3, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng():
        ref, ref_grads = _run(net, "explicit", x, arch)
    with torch.random.fork_rng():
        out, grads = _run(net, "sdpa", x, arch)
    assert set(ref_grads) == set(grads)
    assert any("rel_bias" in n for n in grads)  # the bias gets a gradient through the mask
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_impl_selection() -> None:
    net = Supernet(CPU)
    assert set_attention_impl(net, "sdpa") == sum(isinstance(m, ElasticAttention) for m in net.modules()) > 0
    assert resolve_attention_impl("auto", torch.device("cuda")) == "sdpa"
    assert resolve_attention_impl("auto", torch.device("cpu"), 16) == "explicit"
    assert resolve_attention_impl("auto", torch.device("cpu"), 196) == "sdpa"
    with pytest.raises(ValueError, match="accepted"):
        set_attention_impl(net, "flash")
