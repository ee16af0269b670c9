"""Per-step work cut from the trainer: AuxK takes ``min(k_aux, dead latents)`` slots -- the same losses and
gradients as the padded ``k_aux`` code (padding slots hold value 0 and pass no gradient)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae

pytestmark = pytest.mark.usefixtures("one_thread")


def _losses_and_grads(sae: TopKSae, x: torch.Tensor, dead: torch.Tensor, k_aux: int):
    trainer = SaeTrainer(sae)
    out = trainer.compute_losses(x, dead_mask=dead, k_aux=k_aux)
    out.loss.backward()
    grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad(set_to_none=True)
    return out, grads


def test_auxk_over_fewer_dead_latents_than_k_aux_equals_the_padded_code():
    g = torch.Generator().manual_seed(0)
    sae = TopKSae(64, 16, 4)
    x = torch.randn(128, 16, generator=g) + 0.5
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 20, 41]] = True
    padded, grads_padded = _losses_and_grads(sae, x, dead, k_aux=32)
    exact, grads_exact = _losses_and_grads(sae, x, dead, k_aux=4)
    assert float(padded.auxk_loss) > 0
    torch.testing.assert_close(exact.auxk_loss, padded.auxk_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exact.loss, padded.loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_exact, grads_padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_train_step_asks_for_at_most_the_dead_latents():
    sae = TopKSae(64, 16, 4)
    trainer = SaeTrainer(sae)
    trainer.prepare(SaeTrainingConfig(batch_size=32, n_tokens=64, progress=False, checkpoint_every=None,
                                      save_sae=False), 1e-3, 100)
    x = torch.randn(32, 16)
    seen = []
    real = trainer.compute_losses

    def spy(*args, **kwargs):
        seen.append((kwargs["k_aux"], kwargs["dead_mask"] is not None))
        return real(*args, **kwargs)

    with mock.patch.object(trainer, "compute_losses", spy):
        trainer.train_step(x, 1e-3, k_aux=32)  # nothing dead yet
        trainer.tokens_since_fired.zero_()
        trainer.tokens_since_fired[[1, 2, 3]] = 1000
        trainer.train_step(x, 1e-3, k_aux=32)
        trainer.tokens_since_fired.fill_(1000)
        trainer.train_step(x, 1e-3, k_aux=32)
    assert seen == [(0, False), (3, True), (32, True)]
