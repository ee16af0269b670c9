"""The training recipe's defects and options (issue 12), each against an independent reference; each test fails on
the recipe before the fix."""

from __future__ import annotations

import math

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.hooks.hook import BatchContext
from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae, lr_at_step
from mi_crow.mechanistic.sae.train.init import fold_into_weights
from mi_crow.mechanistic.sae.train.schedule import k_at_step

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False, checkpoint_every=None, save_sae=False)


def _low_rank(n_tokens: int, d: int = 16, rank: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.01 * torch.randn(
        n_tokens, d, generator=g
    )


# -- the schedule ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_the_last_step_does_not_run_at_lr_zero(decay):
    cfg = SaeTrainingConfig(lr_decay=decay, lr_decay_start=0.5, lr_final_fraction=0.0)
    total = 40
    lrs = [lr_at_step(s, total, 1.0, 0, cfg) for s in range(total)]
    assert lrs[-1] > 0 and all(lr > 0 for lr in lrs)
    assert lr_at_step(total, total, 1.0, 0, cfg) == pytest.approx(0.0, abs=1e-12)
    # linear by hand: decay from step 20 over 20 steps, so step 39 runs at 1/20 of the peak
    if decay == "linear":
        assert lrs[-1] == pytest.approx(1 / 20)
    # and in a run: the recorded lr of the last step is positive
    sae = TopKSae(16, 8, 2)
    result = SaeTrainer(sae).train_on_tensor(
        torch.randn(256, 8), SaeTrainingConfig(batch_size=32, epochs=1, lr_decay=decay, log_every=1, **QUIET)
    )
    assert result.history[-1]["lr"] > 0


# -- AuxK and the dead window -----------------------------------------------------------------------------------------
def test_auxk_is_active_by_default_and_dead_fraction_is_not_yet_measurable_before_a_window():
    """Planted low-rank data leave most latents dead. With the default (scaled) window AuxK trains them and the
    history reports them; before a full window has passed it says None instead of a structural 0."""
    x = _low_rank(64 * 100)
    sae = TopKSae(128, 16, 2)
    cfg = SaeTrainingConfig(batch_size=64, n_tokens=64 * 100, log_every=5, **QUIET)
    result = SaeTrainer(sae).train_on_tensor(x, cfg)
    window = max(64, int(0.1 * 64 * 100))  # the documented automatic window: 10% of the budget
    for record in result.history:
        if record["tokens"] < window:
            assert record["dead_fraction"] is None
        else:
            assert isinstance(record["dead_fraction"], float)
    assert result.history[0]["dead_fraction"] is None
    assert any(r["auxk_loss"] > 0 for r in result.history), "AuxK must run in a short run"
    # the measured fraction equals a direct count of the counters
    trainer_dead = [r["dead_fraction"] for r in result.history if r["dead_fraction"] is not None]
    assert trainer_dead[-1] > 0


def test_dead_window_bad_input_names_the_field():
    with pytest.raises(UserInputError, match="SaeTrainingConfig.dead_window_tokens must be at most the token budget"):
        SaeTrainingConfig(n_tokens=1000, batch_size=100, dead_window_tokens=2000)
    sae = TopKSae(16, 8, 2)
    # with epochs the budget is known at train time: 2 epochs of 320 tokens at batch 32 = 640 tokens
    with pytest.raises(UserInputError, match="dead_window_tokens must be at most the run's token budget, 640"):
        SaeTrainer(sae).train_on_tensor(
            torch.randn(320, 8), SaeTrainingConfig(batch_size=32, epochs=2, dead_window_tokens=10_000, **QUIET)
        )
    with pytest.raises(UserInputError, match="SaeTrainingConfig.epochs must be enough for one batch of 256 tokens"):
        SaeTrainer(sae).train_on_tensor(
            torch.randn(300, 8), SaeTrainingConfig(batch_size=256, epochs=0.5, **QUIET)
        )
    with pytest.raises(UserInputError, match="SaeTrainingConfig.n_tokens must be at least batch_size=64"):
        SaeTrainingConfig(n_tokens=10, batch_size=64)


# -- reinit_weights=False ----------------------------------------------------------------------------------------------
def test_reinit_weights_false_keeps_the_decoder_but_applies_the_documented_inits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 8, generator=g) + 3.0
    sae = TopKSae(16, 8, 2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1))
        sae.W_enc.copy_(torch.randn(16, 8, generator=g))
    decoder = sae.W_dec.detach().clone()
    # One step at a negligible learning rate: the weights stay where the initialisation put them.
    cfg = SaeTrainingConfig(batch_size=64, n_tokens=64, lr=1e-12, warmup_steps=0, reinit_weights=False,
                            b_dec_init="mean", b_dec_init_tokens=640, shuffle=False, **QUIET)
    SaeTrainer(sae).train_on_tensor(x, cfg)
    torch.testing.assert_close(sae.W_dec.detach(), decoder, rtol=0, atol=1e-6)
    torch.testing.assert_close(sae.W_enc.detach(), decoder, rtol=0, atol=1e-6)  # init_encoder_from_decoder
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0), rtol=1e-5, atol=1e-5)  # b_dec_init="mean"

    # and everything can be kept for fine-tuning
    before = {name: getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    keep = SaeTrainingConfig(batch_size=64, n_tokens=64, lr=1e-12, warmup_steps=0, reinit_weights=False,
                             b_dec_init="keep", init_encoder_from_decoder=False, **QUIET)
    SaeTrainer(sae).train_on_tensor(x, keep)
    for name, value in before.items():
        torch.testing.assert_close(getattr(sae, name).detach(), value, rtol=0, atol=1e-6)


# -- the one outlier rule in the hook ------------------------------------------------------------------------------
def test_hook_uses_the_real_tokens_of_the_batch_as_reference():
    """A one-token text whose token is a sink, padded with copies of it: the old per-row median (padding included)
    made it its own reference and kept it; the batch's real tokens catch it."""
    torch.manual_seed(0)
    sae = TopKSae(32, 8, 2, mode="replace")
    sae.outlier_norm_factor = 10.0
    hidden = torch.randn(2, 4, 8)
    hidden[1, :] = 1000.0 * torch.nn.functional.normalize(torch.randn(8), dim=0)  # sink + padding copies
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    sae.context = BatchContext(texts=["a b c d", "x"], input_ids=torch.zeros(2, 4, dtype=torch.long),
                               attention_mask=mask, special_tokens_mask=mask == 0, tokenizer=None)
    out = sae.modify_activations(None, (), hidden)
    assert torch.equal(out[1, 0], hidden[1, 0])  # the sink is left alone
    with torch.no_grad():
        torch.testing.assert_close(out[0], sae(hidden[0]).reconstruction)
    assert sae.inlier_mask(hidden).tolist() == [[True] * 4, [False, True, True, True]]
    assert sae.inlier_mask(hidden, mask).tolist() == [[True] * 4, [False, True, True, True]]


# -- FVU denominator in the training loss ---------------------------------------------------------------------------
def test_training_fvu_is_exact_far_from_the_origin():
    g = torch.Generator().manual_seed(0)
    x = 300.0 + torch.randn(4096, 64, generator=g)
    sae = TopKSae(128, 64, 4)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    trainer = SaeTrainer(sae)
    with torch.no_grad():
        out = trainer.compute_losses(x)
        recon = sae(x).reconstruction
    xd = x.double()
    ref = float((xd - recon.double()).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
    assert float(out.fvu) == pytest.approx(ref, rel=1e-5)


# -- input normalisation ---------------------------------------------------------------------------------------------
def test_normalised_training_folds_into_an_sae_on_raw_inputs(store):
    g = torch.Generator().manual_seed(0)
    x = (40.0 * _low_rank(64 * 20, d=16, rank=6) + 25.0).float()
    base = dict(batch_size=64, n_tokens=64 * 20, b_dec_init_tokens=x.shape[0], seed=3, **QUIET)
    torch.manual_seed(0)
    folded = TopKSae(32, 16, 4)
    SaeTrainer(folded).train_on_tensor(x, SaeTrainingConfig(normalize_inputs=True, **base))

    # The reference: the same recipe on inputs scaled by hand, without the option.
    scale = math.sqrt(16 / float(x.double().pow(2).sum(1).mean()))
    torch.manual_seed(0)
    scaled = TopKSae(32, 16, 4)
    SaeTrainer(scaled).train_on_tensor(x * scale, SaeTrainingConfig(**base))

    with torch.no_grad():
        got = folded(x)
        ref = scaled(x * scale)
    torch.testing.assert_close(got.reconstruction, ref.reconstruction / scale, rtol=1e-4, atol=1e-4 * 40)
    assert torch.equal(got.code.indices, ref.code.indices)
    torch.testing.assert_close(got.code.values, ref.code.values / scale, rtol=1e-4, atol=1e-5)
    # and the saved SAE takes raw activations too
    folded.save(store, "norm")
    loaded = TopKSae.load(store, "norm")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).reconstruction, got.reconstruction, rtol=0, atol=0)


# -- k-annealing -------------------------------------------------------------------------------------------------------
def test_k_annealing_decays_the_active_count_to_k():
    assert [k_at_step(s, 8, 2, 4) for s in range(6)] == [8, 6, 5, 4, 2, 2]  # round(8 - 6 s / 4)
    assert k_at_step(0, 8, 2, 0) == 2
    x = _low_rank(64 * 40, rank=8)
    sae = TopKSae(64, 16, 2)
    cfg = SaeTrainingConfig(batch_size=64, n_tokens=64 * 40, log_every=1, k_anneal_fraction=0.5, k_anneal_start=8,
                            **QUIET)
    history = SaeTrainer(sae).train_on_tensor(x, cfg).history
    l0 = [r["l0"] for r in history]
    assert l0[0] > 6 and all(v <= 2 for v in l0[20:])  # k is 2 from step 20 (half of 40) on
    with pytest.raises(UserInputError, match="SaeTrainingConfig.k_anneal_start must be between the SAE's k=2"):
        SaeTrainer(TopKSae(64, 16, 2)).train_on_tensor(
            x, SaeTrainingConfig(batch_size=64, n_tokens=64, k_anneal_fraction=0.5, k_anneal_start=100, **QUIET)
        )


# -- decoder-norm-aware top-k ---------------------------------------------------------------------------------------
def test_topk_by_decoder_norm_ranks_by_contribution_and_folds_exactly():
    g = torch.Generator().manual_seed(0)
    sae = TopKSae(24, 8, 3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(24, 1, generator=g) * 3 + 0.1)  # rows of very different norms
        sae.b_enc.copy_(0.1 * torch.randn(24, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(8, generator=g))
    x = torch.randn(50, 8, generator=g)
    # plain-PyTorch reference of the training-frame forward
    norms = sae.W_dec.detach().norm(dim=1)
    pre = torch.relu((x - sae.b_dec.detach()) @ sae.W_enc.detach().T + sae.b_enc.detach()) * norms
    values, indices = pre.topk(3, dim=1)
    unit = sae.W_dec.detach() / norms.unsqueeze(1)
    ref = sae.b_dec.detach() + torch.einsum("bk,bkd->bd", values, unit[indices])
    with torch.no_grad():
        out = SaeTrainer(sae).compute_losses(x, topk_by_decoder_norm=True)
        plain = SaeTrainer(sae).compute_losses(x)
        ref_fvu = float(((x - ref).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
    assert float(out.fvu) == pytest.approx(ref_fvu, rel=1e-5)
    assert float(plain.fvu) != pytest.approx(ref_fvu, rel=1e-3)  # the option changes the ranking here
    fold_into_weights(sae, 1.0, decoder_norms=True)
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(24), rtol=0, atol=1e-6)
    with torch.no_grad():
        folded = sae(x)
    torch.testing.assert_close(folded.reconstruction, ref, rtol=1e-5, atol=1e-5)


# -- the default learning rate ----------------------------------------------------------------------------------------
def test_default_lr_is_the_rule_fitted_by_the_sweep_and_the_trainer_uses_it():
    """The rule equals the power law written by benchmarks/bench_lr_sweep.py (as a multiple of OpenAI's width rule,
    never below it), depends on the budget, and is the peak a default run trains at."""
    import json
    from pathlib import Path

    from mi_crow.mechanistic.sae.train import schedule

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench_lr_sweep.json"
    rule = json.loads(results.read_text())["rule"]
    for n, budget in ((1152, 65536), (4608, 262144), (4608, 1 << 20), (32768, 10**8)):
        openai = 2e-4 / math.sqrt(n / 2**14)
        fitted = rule["c"] * (n / 2**14) ** rule["a"] * (budget / 2**20) ** rule["b"]
        assert schedule.default_lr(n, budget) == pytest.approx(max(openai, fitted), rel=1e-3), (n, budget)
    assert schedule.default_lr(4608, 65536) > schedule.default_lr(4608, 1 << 20) >= schedule.default_lr(4608, 10**10)
    assert schedule.default_lr(4608, 10**10) == pytest.approx(2e-4 / math.sqrt(4608 / 2**14))

    sae = TopKSae(16, 8, 2)
    result = SaeTrainer(sae).train_on_tensor(
        torch.randn(512, 8), SaeTrainingConfig(batch_size=32, n_tokens=32 * 40, log_every=1, **QUIET)
    )
    assert max(row["lr"] for row in result.history) == pytest.approx(schedule.default_lr(16, 32 * 40), rel=1e-12)
    # the SAE's own default_lr is the same rule (with a budget), and the rule's floor without one
    assert sae.default_lr(32 * 40) == schedule.default_lr(16, 32 * 40)
    big = TopKSae(4608, 8, 2)
    assert big.default_lr(1 << 20) == schedule.default_lr(4608, 1 << 20) > big.default_lr()
    assert big.default_lr() == pytest.approx(2e-4 / math.sqrt(4608 / 2**14), rel=1e-12)
