"""Models: tiny architectures, chunked log-probs vs plain autograd, alignment, vocabulary bridging, persistence,
the reward model and precision selection (rlchat/model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlchat.config import Config
from rlchat.errors import ConfigError, TokenizerError
from rlchat.model import (
    PolicyValueModel,
    RewardModel,
    build_tiny_lm,
    chunked_logprobs,
    cpu_has_bf16,
    load_lm,
    position_ids_from_mask,
    resolve_precision,
)
from rlchat.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", 4096)


def make_cfg(**dotted: object) -> Config:
    base = {"tokenizer.vocab_size": 4096, "model.n_embd": 32, "model.n_head": 2, "model.precision": "fp32"}
    base.update(dotted)
    return Config().replace(**base)


def padded_batch(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- tiny architectures


@pytest.mark.parametrize(
    ("arch", "cls_name"), [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")]
)
def test_tiny_model_per_arch_has_documented_shapes(tok: ChatTokenizer, arch: str, cls_name: str) -> None:
    cfg = make_cfg(**{"model.arch": arch, "model.n_layer": 3, "model.n_positions": 128})
    model = PolicyValueModel.build(cfg, tok)
    assert type(model.lm).__name__ == cls_name
    text = model.lm.config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (3, 32, 2)
    assert text.max_position_embeddings == 128
    assert model.lm.get_input_embeddings().weight.shape == (tok.n_vocab, 32)
    # tied input/output embeddings
    assert model.lm.get_output_embeddings().weight.data_ptr() == model.lm.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(0, 4000, (2, 7))
    out = model(ids, torch.ones_like(ids))
    for t in (out.logprobs, out.entropy, out.values):
        assert t.shape == (2, 7) and t.dtype == torch.float32
    assert torch.all(out.logprobs[:, 0] == 0) and torch.all(out.values[:, 0] == 0)
    assert torch.all(out.logprobs[:, 1:] < 0)
    assert torch.all(out.entropy[:, 1:] > 0) and torch.all(out.entropy <= torch.log(torch.tensor(4096.0)) + 1e-4)


def test_build_is_seeded_and_leaves_global_rng_alone(tok: ChatTokenizer) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = PolicyValueModel.build(make_cfg(seed=5), tok)
    after = torch.rand(1)
    b = PolicyValueModel.build(make_cfg(seed=5), tok)
    c = PolicyValueModel.build(make_cfg(seed=6), tok)
    assert torch.equal(before, after)
    wa, wb, wc = (m.lm.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_n_embd_not_multiple_of_heads_is_a_config_error(tok: ChatTokenizer) -> None:
    cfg = make_cfg()
    with pytest.raises(ConfigError, match="multiple of model.n_head"):
        build_tiny_lm(cfg.model.__class__(n_embd=30, n_head=4), tok.n_vocab)


# ---------------------------------------------------------------------------------------------- chunked log-probs


@pytest.mark.parametrize(
    ("with_bias", "scale", "temperature", "block_v"),
    [(False, 1.0, 1.0, 4096), (True, 0.5, 1.0, 4096), (True, 0.5, 0.7, 4096), (True, 0.5, 0.7, 7), (False, 1, 1, 32)],
)
def test_chunked_logprobs_match_plain_autograd_values_and_gradients(
    with_bias: bool, scale: float, temperature: float, block_v: int
) -> None:
    """Tiled over rows (5) and, with a small ``block_v``, over the vocabulary: the online log-sum-exp, the target
    logits found in their tile and the per-tile weight gradients equal plain autograd over full logits."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 23, 16, 101
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.1).requires_grad_() if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)

    lp, ent = chunked_logprobs(
        hidden, weight, bias, targets, chunk_size=5, transform=(scale, 0.0), temperature=temperature, block_v=block_v
    )
    (lp * a + ent * b).sum().backward()
    grads = [hidden.grad.clone(), weight.grad.clone()] + ([bias.grad.clone()] if with_bias else [])

    hidden.grad = weight.grad = None
    if with_bias:
        bias.grad = None
    z = hidden @ weight.t() + (bias if with_bias else 0.0)
    logp = torch.log_softmax(z * scale / temperature, -1)
    ref_lp = logp.gather(1, targets[:, None]).squeeze(1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_lp * a + ref_ent * b).sum().backward()
    ref_grads = [hidden.grad, weight.grad] + ([bias.grad] if with_bias else [])

    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_chunked_logprobs_softcap_and_bf16_paths() -> None:
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (9,), generator=g)
    lp, _ = chunked_logprobs(hidden, weight, None, targets, chunk_size=4, transform=(1.0, 3.0))
    ref = torch.log_softmax(3.0 * torch.tanh(hidden @ weight.t() / 3.0), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    # the temperature divides the capped logits (the generation engine's order), not the raw ones
    lp_t, _ = chunked_logprobs(hidden, weight, None, targets, chunk_size=4, transform=(1.0, 3.0), temperature=0.5)
    capped = 3.0 * torch.tanh(hidden @ weight.t() / 3.0)
    ref_t = torch.log_softmax(capped / 0.5, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lp_t, ref_t, atol=1e-5, rtol=1e-5)
    lp16, ent16 = chunked_logprobs(hidden, weight, None, targets, chunk_size=4, matmul_dtype=torch.bfloat16)
    ref32 = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    assert lp16.dtype == torch.float32 and torch.allclose(lp16, ref32, atol=0.1)
    # bf16 tiles of the vocabulary: gradients agree with fp32 autograd to bf16 precision
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_b, ent_b = chunked_logprobs(h2, w2, None, targets, chunk_size=4, matmul_dtype=torch.bfloat16, block_v=16)
    (lp_b.sum() + ent_b.sum()).backward()
    h3, w3 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax(h3 @ w3.t(), -1)
    (logp.gather(1, targets[:, None]).sum() - (logp.exp() * logp).sum()).backward()
    torch.testing.assert_close(lp_b, ref32, atol=0.1, rtol=0.05)
    torch.testing.assert_close(h2.grad, h3.grad, atol=0.1, rtol=0.05)
    torch.testing.assert_close(w2.grad, w3.grad, atol=0.1, rtol=0.05)


def test_forward_matches_full_logits_with_alignment_and_gradients(tok: ChatTokenizer) -> None:
    """logprobs[:, t] = log pi(x_t | x_<t) at action positions only; values and gradients agree with autograd."""
    model = PolicyValueModel.build(make_cfg(**{"model.arch": "llama"}), tok)
    rows = [[5, 17, 300, 41, 9, 77], [8, 1000, 3]]
    ids, mask = padded_batch(rows, tok.pad_id, left=False)
    action = torch.zeros_like(ids)
    action[0, 3:6] = 1
    action[1, 1:3] = 1
    out = model(ids, mask, action, chunk_size=2)
    (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.lm.named_parameters() if p.grad is not None}
    model.zero_grad()

    logits = model.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = torch.log_softmax(logits.float(), -1)  # (B, T, V)
    ref_lp = torch.zeros(ids.shape)
    ref_ent = torch.zeros(ids.shape)
    ref_lp[:, 1:] = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    ref_ent[:, 1:] = -(logp[:, :-1].exp() * logp[:, :-1]).sum(-1)
    ref_lp, ref_ent = ref_lp * action, ref_ent * action
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    ref = {n: p.grad for n, p in model.lm.named_parameters() if p.grad is not None}

    torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_ent, atol=1e-5, rtol=1e-5)
    assert torch.all(out.logprobs[action == 0] == 0) and torch.all(out.entropy[action == 0] == 0)
    assert got.keys() == ref.keys() and len(got) > 0
    for name in got:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_left_and_right_padding_give_the_same_outputs(tok: ChatTokenizer, arch: str) -> None:
    model = PolicyValueModel.build(make_cfg(**{"model.arch": arch}), tok)
    rows = [[5, 17, 300, 41, 9, 77, 12], [8, 1000, 3]]
    out = {}
    for left in (True, False):
        ids, mask = padded_batch(rows, tok.pad_id, left)
        with torch.no_grad():
            o = model(ids, mask, mask)
            boot = model.bootstrap_values(ids, mask)
        # bring each row back to a common right-aligned view for comparison
        per_row = []
        for i, r in enumerate(rows):
            sl = slice(ids.shape[1] - len(r), None) if left else slice(0, len(r))
            per_row.append((o.logprobs[i, sl][1:], o.values[i, sl][1:], o.entropy[i, sl][1:]))
        out[left] = (per_row, boot)
    for a, b in zip(out[True][0], out[False][0]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)


def test_values_and_bootstrap_come_from_the_value_head(tok: ChatTokenizer) -> None:
    model = PolicyValueModel.build(make_cfg(), tok)
    ids, mask = padded_batch([[1, 2, 3, 4], [9, 8]], tok.pad_id, left=False)
    with torch.no_grad():
        out = model(ids, mask)
        h = model.trunk(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).last_hidden_state
        v = model.value_head(h).squeeze(-1)
        boot = model.bootstrap_values(ids, mask)
    torch.testing.assert_close(out.values[:, 1:], v[:, :-1])
    torch.testing.assert_close(boot, torch.stack([v[0, 3], v[1, 1]]))


def test_separate_critic_has_its_own_trunk(tok: ChatTokenizer) -> None:
    model = PolicyValueModel.build(make_cfg(**{"model.critic": "separate"}), tok)
    assert model.critic is not None
    ids = torch.randint(0, 4000, (2, 5))
    out = model(ids, torch.ones_like(ids))
    out.values.sum().backward()
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None for p in model.critic.parameters() if p.requires_grad and p.dim() > 1)
    assert model.value_head.weight.grad is not None


# ---------------------------------------------------------------------------------------------- vocabulary bridging


def _save_tiny(tmp_path: Path, arch: str, vocab: int, name: str = "pre", tie: bool = True) -> Path:
    cfg = make_cfg(**{"model.arch": arch})
    lm = build_tiny_lm(cfg.model, vocab)
    if not tie:  # an untied model: separate lm_head weights are saved and bridged separately
        lm.config.tie_word_embeddings = False
        lm = type(lm)(lm.config)
    d = tmp_path / name
    lm.save_pretrained(d)
    return d


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_missing_chat_tokens_are_added_as_mean_rows_and_ties_kept(
    tok: ChatTokenizer, tmp_path: Path, arch: str
) -> None:
    n_ranks = len(tok.enc._mergeable_ranks)  # the pretrained model knows the BPE but not our chat tokens
    d = _save_tiny(tmp_path, arch, n_ranks, tie=arch == "gpt2")
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(d)
    lm = load_lm(make_cfg(**{"model.name_or_path": str(d)}).model, tok)
    emb = lm.get_input_embeddings().weight
    out = lm.get_output_embeddings().weight
    assert emb.shape[0] == out.shape[0] == tok.n_vocab == lm.config.vocab_size
    torch.testing.assert_close(emb[:n_ranks], orig.get_input_embeddings().weight)
    torch.testing.assert_close(emb[n_ranks:], orig.get_input_embeddings().weight.mean(0).expand(6, -1))
    if arch == "gpt2":
        assert out.data_ptr() == emb.data_ptr()
    else:
        assert out.data_ptr() != emb.data_ptr()
        torch.testing.assert_close(out[n_ranks:], orig.get_output_embeddings().weight.mean(0).expand(6, -1))


def test_vocabulary_mismatch_is_refused_unless_reinit(tok: ChatTokenizer, tmp_path: Path) -> None:
    d = _save_tiny(tmp_path, "gpt2", 1000)  # cannot even hold the BPE ranks: another tokenizer's model
    cfg = make_cfg(**{"model.name_or_path": str(d)})
    with pytest.raises(TokenizerError, match="reinit_embeddings"):
        load_lm(cfg.model, tok)
    lm = load_lm(make_cfg(**{"model.name_or_path": str(d), "model.reinit_embeddings": True}).model, tok)
    assert lm.get_input_embeddings().weight.shape[0] == tok.n_vocab


def test_larger_embedding_without_tokenizer_files_is_refused_unless_reinit(tok: ChatTokenizer, tmp_path: Path) -> None:
    # A GPT-2-sized embedding (50,257 rows) holds all 4,090 BPE ranks, but it is GPT-2's vocabulary: with no
    # tokenizer files to compare, a merely larger embedding must not be taken for ours.
    d = _save_tiny(tmp_path, "gpt2", 50257)
    assert not any((d / f).exists() for f in ("tokenizer.json", "vocab.json", "rlchat_tokenizer.json"))
    with pytest.raises(TokenizerError) as e:
        load_lm(make_cfg(**{"model.name_or_path": str(d)}).model, tok)
    msg = str(e.value)
    assert "50257 embedding rows" in msg and "no tokenizer files" in msg and "4096" in msg
    assert "model.reinit_embeddings=true" in msg and "tokenizer.encoding" in msg
    lm = load_lm(make_cfg(**{"model.name_or_path": str(d), "model.reinit_embeddings": True}).model, tok)
    assert lm.get_input_embeddings().weight.shape[0] == tok.n_vocab == lm.config.vocab_size


@pytest.mark.parametrize(
    ("vocab_size", "rows", "kept_rows"),
    [
        (4096, 4096, 4096),  # exactly the tokenizer's ids
        (4096, 4090, 4096),  # the BPE without our chat tokens: resized (test above checks the mean rows)
        (4096, 4093, 4096),  # the BPE with some chat tokens: resized
        (4001, 4008, 4008),  # n_vocab 4001 padded to a multiple of 8: kept; the padded rows are never sampled
        (4001, 4032, 4032),  # ... of 32 / 64
        (4001, 4096, 4096),  # ... of 128
    ],
)
def test_embedding_sizes_accepted_without_tokenizer_files(
    tmp_path: Path, vocab_size: int, rows: int, kept_rows: int
) -> None:
    tok = ChatTokenizer("cl100k_base", vocab_size)
    d = _save_tiny(tmp_path, "llama", rows)
    cfg = make_cfg(**{"model.name_or_path": str(d), "tokenizer.vocab_size": vocab_size})
    model = PolicyValueModel.build(cfg, tok)
    assert model.lm.get_input_embeddings().weight.shape[0] == kept_rows
    assert model.vocab_size == tok.n_vocab  # padded rows are outside the policy's softmax


@pytest.mark.parametrize(("vocab_size", "rows"), [(4096, 4097), (4096, 4160), (4096, 8192), (4001, 4010)])
def test_embedding_sizes_refused_without_tokenizer_files(tmp_path: Path, vocab_size: int, rows: int) -> None:
    tok = ChatTokenizer("cl100k_base", vocab_size)
    d = _save_tiny(tmp_path, "gpt2", rows)  # larger than n_vocab and not n_vocab padded to a multiple of 8-128
    cfg = make_cfg(**{"model.name_or_path": str(d), "tokenizer.vocab_size": vocab_size})
    with pytest.raises(TokenizerError, match=f"{rows} embedding rows, no tokenizer files"):
        load_lm(cfg.model, tok)


def test_vocabulary_check_reads_the_shipped_tokenizer(tok: ChatTokenizer, tmp_path: Path) -> None:
    d = _save_tiny(tmp_path, "gpt2", 5000)  # big enough, but its rlchat tokenizer file says 5000 ids
    (d / "rlchat_tokenizer.json").write_text(json.dumps(ChatTokenizer("cl100k_base", 5000).to_dict()))
    with pytest.raises(TokenizerError, match="does not match"):
        load_lm(make_cfg(**{"model.name_or_path": str(d)}).model, tok)
    (d / "rlchat_tokenizer.json").write_text(json.dumps(tok.to_dict()))
    assert load_lm(make_cfg(**{"model.name_or_path": str(d)}).model, tok).config.vocab_size == 5000


def test_pretrained_local_path_loads_those_weights(tok: ChatTokenizer, tmp_path: Path) -> None:
    d = _save_tiny(tmp_path, "qwen2", tok.n_vocab)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(d)
    model = PolicyValueModel.build(make_cfg(**{"model.name_or_path": str(d), "model.arch": "gpt2"}), tok)
    assert type(model.lm).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 4000, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model.lm(ids).logits, ref(ids).logits)


# ---------------------------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_save_load_round_trip_gives_identical_outputs(tok: ChatTokenizer, tmp_path: Path, critic: str) -> None:
    cfg = make_cfg(**{"model.arch": "llama", "model.critic": critic})
    model = PolicyValueModel.build(cfg, tok)
    with torch.no_grad():
        model.value_head.bias.fill_(0.25)
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "value_head.safetensors"} <= files
    assert ("critic" in files) == (critic == "separate")
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = PolicyValueModel.from_pretrained(tmp_path / "m", cfg)
    ids, mask = padded_batch([[3, 4, 5, 6, 7], [10, 11]], tok.pad_id, left=True)
    with torch.no_grad():
        a, b = model(ids, mask), loaded(ids, mask)
    for x, y in ((a.logprobs, b.logprobs), (a.values, b.values), (a.entropy, b.entropy)):
        assert torch.equal(x, y)
    assert (loaded.critic is None) == (critic == "shared")


def test_from_pretrained_missing_files_raise_checkpoint_error(tmp_path: Path) -> None:
    from rlchat.errors import CheckpointError

    with pytest.raises(CheckpointError, match="config.json"):
        PolicyValueModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- reward model


def _tiny_encoder(family: str, vocab: int) -> torch.nn.Module:
    """A randomly initialised encoder trunk from a tiny config (no hub): BERT, DistilBERT or RoBERTa."""
    import transformers as tf

    if family == "bert":
        config = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        return tf.BertModel(config, add_pooling_layer=False)
    if family == "distilbert":  # no token_type_ids, different config names
        config = tf.DistilBertConfig(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
        )
        return tf.DistilBertModel(config)
    # RoBERTa numbers positions from pad_token_id + 1 (= 2), so it needs 2 more position rows than tokens
    config = tf.RobertaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
    )
    return tf.RobertaModel(config, add_pooling_layer=False)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_reward_model_on_a_tiny_encoder(tok: ChatTokenizer, tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    _tiny_encoder(family, tok.n_vocab).save_pretrained(tmp_path / family)
    rm = RewardModel.build(make_cfg(**{"rm.name_or_path": str(tmp_path / family)}), tok)
    assert not rm.causal and rm.hf_tokenizer is None
    assert type(rm.trunk).__name__.lower().startswith(family)
    # ids 0 and 1 are ordinary chat tokens here, though BERT / DistilBERT (0) and RoBERTa (1) pad with them
    ids, mask = padded_batch([[5, 1, 0, 1, 4], [9, 8]], tok.pad_id, left=False)
    with torch.no_grad():
        s = rm(ids, mask)
        # Reference: HF's own inputs_embeds path numbers positions sequentially (RoBERTa from its offset 2) without
        # reading the ids, which is what a right-padded row of real tokens should get.
        h = rm.trunk(inputs_embeds=rm.trunk.get_input_embeddings()(ids), attention_mask=mask).last_hidden_state
        longer = rm(
            torch.cat([ids, torch.full((2, 3), tok.pad_id)], 1), torch.cat([mask, torch.zeros(2, 3)], 1).long()
        )
        alone = rm(ids[1:, :2], mask[1:, :2])
    assert s.shape == (2,) and s.dtype == torch.float32
    torch.testing.assert_close(s, rm.score_head(h[:, 0]).squeeze(-1))  # scored from the first ([CLS]) token
    torch.testing.assert_close(s, longer, atol=1e-5, rtol=1e-5)  # padding does not change the score
    torch.testing.assert_close(s[1:], alone, atol=1e-5, rtol=1e-5)  # nor does batching with a longer row
    # every real token's embedding row learns, including the ids the encoder's config calls padding
    rm.zero_grad()
    rm(ids, mask).sum().backward()
    grad = rm.trunk.get_input_embeddings().weight.grad
    assert grad is not None
    assert [i for i in (0, 1, 4, 5, 8, 9) if grad[i].abs().sum() == 0] == []  # rows that would never learn
    assert grad[tok.pad_id].abs().sum() == 0  # the chat pad id is the row that gets no gradient
    rm.save_pretrained(tmp_path / "rm")
    again = RewardModel.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(again(ids, mask), s)


def test_reward_model_keeps_an_encoders_own_tokenizer(tok: ChatTokenizer, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path / "bert"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "answer", "the", "is"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(d)
    BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        add_pooling_layer=False,
    ).save_pretrained(d)
    rm = RewardModel.build(make_cfg(**{"rm.name_or_path": str(d)}), tok)
    assert rm.hf_tokenizer is not None
    ids, mask = rm.tokenize(["the answer is good", "bad"], tok)
    assert ids[0].tolist()[:6] == [2, 8, 7, 9, 5, 3]  # [CLS] the answer is good [SEP]
    with torch.no_grad():
        assert rm(ids, mask).shape == (2,)
    rm.save_pretrained(tmp_path / "rm")
    assert RewardModel.from_pretrained(tmp_path / "rm").hf_tokenizer is not None


def test_reward_model_on_a_causal_trunk_scores_the_last_real_token(tok: ChatTokenizer, tmp_path: Path) -> None:
    rm = RewardModel.build(make_cfg(**{"model.arch": "qwen2"}), tok)  # empty rm.name_or_path: tiny trunk
    assert rm.causal
    rows = [[1, 2, 3, 4, 5], [9, 8]]
    scores = []
    for left in (True, False):
        ids, mask = padded_batch(rows, tok.pad_id, left)
        with torch.no_grad():
            scores.append(rm(ids, mask))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    ids, mask = rm.tokenize(["hello there", "hi"], tok)
    assert ids.shape[0] == 2 and mask[1].sum() == len(tok.encode("hi"))
    rm.save_pretrained(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(RewardModel.from_pretrained(tmp_path / "rm")(ids, mask), rm(ids, mask))


# ---------------------------------------------------------------------------------------------- precision


def test_resolve_precision() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_has_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if cpu_has_bf16() else None)
    assert resolve_precision("auto", cpu, hidden_size=64) is None  # too narrow for bf16 to pay on a CPU
    assert resolve_precision("auto", cpu, hidden_size=256) is resolve_precision("auto", cpu)
    assert resolve_precision("bf16", cpu, hidden_size=64) is torch.bfloat16
    with pytest.raises(ConfigError, match="model.precision"):
        resolve_precision("fp16", cpu)


def test_auto_precision_on_a_gpu_takes_bf16_only_where_the_gpu_has_bf16_units(monkeypatch) -> None:
    """``torch.cuda.is_bf16_supported()`` counts emulation by default, so ``auto`` chose bf16 on a T4 or V100
    (no bf16 units: slow, emulated), against the documented "bf16 on GPUs that support it"."""

    def supported(including_emulation: bool = True) -> bool:  # a T4: bf16 only emulated
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_precision("auto", torch.device("cuda")) is None
    assert resolve_precision("bf16", torch.device("cuda")) is torch.bfloat16  # asked for: emulated if it must be
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16


def test_bf16_autocast_forward_is_close_to_fp32_and_keeps_fp32_weights(tok: ChatTokenizer) -> None:
    model = PolicyValueModel.build(make_cfg(), tok)
    ids = torch.randint(0, 4000, (2, 6))
    with torch.no_grad():
        ref = model(ids, torch.ones_like(ids))
        model.precision = "bf16"
        got = model(ids, torch.ones_like(ids))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert got.logprobs.dtype == torch.float32
    assert torch.allclose(got.logprobs, ref.logprobs, atol=0.1)
