"""Pretrained architectures beyond the tiny ones: the trunk is found whatever the model calls it (Llama 4), and a
model whose own forward rlchat's trunk + head + KV-cache decoding would not reproduce is refused at load instead of
giving silently wrong log-probs and tokens (rlchat/core/model.py ``check_model_computation``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlchat.config import Config
from rlchat.errors import ConfigError
from rlchat.generation import GenerationEngine, SamplingParams
from rlchat.model import PolicyValueModel, load_lm, resolve_trunk
from rlchat.tokenizer import ChatTokenizer

PROMPTS = [[11, 500, 923, 77, 3001], [2049, 19]]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", 4096)


def make_cfg(**dotted: object) -> Config:
    base = {"tokenizer.vocab_size": 4096, "model.precision": "fp32"}
    base.update(dotted)
    return Config().replace(**base)


def _save(tmp_path: Path, config: Any, name: str = "pre") -> Path:
    """A randomly initialised model of ``config`` saved without tokenizer files (its vocabulary is the tokenizer's
    size, so no bridging happens)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    d = tmp_path / name
    AutoModelForCausalLM.from_config(config).float().save_pretrained(d)
    return d


def _reference_greedy(lm: Any, prompt: list[int], n: int, vocab: int) -> list[int]:
    """Greedy decoding by the model's own full forward, no cache, one row at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(lm(torch.tensor([ids]), use_cache=False).logits[0, -1, :vocab].argmax()))
    return ids[len(prompt) :]


def llama4_config(vocab: int) -> Any:
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        intermediate_size=128,
        intermediate_size_mlp=128,
        max_position_embeddings=128,
        initializer_range=0.2,
    )


# ------------------------------------------------------------------------------------------------ the trunk


def test_llama4_text_model_generates_and_scores_like_its_own_forward(tok: ChatTokenizer, tmp_path: Path) -> None:
    """Llama 4's ``base_model_prefix`` ("language_model") names no attribute of ``Llama4ForCausalLM``, so
    ``lm.base_model`` was the causal LM itself and every trunk forward failed."""
    d = _save(tmp_path, llama4_config(tok.n_vocab))
    cfg = make_cfg(**{"model.name_or_path": str(d)})
    policy = PolicyValueModel.build(cfg, tok).eval()
    lm = policy.lm
    assert type(lm).__name__ == "Llama4ForCausalLM"
    assert resolve_trunk(lm) is lm.model and policy.trunk is lm.model

    # the engine's greedy tokens are the model's own argmax, for a full and a left-padded row
    engine = GenerationEngine(policy, tok, precision="fp32")
    result = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert result.tokens == [_reference_greedy(lm, p, 5, tok.n_vocab) for p in PROMPTS]

    # the learner's log-probs are log_softmax of the model's logits
    seq = PROMPTS[0] + result.tokens[0]
    ids = torch.tensor([seq])
    with torch.no_grad():
        out = policy(ids, torch.ones_like(ids))
        ref = torch.log_softmax(lm(ids, use_cache=False).logits[0, :-1, : tok.n_vocab], -1)
    expected = ref.gather(1, ids[0, 1:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs[0, 1:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(policy.action_logprobs(ids, torch.ones_like(ids))[0, 1:], expected)


def test_separate_critic_of_llama4_is_its_trunk(tok: ChatTokenizer, tmp_path: Path) -> None:
    d = _save(tmp_path, llama4_config(tok.n_vocab))
    cfg = make_cfg(**{"model.name_or_path": str(d), "model.critic": "separate"})
    policy = PolicyValueModel.build(cfg, tok)
    assert type(policy.critic).__name__ == "Llama4TextModel"
    ids = torch.tensor([PROMPTS[0]])
    assert policy.bootstrap_values(ids, torch.ones_like(ids)).shape == (1,)


def test_a_model_without_a_trunk_is_refused() -> None:
    class NoTrunk(torch.nn.Module):
        base_model_prefix = "missing"

        @property
        def base_model(self) -> torch.nn.Module:
            return self

    with pytest.raises(ConfigError, match="NoTrunk.*no base model"):
        resolve_trunk(NoTrunk())


# ------------------------------------------------------------------------------------------------ the load-time probe


def _decoder_config(family: str, vocab: int) -> Any:
    import transformers

    common = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,
    }
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":  # PROMPTS[0] + 5 new tokens run past the window
        return transformers.MistralConfig(sliding_window=8, **common)
    if family == "gemma2":
        return transformers.Gemma2Config(
            head_dim=16, sliding_window=8, final_logit_softcapping=3.0, attn_logit_softcapping=5.0, **common
        )
    if family == "llama4":
        return llama4_config(vocab)
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "llama4"])
def test_decoder_only_lms_pass_the_probe_and_decode_like_their_own_forward(
    tok: ChatTokenizer, tmp_path: Path, family: str
) -> None:
    d = _save(tmp_path, _decoder_config(family, tok.n_vocab))
    lm = load_lm(make_cfg(**{"model.name_or_path": str(d)}).model, tok).eval()
    result = GenerationEngine(lm, tok, precision="fp32").generate(
        PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.0)
    )
    assert result.tokens == [_reference_greedy(lm, p, 5, tok.n_vocab) for p in PROMPTS]


def _refused_config(family: str, vocab: int) -> Any:
    import transformers

    if family == "mamba":
        return transformers.MambaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, initializer_range=0.2)
    if family == "roberta-decoder":
        return transformers.RobertaConfig(
            vocab_size=vocab,
            is_decoder=True,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=130,
        )
    if family == "bart":  # BartForCausalLM: the decoder of an encoder-decoder, positions from the cache
        return transformers.BartConfig(
            vocab_size=vocab,
            d_model=64,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=128,
            init_std=0.2,
        )
    raise AssertionError(family)


@pytest.mark.parametrize(
    ("family", "arch", "what"),
    [
        # the state-space step broadcast the (B, L) padding mask into L copies of the step: wrong from token 2
        ("mamba", "MambaForCausalLM", "its cached decoding with padding masks differs"),
        # the prediction head is dense + act + LayerNorm + decoder; rlchat would apply only the decoder
        ("roberta-decoder", "RobertaForCausalLM", "this model's LM head is more than that"),
        # positions come from the cache / input length, not rlchat's position ids: a left-padded row is shifted
        ("bart", "BartForCausalLM", "padded row"),
    ],
)
def test_models_rlchat_would_run_wrongly_are_refused_at_load(
    tok: ChatTokenizer, tmp_path: Path, family: str, arch: str, what: str
) -> None:
    d = _save(tmp_path, _refused_config(family, tok.n_vocab))
    with pytest.raises(ConfigError) as e:
        load_lm(make_cfg(**{"model.name_or_path": str(d)}).model, tok)
    msg = str(e.value)
    assert arch in msg and what in msg, msg
    assert str(d) in msg and "decoder-only causal LM such as Llama" in msg


def test_the_probe_does_not_run_for_rlchats_own_tiny_models(
    tok: ChatTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlchat.core.model as model_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed a built-in tiny model")

    monkeypatch.setattr(model_module, "check_model_computation", refuse)
    for arch in ("gpt2", "llama", "qwen2"):
        assert load_lm(make_cfg(**{"model.arch": arch}).model, tok) is not None
