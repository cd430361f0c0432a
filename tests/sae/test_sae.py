"""SAE variants: sparse training gradients equal dense autograd, exact batch selection, batch-independent
inference codes, the scale folded into saved weights, and save/load."""

import dataclasses
import math

import pytest
import torch

from traitscope.errors import TraitscopeError
from traitscope.sae import SAEConfig, build_sae, describe_params, load_sae, variants
from traitscope.sae.sparse import batch_topk_flat

TOPK_FAMILY = ["topk", "batchtopk", "matryoshka"]
EVERY_VARIANT = sorted(variants())
"""Every registered variant: the tests of what all SAEs promise run on each, a new one included."""


def make(variant: str, d: int = 16, s: int = 96, k: int = 5, **kw):
    torch.manual_seed(0)
    own = {name: value for name, value in {"k": k, "prefixes": [12, 48, s]}.items()
           if name in {f.name for f in dataclasses.fields(variants()[variant].Params)}}
    sae = build_sae(SAEConfig(variant, d, s, **(own | kw)))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    return sae


def with_threshold(sae, value: float):
    """A JumpReLU at inference (BatchTopK, Matryoshka, JumpReLU) with this threshold, as training leaves it."""
    if hasattr(sae, "threshold"):
        with torch.no_grad():
            sae.threshold.fill_(value)
    return sae


def test_registry_has_every_variant():
    assert {"relu", "topk", "batchtopk", "matryoshka", "jumprelu"} <= set(variants())


@pytest.mark.parametrize("variant", TOPK_FAMILY)
def test_sparse_gradients_equal_dense_autograd(variant):
    """The custom sparse backward (no dense decoder GEMM, no dense encoder-weight gradient) gives the
    gradients of the plain dense formulation, AuxK included."""
    sae = make(variant, k_aux=8)
    x = torch.randn(64, 16)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_s=dead)
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    with torch.no_grad():
        _, sel = sae.select(pre.detach().clone())
    mask = torch.zeros(64, 96)
    mask[sel.rows, sel.cols] = 1
    f = (pre * mask).relu()
    sst = ((x - x.mean(0)) ** 2).sum()
    prefixes = getattr(sae.params, "prefixes", None) or [96]
    recon = [f[:, :m] @ sae.W_dec[:m] + sae.b_dec for m in prefixes]
    loss = sum(((r - x) ** 2).sum() / sst for r in recon) / len(prefixes)
    e = (x - recon[-1]).detach()
    _, idx = torch.where(dead[None], pre, torch.tensor(-1e9)).topk(8, dim=1)
    f_aux = torch.nn.functional.leaky_relu(pre * torch.zeros(64, 96).scatter_(1, idx, 1), sae.params.auxk_leak)
    aux = min(int(dead.sum()) / 8, 1) * ((f_aux @ sae.W_dec - e) ** 2).sum() / sst
    (loss + sae.params.auxk_alpha * aux).backward()

    assert torch.allclose(out.loss, loss + sae.params.auxk_alpha * aux, rtol=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("leak", [0.0, 0.1])
def test_auxk_reaches_a_dead_latent_that_is_negative_on_every_token_only_when_it_leaks(leak):
    """Under a plain ReLU such a latent gets no gradient and can never come back (docs/training.md)."""
    sae = make("topk", k_aux=4, auxk_leak=leak)
    x = torch.randn(64, 16)
    with torch.no_grad():
        sae.b_enc[0] = -100.0  # latent 0: negative on every token
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:3] = True
    sae(x, dead_s=dead).loss.backward()
    reached = sae.W_enc.grad[:, 0].abs().sum() > 0
    assert bool(reached) == (leak > 0)


def test_relu_loss_weights_l1_by_decoder_norms():
    sae = make("relu", l1_coeff=2.0, l1_warmup=0.5)
    x = torch.randn(32, 16)
    out = sae(x, progress=0.25)  # a quarter of training done: half-way through λ's warm-up
    f = sae.encode(x)
    expected = ((sae.decode(f) - x) ** 2).sum(1).mean() + 0.5 * 2.0 / math.sqrt(16) * (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_batch_topk_selection_is_exact(seed):
    """Same entries as a top-k over the flattened batch, also when the strided sample misses the big
    values (every large value sits off the sample's stride)."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(256, 300, generator=g)
    if seed == 2:
        flat = pre.view(-1)
        off_stride = torch.arange(flat.numel()) % 97 != 0
        flat[off_stride & (torch.rand(flat.numel(), generator=g) < 0.02)] += 10
    n_keep = 256 * 7
    idx, values = batch_topk_flat(pre, n_keep)
    ref_values, ref_idx = pre.view(-1).topk(n_keep)
    assert torch.equal(idx, ref_idx.sort().values)
    assert torch.equal(values, pre.view(-1)[idx])


def test_batch_topk_keeps_only_positive_entries():
    pre = -torch.rand(8, 50)
    pre[0, :3] = 1.0
    idx, values = batch_topk_flat(pre, 8 * 4)
    assert idx.tolist() == [0, 1, 2]


@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka"])
def test_batchtopk_inference_codes_do_not_depend_on_the_batch(variant):
    sae = make(variant)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(20):  # learns a threshold
        out = sae(torch.randn(128, 16))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(sae.threshold) > 0
    sae.eval()
    x = torch.randn(50, 16)
    with torch.no_grad():
        together = sae.encode(x)
        alone = torch.cat([sae.encode(x[i:i + 1]) for i in range(50)])
        shuffled = sae.encode(x.flip(0)).flip(0)
    # the same latents fire; values agree up to the float rounding of differently blocked matrix products
    for other in (alone, shuffled):
        assert torch.equal(together > 0, other > 0)
        assert torch.allclose(together, other, atol=1e-6, rtol=1e-5)
    assert 0 < (together > 0).sum(1).float().mean() < 96


@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka"])
def test_a_short_run_learns_a_threshold_that_keeps_about_k(variant):
    """The threshold follows the batch cut of the trained encoder, not of the first steps: after 60
    steps the JumpReLU keeps about k latents per token at inference."""
    sae = make(variant, k=8)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    torch.manual_seed(1)
    mix = torch.randn(96, 16)
    for _ in range(60):
        x = torch.relu(torch.randn(256, 96) - 1.5) @ mix
        out = sae(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        l0 = (sae.eval().encode(torch.relu(torch.randn(2000, 96) - 1.5) @ mix) > 0).sum(1).float().mean()
    assert 6.5 < float(l0) < 9.5, float(l0)


@pytest.mark.parametrize("variant", EVERY_VARIANT)
def test_sparse_codes_are_the_positive_dense_codes(variant):
    """encode_sparse (what inference streams) lists exactly the positive entries of encode."""
    sae = with_threshold(make(variant), 0.2).eval()
    x = torch.randn(300, 16)
    with torch.no_grad():
        dense = sae.encode(x)
        tok, feat, vals = sae.encode_sparse(x)
    assert bool((vals > 0).all()) and len(vals) == int((dense > 0).sum()) > 0
    rebuilt = torch.zeros_like(dense).index_put_((tok, feat), vals)
    assert torch.allclose(rebuilt, dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", EVERY_VARIANT)
def test_folding_the_scale_gives_the_same_codes_on_raw_inputs(variant):
    """An SAE trained on scale·x, folded, gives codes/scale and x̂/scale on raw x."""
    sae = make(variant)
    with_threshold(sae, 0.3)
    x = torch.randn(40, 16) * 7 + 2
    scale = 0.05
    with torch.no_grad():
        codes = sae.encode(x * scale)
        x_hat = sae.decode(codes)
        sae.fold_input_scale_(scale)
        if not sae.unit_norm_decoder:
            norms = sae.W_dec.norm(dim=1)
            sae.unit_decoder_rows_()
            codes = codes * norms
            assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)
        assert torch.allclose(sae.encode(x), codes / scale, atol=1e-4, rtol=1e-4)
        assert torch.allclose(sae.decode(sae.encode(x)), x_hat / scale, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("variant", EVERY_VARIANT)
def test_save_and_load_round_trip(tmp_path, variant):
    sae = make(variant)
    with_threshold(sae, 0.25)
    sae.save(tmp_path, extra_config={"shards": {"hash": "abc"}})
    loaded = load_sae(tmp_path)
    assert loaded.cfg == sae.cfg
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.eval().encode(x))


def test_decoder_constraint_keeps_rows_on_the_unit_sphere():
    sae = make("topk")
    W_enc = sae.W_enc.detach().clone()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grads_()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(96), atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-6)
    assert torch.equal(sae.W_enc, W_enc)  # the encoder is untouched


def test_encoder_starts_as_decoder_transpose():
    sae = build_sae(SAEConfig("topk", 16, 64, k=4))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


@pytest.mark.parametrize("variant, params, message", [
    ("topk", {"k": 0}, "topk SAE: k=0 must be between 1 and d_sae"),
    ("batchtopk", {"k": 65}, "between 1 and d_sae"),
    ("matryoshka", {"k": 4, "prefixes": [32, 16, 64]}, "increase strictly"),
    ("matryoshka", {"k": 4, "prefixes": [16, 32]}, "end at d_sae"),
    ("relu", {"l1_coeff": -1.0}, ">= 0"),
    ("gated", {}, "unknown SAE variant"),
])
def test_impossible_configs_are_refused(variant, params, message):
    with pytest.raises(TraitscopeError, match=message):
        build_sae(SAEConfig(variant, 16, 64, **params))


def test_config_entries_written_before_variants_owned_their_parameters_load():
    """A config.json 'sae' entry lists k, l1_coeff and prefixes for every variant (null where unused):
    it reads back into the variant's own parameters, and is written with the same keys."""
    old = {"variant": "topk", "d_model": 16, "d_sae": 64, "k": 4, "l1_coeff": None, "prefixes": None}
    cfg = SAEConfig(**old)
    assert cfg.params == variants()["topk"].Params(k=4)
    entry = cfg.to_dict()
    assert {key: entry[key] for key in old} == old and SAEConfig(**entry) == cfg
    relu = SAEConfig(**{"variant": "relu", "d_model": 16, "d_sae": 64, "k": None, "l1_coeff": 2.0, "prefixes": None})
    assert build_sae(relu).params.l1_coeff == 2.0 and describe_params(relu.to_dict()) == "λ=2"
    with pytest.raises(TypeError, match="relu SAEs have no parameter k"):
        SAEConfig("relu", 16, 64, k=4)
    assert describe_params({"variant": "gated", "d_model": 16, "d_sae": 64}) == ""


def test_defaults_live_in_the_variant():
    assert build_sae(SAEConfig("relu", 16, 64)).params.l1_coeff == 5.0
    assert build_sae(SAEConfig("topk", 16, 64)).params.k == 32
    assert build_sae(SAEConfig("matryoshka", 16, 64, k=4)).params.prefixes == [4, 8, 16, 32, 64]
    assert build_sae(SAEConfig("matryoshka", 16, 64, k=4, prefix_levels=7)).params.prefixes == [1, 2, 4, 8, 16, 32, 64]
    assert [cls.loss_per_token for cls in (variants()["relu"], variants()["topk"])] == [True, False]


def test_jumprelu_learns_its_thresholds_by_the_pseudo_derivatives():
    """θ's gradient is the paper's straight-through estimate, −(θ/ε)·Σ_t ∂L/∂f·K − (λ/ε)·Σ_t K over the
    tokens within ε/2 of θ; the encoder gets the ordinary gradient of ReLU·H and none from the L0 term."""
    eps, lam, n = 0.2, 0.01, 64
    sae = make("jumprelu", bandwidth=eps, l0_coeff=lam, l0_warmup=0.0)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(96) * 0.3)
    x = torch.randn(n, 16)
    out = sae(x)
    out.loss.backward()

    W_enc = sae.W_enc.detach().clone().requires_grad_()
    pre = (x - sae.b_dec.detach()) @ W_enc + sae.b_enc.detach()
    theta = sae.threshold.detach()
    fires = (pre.detach() > theta) & (pre.detach() > 0)
    x_hat = (pre * fires) @ sae.W_dec.detach() + sae.b_dec.detach()
    loss = ((x_hat - x) ** 2).sum(1).mean() + lam * fires.sum(1).float().mean()
    loss.backward()
    assert torch.allclose(out.loss, loss, rtol=1e-5) and float(out.parts["l0"]) == fires.sum() / n
    assert torch.allclose(sae.W_enc.grad, W_enc.grad, atol=1e-6, rtol=1e-4)
    dL_df = 2 * (x_hat.detach() - x) @ sae.W_dec.detach().T / n
    K = ((pre.detach() - theta).abs() < eps / 2).float() / eps
    expected = (-theta * dL_df * K).sum(0) - lam / n * K.sum(0)
    assert K.sum() > 0 and torch.allclose(sae.threshold.grad, expected, atol=1e-6, rtol=1e-4)


def test_a_short_jumprelu_run_raises_its_thresholds_and_a_larger_penalty_is_sparser():
    """60 steps on sparse mixtures (inputs of unit mean norm): thresholds rise from 0.001, more under a
    larger λ, which halves L0."""
    l0, theta = {}, {}
    for lam in (1e-3, 3e-2):
        torch.manual_seed(0)
        sae = build_sae(SAEConfig("jumprelu", 16, 96, l0_coeff=lam, l0_warmup=0.0, bandwidth=0.01))
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        torch.manual_seed(1)
        mix = torch.randn(96, 16)
        for _ in range(60):
            x = torch.relu(torch.randn(256, 96) - 1.5) @ mix
            out = sae(x / x.norm(dim=1).mean())
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sae.normalize_decoder_()
        l0[lam], theta[lam] = float(out.parts["l0"]), float(sae.threshold.detach().mean())
    assert 1e-3 < theta[1e-3] < theta[3e-2] and l0[3e-2] < 0.6 * l0[1e-3] < 0.2 * 96, (theta, l0)
