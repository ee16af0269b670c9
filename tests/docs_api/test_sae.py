"""DOCUMENTED_API.md, "SAEs, training, concepts": the SAE object, its parameter views and its files.

Every test checks a documented call shape against an independent computation (plain ``torch.nn.functional`` on the
raw parameters, what was written to disk, ``torch.load`` of the file).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mi_crow.mechanistic.sae import TopKSae


def _sae(n: int = 24, d: int = 8, k: int = 3, seed: int = 0) -> TopKSae:
    torch.manual_seed(seed)
    sae = TopKSae(n_latents=n, n_inputs=d, k=k, device="cpu")
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    return sae


def test_keyword_construction_and_k():
    sae = TopKSae(n_latents=32, n_inputs=8, k=4, device="cpu")
    assert (sae.n_latents, sae.n_inputs, sae.k) == (32, 8, 4)
    assert sae.device == torch.device("cpu")


def test_encoder_and_decoder_views_are_the_parameters():
    sae = _sae()
    assert sae.encoder.weight.shape == (24, 8) and sae.encoder.bias.shape == (24,)
    assert sae.decoder.weight.shape == (8, 24) and sae.decoder.bias.shape == (8,)
    # Views, not copies: same storage as the parameters.
    assert sae.encoder.weight is sae.W_enc and sae.encoder.bias is sae.b_enc
    assert sae.decoder.weight.data_ptr() == sae.W_dec.data_ptr() and torch.equal(sae.decoder.weight, sae.W_dec.t())
    assert sae.decoder.bias is sae.b_dec
    # The views are not submodules: the state dict keeps exactly the four parameters.
    assert list(sae.state_dict()) == ["W_enc", "b_enc", "W_dec", "b_dec"]
    # The documented "is it learning" check runs.
    assert sae.encoder.weight.var().item() > 0


def test_views_compute_what_the_sae_computes():
    """nn.Linear semantics of the views, checked against encode/decode."""
    sae = _sae()
    x = torch.randn(5, 8)
    pre = F.relu(F.linear(x - sae.decoder.bias, sae.encoder.weight, sae.encoder.bias)).detach()
    want = pre.topk(sae.k, dim=-1).values
    code = sae.encode(x)
    torch.testing.assert_close(code.values, want)
    dense = sae.dense(code)
    recon = F.linear(dense, sae.decoder.weight, sae.decoder.bias)
    torch.testing.assert_close(recon, sae.decode(code), rtol=1e-5, atol=1e-5)


def test_writes_through_the_views_change_the_sae():
    sae = _sae()
    x = torch.randn(4, 8)
    before = sae(x).reconstruction.detach().clone()
    direction = torch.arange(8, dtype=torch.float32)
    with torch.no_grad():
        sae.decoder.weight[:, 5] = direction
        sae.encoder.weight[2].zero_()
        sae.decoder.bias.add_(1.0)
    assert torch.equal(sae.W_dec[5], direction)
    assert torch.equal(sae.W_enc[2], torch.zeros(8))
    sae.decoder.weight.data[:, 6] = 3.0  # through .data, as training scripts do
    assert torch.equal(sae.W_dec[6], torch.full((8,), 3.0))
    # Assigning a whole tensor copies it in.
    new_w = torch.randn(8, 24)
    sae.decoder.weight = new_w
    assert torch.equal(sae.W_dec, new_w.t())
    new_b = torch.randn(24)
    sae.encoder.bias = new_b
    assert torch.equal(sae.b_enc, new_b)
    assert not torch.equal(sae(x).reconstruction, before)


def test_view_assignment_of_a_wrong_shape_names_it():
    sae = _sae()
    with pytest.raises(ValueError, match=r"sae\.decoder\.weight must be set to a tensor of shape \[8, 24\], got \[24, 8\]"):
        sae.decoder.weight = torch.zeros(24, 8)
    with pytest.raises(TypeError, match=r"sae\.encoder\.bias must be set to a torch\.Tensor, got list"):
        sae.encoder.bias = [0.0] * 24
