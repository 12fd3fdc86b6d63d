"""EnCLAP captioner on a tiny BART built from config (no download)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioning.model import EnClapCaptioner, EnClapCfg, span_mask

WORDS = [
    "<s>",
    "<pad>",
    "</s>",
    "<unk>",
    "a",
    "dog",
    "barks",
    "man",
    "speaks",
    "rain",
    "falls",
    "on",
    "roof",
    "car",
    "passes",
    "by",
    "bird",
    "chirps",
    "loudly",
]
K, V_CODEC, CLAP = 16, 32, 8


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


BART = {
    "vocab_size": len(WORDS),
    "d_model": 16,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "max_position_embeddings": 128,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = EnClapCfg(bart_config=dict(BART), clap_dim=CLAP, codebook_size=V_CODEC, **kw)
    return EnClapCaptioner(cfg, tokenizer=make_tokenizer())


def batch(B=3, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V_CODEC, (B, K, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T - 10 :] = False
    clap = torch.randn(B, CLAP, generator=g)
    return tokens, mask, clap


CAPTIONS = ["a dog barks", "rain falls on roof", "car passes by loudly", "man speaks bird chirps"]


def test_cfg_defaults_match_enclap():
    c = EnClapCfg()
    assert (c.bart_name, c.n_codebooks, c.codebook_size, c.clap_dim) == ("facebook/bart-base", 16, 1024, 512)
    assert (c.mcm_prob, c.mcm_span, c.mcm_loss_scale, c.label_smoothing) == (0.15, 10, 0.7, 0.2)
    assert (c.num_beams, c.no_repeat_ngram_size, c.max_length) == (4, 3, 50)
    assert c.codebook_weights()[:3] == [0.5, 0.25, 0.125] and len(c.codebook_weights()) == 16


def test_forward_shapes_and_finite_losses():
    m = make_model().train()
    tokens, mask, clap = batch()
    labels = m.tokenize_captions(CAPTIONS[:3])
    out = m(tokens, mask, clap, labels, generator=torch.Generator().manual_seed(0))
    assert out["logits"].shape == (3, labels.shape[1], len(WORDS))
    for k in ("loss", "caption_loss", "mcm_loss"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    assert torch.allclose(out["loss"], out["caption_loss"] + out["mcm_loss"])
    # the encoder layout: 2 BOS + T frames + EOS
    h, attn = m.encode(tokens, mask, clap)
    assert h.shape == (3, 43, 16) and attn[1].sum() == 30 + 3 and attn[0].sum() == 43
    # eval mode: no MCM unless asked
    m.eval()
    out = m(tokens, mask, clap, labels)
    assert out["mcm_loss"] is None and torch.equal(out["loss"], out["caption_loss"])


def test_every_parameter_gets_a_gradient():
    m = make_model().train()
    tokens, mask, clap = batch(T=60)
    out = m(tokens, mask, clap, m.tokenize_captions(CAPTIONS[:3]), generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_span_mask_ratio_and_limits():
    g = torch.Generator().manual_seed(0)
    m = span_mask([1000] * 8, K, 1000, 0.15, 10, g)
    ratio = m.float().mean().item()
    assert 0.11 < ratio <= 0.155, ratio  # spans overlap, so a bit under 0.15
    assert not torch.equal(m[:, 0], m[:, 1])  # codebooks are masked independently
    # spans are runs of >= 10 frames
    row = m[0, 0].int()
    starts = ((row[1:] - row[:-1]) == 1).nonzero().flatten() + 1
    for s in starts.tolist():
        assert row[s : s + 10].all()
    v = span_mask([100, 50, 5], K, 100, 0.3, 10, g)
    assert not v[1, :, 50:].any() and v[1].any() and not v[2].any()  # within length; too short -> none
    assert not span_mask([100], K, 100, 0.0, 10, g).any()


def test_mcm_loss_matches_hand_computation_with_codebook_weights():
    m = make_model().eval()
    tokens, mask, clap = batch()
    mcm_mask = span_mask(mask.sum(-1), K, tokens.shape[-1], 0.3, 5, torch.Generator().manual_seed(5))
    mcm_mask &= mask[:, None, :]
    out = m(tokens, mask, clap, mcm_mask=mcm_mask)
    hidden, _ = m.encode(tokens, mask, clap, mcm_mask=mcm_mask)
    T = tokens.shape[-1]
    expected = 0.0
    for i in range(K):  # EnCLAP style: logits at every position, -100 labels where not masked
        logits = m.mcm_heads[i](hidden[:, 2 : 2 + T])
        lab = torch.where(mcm_mask[:, i], tokens[:, i], torch.full_like(tokens[:, i], -100))
        expected = expected + F.cross_entropy(logits.reshape(-1, V_CODEC), lab.reshape(-1)) / 2 ** (i + 1)
    assert torch.allclose(out["mcm_loss"], 0.7 * expected, atol=1e-6)
    flat = make_model(mcm_codebook_weights=[1.0] * K).eval()
    flat.load_state_dict(m.state_dict())
    assert not torch.allclose(flat(tokens, mask, clap, mcm_mask=mcm_mask)["mcm_loss"], out["mcm_loss"])


def test_only_masked_positions_contribute_and_codes_are_replaced():
    m = make_model().eval()
    tokens, mask, clap = batch()
    mcm_mask = torch.zeros(3, K, 40, dtype=torch.bool)
    mcm_mask[0, 3, 5:15] = True
    mcm_mask[2, 0, 20:30] = True
    hidden, _ = m.encode(tokens, mask, clap, mcm_mask=mcm_mask)
    hidden = hidden.detach().requires_grad_(True)
    m.mcm_loss(hidden, tokens, mcm_mask).backward()
    touched = hidden.grad.abs().sum(-1) > 0
    expected = torch.zeros(3, 43, dtype=torch.bool)
    expected[:, 2:42] = mcm_mask.any(1)
    assert torch.equal(touched, expected)
    # masked codes are replaced by the mask id: their original values do not reach the encoder
    changed = tokens.clone()
    changed[0, 3, 5:15] = (changed[0, 3, 5:15] + 1) % V_CODEC
    h2, _ = m.encode(changed, mask, clap, mcm_mask=mcm_mask)
    assert torch.allclose(h2, hidden)
    h3, _ = m.encode(changed, mask, clap)  # without the mask the changed codes do reach the encoder
    h_orig, _ = m.encode(tokens, mask, clap)
    assert not torch.allclose(h3, h_orig)


def test_clap_slot_positions_and_padding_invariance():
    m = make_model().eval()
    tokens, mask, clap = batch()
    x, _, codec_pos = m.embed(tokens, mask, clap)
    assert torch.allclose(x[:, 0], m.clap_projection(clap))
    assert codec_pos[0, 2:42].all() and not codec_pos[0, :2].any() and not codec_pos[1, 32:].any()
    seen = {}
    enc = m.bart.get_encoder()
    hook = enc.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    m.encode(tokens, mask, clap)
    hook.remove()
    w = enc.embed_positions.weight  # BART offset 2: position j is row j+2
    pos = torch.cat([torch.zeros(1, 16), w[2 : 2 + 42]], 0)
    assert torch.allclose(seen["h"], enc.layernorm_embedding(x + pos), atol=1e-6)
    # a padded clip encodes like the same clip alone
    h, _ = m.encode(tokens, mask, clap)
    h1, _ = m.encode(tokens[1:2, :, :30], mask[1:2, :30], clap[1:2])
    assert torch.allclose(h[1, :33], h1[0], atol=1e-5)
    bad = mask.clone()
    bad[0, 3] = False
    with pytest.raises(ValueError, match="right-padded"):
        m.encode(tokens, bad, clap)


def _has_repeat_ngram(seq, n=3):
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_generate_strings_max_length_and_no_repeat():
    m = make_model().eval()
    tokens, mask, clap = batch()
    texts = m.generate(tokens, mask, clap, max_length=12)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    ids = m.generate_ids(tokens, mask, clap, max_length=12)
    assert ids.shape[1] <= 12
    for row in ids.tolist():
        assert not _has_repeat_ngram(row, 3)
    ids2 = m.generate_ids(tokens, mask, clap, max_length=20, no_repeat_ngram_size=0, num_beams=1)
    assert ids2.shape[1] <= 20


def test_overfit_four_examples():
    m = make_model(seed=2).train()
    tokens, mask, clap = batch(B=4, T=30, seed=4)
    labels = m.tokenize_captions(CAPTIONS)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        out = m(tokens, mask, clap, labels, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["caption_loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert m.generate(tokens, mask, clap, max_length=10) == CAPTIONS


def test_save_load_round_trip(tmp_path):
    m = make_model().eval()
    with torch.no_grad():  # move away from the init so a fresh model would differ
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens, mask, clap = batch()
    labels = m.tokenize_captions(CAPTIONS[:3])
    m.save_pretrained(tmp_path)
    assert {"enclap_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    r = EnClapCaptioner.from_pretrained(tmp_path).eval()
    a, b = m(tokens, mask, clap, labels), r(tokens, mask, clap, labels)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])
    assert m.generate(tokens, mask, clap, max_length=12) == r.generate(tokens, mask, clap, max_length=12)
    assert r.tokenizer.decode(labels[0, :5].tolist(), skip_special_tokens=True) == "a dog barks"
