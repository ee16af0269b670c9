"""Interop against the real libraries (not part of the test suite): save SAEs with SAELens, sparsify and
dictionary_learning and load them here; export ours and load it there; compare encode and decode on random inputs.

Run it with an interpreter that has the peers installed and mi_crow importable, e.g. the ``/tmp/peers`` venv::

    PYTHONPATH=$PWD /tmp/peers/bin/python benchmarks/interop_check.py

(circuit-tracer was installed beside it with ``pip install --no-deps --target /tmp/interop-ct circuit-tracer`` and
``PYTHONPATH=$PWD:/tmp/interop-ct``.)

A library that is not installed is reported as skipped. Results: a Markdown table on stdout and
``benchmarks/results/interop_check.json`` (max absolute and relative differences of the dense codes and of the
reconstructions, per direction and library).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

# A torchvision built for another torch makes transformers' import fail; none of these checks needs it.
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (  # type: ignore[assignment]
    None if name.split(".")[0] == "torchvision" else _find_spec(name, package))

import torch  # noqa: E402

from mi_crow.mechanistic.sae import BatchTopKSae, SaeBase, TopKSae, Transcoder  # noqa: E402

N, D, K, TOKENS = 512, 64, 16, 256
RESULTS = Path(__file__).parent / "results" / "interop_check.json"


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.detach().double(), b.detach().double()
    abs_diff = (a - b).abs().max().item()
    return {"max_abs": abs_diff, "max_rel": abs_diff / max(b.abs().max().item(), 1e-30)}


def _ours(seed: int = 0) -> TopKSae:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSae(N, D, K)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(N, D, generator=g) / D**0.5)
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.05)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    sae.layer_signature = "transformer.h.3"
    sae.metadata.update(layer="transformer.h.3", model_id="gpt2")
    return sae


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(seed))


def _record(rows: list[dict[str, Any]], library: str, direction: str, case: str,
            ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> None:
    rows.append({"library": library, "direction": direction, "case": case, "status": "ok",
                 "code": _diff(ours[0], theirs[0]), "reconstruction": _diff(ours[1], theirs[1])})


def _ours_out(sae: SaeBase, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return sae.encode_dense(x), sae.predict(x, sae.encode(x))


def _randomize(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# -- SAELens ---------------------------------------------------------------------------------------------------------
def check_sae_lens(rows: list[dict[str, Any]], tmp: Path) -> None:
    from sae_lens import SAE, TopKSAE, TopKSAEConfig

    x = _x()
    for rescale, apply_b_dec in ((False, True), (True, True), (True, False)):
        cfg = TopKSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=rescale,
                            apply_b_dec_to_input=apply_b_dec)
        cfg.metadata.hook_name = "blocks.3.hook_resid_post"
        cfg.metadata.model_name = "gpt2"
        theirs = TopKSAE(cfg)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in (theirs.W_enc, theirs.b_enc, theirs.W_dec, theirs.b_dec):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        folder = tmp / f"sl-{rescale}-{apply_b_dec}"
        theirs.save_model(folder)
        ours = TopKSae.from_pretrained(folder)
        with torch.no_grad():
            their_out = (theirs.encode(x), theirs.decode(theirs.encode(x)))
        _record(rows, "sae_lens", "theirs -> ours", f"topk rescale={rescale} apply_b_dec={apply_b_dec}",
                _ours_out(ours, x), their_out)
        assert ours.layer_signature == "transformer.h.3", ours.layer_signature
    sae = _ours()
    sae.export(tmp / "sl-ours", "sae_lens")
    theirs = SAE.load_from_disk(tmp / "sl-ours")
    with torch.no_grad():
        their_out = (theirs.encode(x), theirs.decode(theirs.encode(x)))
    _record(rows, "sae_lens", "ours -> theirs", f"topk, hook {theirs.cfg.metadata.hook_name}", _ours_out(sae, x),
            their_out)

    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, SkipTranscoder, SkipTranscoderConfig, StandardSAE
    from sae_lens import StandardSAEConfig

    for name, cls, cfg_cls in (("jumprelu", JumpReLUSAE, JumpReLUSAEConfig), ("standard", StandardSAE,
                                                                             StandardSAEConfig)):
        theirs = cls(cfg_cls(d_in=D, d_sae=N))
        _randomize([theirs.W_enc, theirs.b_enc, theirs.W_dec, theirs.b_dec], 6)
        if name == "jumprelu":
            with torch.no_grad():
                theirs.threshold.copy_(torch.rand(N, generator=torch.Generator().manual_seed(7)) * 0.5)
        theirs.save_model(tmp / name)
        ours = SaeBase.from_pretrained(tmp / name)
        with torch.no_grad():
            their_out = (theirs.encode(x), theirs.decode(theirs.encode(x)))
        _record(rows, "sae_lens", "theirs -> ours", f"{name} -> {type(ours).__name__}", _ours_out(ours, x), their_out)
        back = SAE.load_from_disk(ours.export(tmp / f"{name}-back", "sae_lens"))
        with torch.no_grad():
            their_out = (back.encode(x), back.decode(back.encode(x)))
        _record(rows, "sae_lens", "ours -> theirs", f"{type(ours).__name__} -> {back.cfg.architecture()}",
                _ours_out(ours, x), their_out)
    cfg = SkipTranscoderConfig(d_in=D, d_sae=N, d_out=D + 8, apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
    cfg.metadata.model_name = "meta-llama/Llama-3.2-1B"
    theirs = SkipTranscoder(cfg)
    _randomize([theirs.W_enc, theirs.b_enc, theirs.W_dec, theirs.b_dec, theirs.W_skip], 8)
    theirs.save_model(tmp / "skip_tc")
    ours = SaeBase.from_pretrained(tmp / "skip_tc")
    with torch.no_grad():
        their_out = (theirs.encode(x), theirs(x))
    _record(rows, "sae_lens", "theirs -> ours", f"skip_transcoder -> {type(ours).__name__} at {ours.layer_signature}",
            _ours_out(ours, x), their_out)


# -- sparsify --------------------------------------------------------------------------------------------------------
def _sparsify_out(coder: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        enc = coder.encode(x)
        dense = torch.zeros(x.shape[0], coder.num_latents).scatter(-1, enc.top_indices, enc.top_acts)
        return dense, coder.decode(enc.top_acts, enc.top_indices)


def check_sparsify(rows: list[dict[str, Any]], tmp: Path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    x = _x()
    theirs = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (theirs.encoder.weight, theirs.encoder.bias, theirs.W_dec, theirs.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_to_disk(tmp / "sp" / "h.3")
    ours = TopKSae.from_pretrained(tmp / "sp" / "h.3")
    _record(rows, "sparsify", "theirs -> ours", "topk SAE", _ours_out(ours, x), _sparsify_out(theirs, x))
    sae = _ours()
    sae.export(tmp / "sp-ours" / "h.3", "sparsify")
    back = SparseCoder.load_from_disk(tmp / "sp-ours" / "h.3")
    _record(rows, "sparsify", "ours -> theirs", "topk SAE", _ours_out(sae, x), _sparsify_out(back, x))

    theirs = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, transcode=True, skip_connection=True))
    _randomize([theirs.encoder.weight, theirs.encoder.bias, theirs.W_dec, theirs.b_dec, theirs.W_skip], 9)
    theirs.save_to_disk(tmp / "sp-tc" / "layers.2.mlp")
    ours = SaeBase.from_pretrained(tmp / "sp-tc" / "layers.2.mlp")

    def with_skip(coder: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dense, out = _sparsify_out(coder, x)
        with torch.no_grad():
            return dense, out + x @ coder.W_skip.mT

    _record(rows, "sparsify", "theirs -> ours", f"skip transcoder -> {type(ours).__name__}", _ours_out(ours, x),
            with_skip(theirs))
    ours.export(tmp / "sp-tc-back" / "layers.2.mlp", "sparsify")
    back = SparseCoder.load_from_disk(tmp / "sp-tc-back" / "layers.2.mlp")
    _record(rows, "sparsify", "ours -> theirs", "skip transcoder", _ours_out(ours, x), with_skip(back))


# -- dictionary_learning ---------------------------------------------------------------------------------------------
def check_dictionary_learning(rows: list[dict[str, Any]], tmp: Path) -> None:
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    x = _x()
    theirs = AutoEncoderTopK(D, N, K)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (theirs.encoder.weight, theirs.encoder.bias, theirs.decoder.weight, theirs.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp / "dl"
    folder.mkdir()
    torch.save({k: v.cpu() for k, v in theirs.state_dict().items()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "AutoEncoderTopK", "trainer_class": "TopKTrainer", "activation_dim": D, "dict_size": N,
        "k": K, "layer": 3, "lm_name": "gpt2", "submodule_name": "resid_post_layer_3"}}))
    ours = TopKSae.from_pretrained(folder)
    with torch.no_grad():
        their_out = (theirs.encode(x), theirs.decode(theirs.encode(x)))
    _record(rows, "dictionary_learning", "theirs -> ours", "AutoEncoderTopK", _ours_out(ours, x), their_out)
    sae = _ours()
    sae.export(tmp / "dl-ours", "dictionary_learning")
    back = AutoEncoderTopK.from_pretrained(str(tmp / "dl-ours" / "ae.pt"))
    with torch.no_grad():
        their_out = (back.encode(x), back.decode(back.encode(x)))
    _record(rows, "dictionary_learning", "ours -> theirs", "AutoEncoderTopK", _ours_out(sae, x), their_out)

    from dictionary_learning.dictionary import JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE

    ours = BatchTopKSae(N, D, K)
    _randomize([ours.W_enc, ours.b_enc, ours.W_dec, ours.b_dec], 10)
    ours.threshold.fill_(0.3)
    back = BatchTopKSAE.from_pretrained(str(ours.export(tmp / "dl-btk", "dictionary_learning") / "ae.pt"))
    with torch.no_grad():
        their_out = (back.encode(x), back.decode(back.encode(x)))
    _record(rows, "dictionary_learning", "ours -> theirs", "BatchTopKSae -> BatchTopKSAE", _ours_out(ours, x),
            their_out)
    theirs = JumpReluAutoEncoder(D, N)
    _randomize([theirs.W_enc, theirs.b_enc, theirs.W_dec, theirs.b_dec], 11)
    with torch.no_grad():
        theirs.threshold.copy_(torch.rand(N, generator=torch.Generator().manual_seed(12)) * 0.5)
    (tmp / "dl-j").mkdir()
    torch.save({k: v.cpu() for k, v in theirs.state_dict().items()}, tmp / "dl-j" / "ae.pt")
    ours = SaeBase.from_pretrained(tmp / "dl-j")
    with torch.no_grad():
        their_out = (theirs.encode(x), theirs.decode(theirs.encode(x)))
    _record(rows, "dictionary_learning", "theirs -> ours", f"JumpReluAutoEncoder -> {type(ours).__name__}",
            _ours_out(ours, x), their_out)


def check_circuit_tracer(rows: list[dict[str, Any]], tmp: Path) -> None:
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, load_transcoder_set

    x = _x()

    def theirs_out(tc: Any, acts_fn: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            acts = tc.encode(x) if acts_fn is None else acts_fn(tc.encode(x, apply_activation_function=False))
            return acts, tc.decode(acts, x)  # decode adds the skip term of x

    def load(folder: Path) -> Any:
        return load_transcoder_set({0: str(folder / "layer_0.safetensors")}, scan="mi_crow",
                                   feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                                   device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)[0]

    ours = Transcoder(N, D, D, K, skip=True, batch_topk=True)
    _randomize([ours.W_enc, ours.b_enc, ours.W_dec, ours.b_dec, ours.W_skip], 13)
    ours.threshold.fill_(0.5)
    ours.layer_signature = ours.metadata["layer"] = "model.layers.0.mlp"
    ours.metadata["model_id"] = "meta-llama/Llama-3.2-1B"
    theirs = load(ours.export(tmp / "ct-btk", "circuit_tracer"))
    _record(rows, "circuit_tracer", "ours -> theirs", "BatchTopK skip transcoder -> JumpReLU", _ours_out(ours, x),
            theirs_out(theirs))
    ours_topk = Transcoder(N, D, D, K, skip=True)
    _randomize([ours_topk.W_enc, ours_topk.b_enc, ours_topk.W_dec, ours_topk.b_dec, ours_topk.W_skip], 14)
    ours_topk.layer_signature = ours_topk.metadata["layer"] = "model.layers.0.mlp"
    ours_topk.metadata["model_id"] = "meta-llama/Llama-3.2-1B"
    theirs = load(ours_topk.export(tmp / "ct-topk", "circuit_tracer"))
    # circuit-tracer 0.5.0's load_transcoder_set has no activation argument (its main branch reads
    # activation: topk / k from config.yaml): apply its TopK by hand, as that branch does.
    _record(rows, "circuit_tracer", "ours -> theirs", "TopK skip transcoder (TopK applied by hand)",
            _ours_out(ours_topk, x), theirs_out(theirs, TopK(K)))
    tc = load(ours.export(tmp / "ct-src", "circuit_tracer"))
    tc.to_safetensors(str(tmp / "ct-src" / "layer_0.safetensors"))  # their writer, our config.yaml
    back = SaeBase.from_pretrained(tmp / "ct-src", layer=0)
    _record(rows, "circuit_tracer", "theirs -> ours", f"to_safetensors -> {type(back).__name__}",
            _ours_out(back, x), theirs_out(tc))
    assert isinstance(SingleLayerTranscoder, type)


def check_hook_names(rows: list[dict[str, Any]], tmp: Path) -> None:
    """mi_crow's hook-name map against TransformerLens' own hook points: the same tiny random model run by
    HuggingFace (our module outputs/inputs) and by TransformerLens (weights converted, no folding)."""
    import transformers as tf
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    from mi_crow.language_model.hook_names import tl_to_hook

    torch.manual_seed(0)
    models = {
        "gpt2": (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
                 HookedTransformerConfig(n_layers=2, d_model=16, d_head=8, n_heads=2, d_mlp=64, d_vocab=64, n_ctx=32,
                                         act_fn="gelu_new", normalization_type="LN", eps=1e-5,
                                         original_architecture="GPT2LMHeadModel", default_prepend_bos=False),
                 convert_gpt2_weights),
        "llama": (tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     num_key_value_heads=1, max_position_embeddings=32)),
                  HookedTransformerConfig(n_layers=2, d_model=16, d_head=8, n_heads=2, n_key_value_heads=1, d_mlp=32,
                                          d_vocab=64, n_ctx=32, act_fn="silu", normalization_type="RMS",
                                          positional_embedding_type="rotary", rotary_dim=8, rotary_base=10000,
                                          gated_mlp=True, final_rms=True, eps=1e-6,
                                          original_architecture="LlamaForCausalLM", default_prepend_bos=False),
                  convert_llama_weights),
    }
    ids = torch.arange(12).reshape(2, 6) % 60 + 1
    for family, (hf, cfg, convert) in models.items():
        hf.eval()
        with torch.no_grad():  # non-trivial norm weights, so a norm's weight cannot hide
            for name, p in hf.named_parameters():
                if "norm" in name or "ln" in name:
                    p.add_(0.3 * torch.randn_like(p))
        tl = HookedTransformer(cfg)
        tl.load_and_process_state_dict(convert(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False,
                                       refactor_factored_attn_matrices=False)
        tl.eval()
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for mname, module in hf.named_modules():
            def pre(m: Any, args: Any, kwargs: Any, mname: str = mname) -> None:
                first = args[0] if args else kwargs.get("hidden_states")
                if isinstance(first, torch.Tensor):
                    inputs.setdefault(mname, first.detach())

            def post(m: Any, args: Any, out: Any, mname: str = mname) -> None:
                out = out[0] if isinstance(out, tuple) else out
                if isinstance(out, torch.Tensor):
                    outputs.setdefault(mname, out.detach())

            handles += [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)
            _, cache = tl.run_with_cache(ids)
        for h in handles:
            h.remove()
        for layer in range(2):
            for suffix in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                           "ln1.hook_normalized", "ln2.hook_normalized"):
                name = f"blocks.{layer}.{suffix}"
                point = tl_to_hook(name, family)
                ours = (outputs if point.side == "output" else inputs)[point.module]
                theirs = cache[name]
                d = _diff(ours, theirs)
                status = "ok" if d["max_rel"] < 1e-4 else "differs"
                if status == "differs" and suffix.startswith("ln"):
                    ln = getattr(tl.blocks[layer], suffix.split(".")[0])
                    weighted = theirs * ln.w + (ln.b if hasattr(ln, "b") else 0)
                    if _diff(ours, weighted)["max_rel"] < 1e-4:
                        status = "= TL hook_normalized * w (+ b): TL excludes the norm weight"
                rows.append({"library": "transformer_lens", "direction": "hook map", "case": f"{family} {name} -> "
                             f"{point.module} ({point.side})", "status": status, "code": d, "reconstruction": d})


CHECKS: dict[str, Callable[[list[dict[str, Any]], Path], None]] = {
    "sae_lens": check_sae_lens,
    "sparsify": check_sparsify,
    "dictionary_learning": check_dictionary_learning,
    "circuit_tracer": check_circuit_tracer,
    "transformer_lens": check_hook_names,
}


def main() -> int:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for library, check in CHECKS.items():
            sub = tmp / library
            sub.mkdir()
            try:
                check(rows, sub)
            except ImportError as exc:
                rows.append({"library": library, "direction": "-", "case": "-", "status": f"skipped: {exc}"})
            except Exception as exc:  # noqa: BLE001 - a failed check is a result to report
                traceback.print_exc()
                rows.append({"library": library, "direction": "-", "case": "-",
                             "status": f"FAILED: {type(exc).__name__}: {exc}"})
    print(f"interop check: n_latents={N}, d={D}, k={K}, {TOKENS} random tokens, float32, CPU\n")
    print("| library | direction | case | status | code max abs | code max rel | recon max abs | recon max rel |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, rec = r.get("code", {}), r.get("reconstruction", {})
        cells = [f"{c.get('max_abs', float('nan')):.2e}", f"{c.get('max_rel', float('nan')):.2e}",
                 f"{rec.get('max_abs', float('nan')):.2e}", f"{rec.get('max_rel', float('nan')):.2e}"]
        print(f"| {r['library']} | {r['direction']} | {r['case']} | {r['status']} | {' | '.join(cells)} |")
    versions = {}
    for name in ("sae_lens", "sparsify", "dictionary_learning", "circuit_tracer", "torch", "transformers"):
        try:
            from importlib.metadata import version

            versions[name] = version({"sae_lens": "sae-lens", "sparsify": "eai-sparsify",
                                      "dictionary_learning": "dictionary-learning",
                                      "circuit_tracer": "circuit-tracer"}.get(name, name))
        except Exception:  # noqa: BLE001
            versions[name] = None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"shape": {"n_latents": N, "d": D, "k": K, "tokens": TOKENS},
                                   "versions": versions, "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS}")
    failed = [r for r in rows if r["status"].startswith("FAILED")]
    worst = max((r["reconstruction"]["max_rel"] for r in rows if r["status"] == "ok"), default=0.0)
    failed += [r for r in rows if r["status"] == "differs"]
    return 1 if failed or worst > 1e-4 else 0


if __name__ == "__main__":
    sys.exit(main())
