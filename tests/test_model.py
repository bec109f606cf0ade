import torch

from megavac.loss import per_language_losses
from megavac.model import PRESETS, ModelConfig, Transformer


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, **{**PRESETS["tiny"], "dropout": 0.0, **kw})
    return Transformer(cfg).eval()


def batch(B=6, S=7, T=5, K=3):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 50, (B, S), generator=g)
    tgt = torch.randint(4, 50, (B, T), generator=g)
    src[0, 5:] = 0  # padding
    tgt[1, 3:] = 0
    lang = torch.tensor([0, 0, 1, 1, 1, 2][:B])
    return src, tgt, lang


def test_per_language_losses_sum_to_batch_loss_and_gradients_add_up():
    model = tiny()
    src, tgt, lang = batch()
    loss_k, nll_k, ntok_k = per_language_losses(model(src, tgt), tgt, lang, 3, pad_id=0)
    grads = []
    for k in range(3):
        model.zero_grad()
        per_language_losses(model(src, tgt), tgt, lang, 3, pad_id=0)[0][k].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    logits = model(src, tgt)
    lp = torch.log_softmax(logits, -1)
    mask = tgt != 0
    nll = -lp.gather(-1, tgt[..., None])[..., 0]
    smooth = -lp.sum(-1)
    eps_i = 0.1 / 49
    ref = (((1 - 0.1 - eps_i) * nll + eps_i * smooth) * mask).sum() / mask.sum()
    ref.backward()
    mono = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(loss_k.sum(), ref)
    torch.testing.assert_close(sum(grads), mono, rtol=1e-5, atol=1e-7)
    assert int(ntok_k.sum()) == int(mask.sum())
    torch.testing.assert_close(nll_k.sum(), (nll * mask).sum())


def test_decoder_is_causal_and_padding_is_ignored():
    model = tiny()
    src, tgt, _ = batch()
    out = model(src, tgt)
    tgt2 = tgt.clone()
    tgt2[:, -1] = 7  # changing the last target token must not change earlier positions
    torch.testing.assert_close(model(src, tgt2)[:, :-1], out[:, :-1])
    src2 = src.clone()
    src2[0, 5:] = 0
    longer = torch.cat([src2, torch.zeros(src.shape[0], 3, dtype=torch.long)], 1)  # extra padding columns
    torch.testing.assert_close(model(longer, tgt)[0], model(src2, tgt)[0], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_and_presets():
    model = tiny()
    # The output projection IS the embedding: no [V, d] matrix besides it.
    big_mats = [n for n, p in model.named_parameters() if p.shape == model.embed.weight.shape]
    assert big_mats == ["embed.weight"]
    src, tgt, _ = batch()
    with torch.no_grad():
        before = model(src, tgt)
        model.embed.weight[7] += 1.0
        assert not torch.allclose(model(src, tgt)[..., 7], before[..., 7])
    big = ModelConfig(vocab_size=64000, **PRESETS["big"])
    assert big.d_model == 1024 and big.n_heads == 16
    # Transformer-big with a 64k shared vocabulary has ~242M parameters (tied).
    with torch.device("meta"):
        n = Transformer(big).num_parameters()
    assert 240e6 < n < 245e6, n


def test_post_ln_variant_runs():
    model = tiny(pre_ln=False)
    src, tgt, _ = batch()
    assert torch.isfinite(model(src, tgt)).all()
