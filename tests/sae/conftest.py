"""Fixtures shared by the SAE tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one torch intra-op thread, restoring the previous setting afterwards.

    Tiny shapes: on a shared 2-core machine OpenMP threads only spin against each other. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The block whose output the evaluate tests splice the SAE into.
EVALUATE_LAYER = 1


@pytest.fixture
def evaluate_trained(tiny_lm, sample_texts):
    """``(lm, sae)``: a small SAE trained briefly on block ``EVALUATE_LAYER``'s real-token outputs over
    ``sample_texts`` (so evaluate's numbers are in a realistic range). Shared by test_evaluate.py and
    test_evaluate_core.py."""
    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae

    enc = tiny_lm.tokenize(sample_texts, max_length=32, padding_side="right")
    captured = {}
    module = tiny_lm.layers.get_module(EVALUATE_LAYER)
    handle = module.register_forward_hook(
        lambda m, a, out: captured.setdefault("h", (out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    try:
        with torch.no_grad():
            tiny_lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()
    acts = captured["h"][enc["attention_mask"].bool()]
    torch.manual_seed(0)
    sae = TopKSae(64, acts.shape[1], 4)
    # AuxK off: on this random tiny model zeroing the layer *lowers* the loss, so loss_recovered is ill-conditioned
    # for SAEs whose spliced loss lands near the zero-ablated one; this recipe keeps it well away (~0.6).
    cfg = SaeTrainingConfig(batch_size=32, epochs=6, lr=1e-2, auxk_coef=0.0, progress=False, checkpoint_every=None,
                            save_sae=False)
    SaeTrainer(sae).train_on_tensor(acts, cfg)
    return tiny_lm, sae
