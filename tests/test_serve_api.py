"""What real OpenAI clients send (issue #13): accepted no-op / null fields, ignored unknown keys (strict mode refuses
them), logprobs, penalties, logit_bias, /v1/completions, the published request schemas (and a bounded schemathesis
fuzz of them: no 5xx), the API-key sources, hidden paths, feedback limits and CORS.

Pure pieces run in-process; the rest against the session's shared Serve app (serve.testing.shared_app).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import requests

from rlchat.config import Config
from rlchat.errors import ConfigError
from rlchat.generation import GenerationEngine, SamplingParams
from rlchat.model import PolicyValueModel
from rlchat.tokenizer import ChatTokenizer
from serve import testing
from serve.schemas import IGNORED_FIELDS_HEADER, APIError, parse_chat_request, parse_completion_request
from serve.settings import exposure_warning, is_loopback, resolve_api_key

VOCAB = 4096
USER = [{"role": "user", "content": "hi"}]

# What the OpenAI SDKs, LangChain-style wrappers and chat UIs send with features they do not use.
CLIENT_DEFAULTS = {
    "tools": None,
    "tool_choice": "none",
    "functions": None,
    "function_call": None,
    "store": False,
    "parallel_tool_calls": False,
    "response_format": {"type": "text"},
    "metadata": {"session": "abc"},
    "user": "u-1",
    "service_tier": "auto",
    "modalities": ["text"],
    "audio": None,
    "prediction": None,
    "reasoning_effort": None,
    "n": None,
    "stream": False,
    "stream_options": None,
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
    "logprobs": False,
    "top_logprobs": None,
}
ECHOED_HISTORY = [
    {"role": "system", "content": "be brief", "name": "sys"},
    {"role": "user", "content": "hello", "name": "alice"},
    {"role": "assistant", "content": "hi!", "refusal": None, "tool_calls": None, "function_call": None, "audio": None},
    {"role": "assistant", "content": None, "refusal": "I can't"},
    {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
]


@pytest.fixture(scope="module")
def engine() -> GenerationEngine:
    tok = ChatTokenizer("cl100k_base", VOCAB)
    cfg = Config().replace(
        **{"tokenizer.vocab_size": VOCAB, "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2}
    )
    return GenerationEngine(PolicyValueModel.build(cfg, tok).eval(), tok, precision="fp32")


@pytest.fixture(scope="session")
def app(ray_local, tmp_path_factory) -> testing.TestApp:
    a = testing.shared_app(tmp_path_factory.mktemp("serve_app"))
    yield a
    testing.shutdown()


def _auth(app: testing.TestApp) -> dict[str, str]:
    return {"Authorization": f"Bearer {app.api_key}"}


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------


def test_client_defaults_and_echoed_messages_are_accepted_as_absent():
    req, ignored = parse_chat_request(json.dumps({"messages": ECHOED_HISTORY, **CLIENT_DEFAULTS}).encode())
    assert ignored == []
    assert [m.as_message()["content"] for m in req.messages] == ["be brief", "hello", "hi!", "I can't", "and now?"]
    assert req.choices() == 1 and not req.stream and req.bias() == ()


def test_unknown_fields_are_ignored_and_named_unless_strict():
    body = json.dumps({"messages": [{"role": "user", "content": "x", "colour": 1}], "frobnicate": True}).encode()
    _, ignored = parse_chat_request(body)
    assert ignored == ["frobnicate", "messages[0].colour"]
    with pytest.raises(APIError) as info:
        parse_chat_request(body, strict=True)
    assert info.value.code == "unrecognized_parameter" and info.value.param == "frobnicate"


def test_strict_mode_knows_every_field_the_openai_sdk_can_send():
    """``serve.strict_requests`` refuses keys "OpenAI does not define (typos)": it refused fields the installed SDK
    defines (``safety_identifier``, which OpenAI now asks for instead of ``user``; ``stream_options.
    include_obfuscation``; the prompt-cache keys). Every key of the SDK's request types must be a declared field
    (so this test fails when an upgraded ``openai`` SDK adds one: declare it, as a no-op or a 400 naming it)."""
    from openai.types import completion_create_params as text_params
    from openai.types.chat import ChatCompletionStreamOptionsParam
    from openai.types.chat import completion_create_params as chat_params

    from serve.schemas import ChatCompletionRequest, CompletionRequest, StreamOptions

    def sdk_keys(td: type) -> set[str]:
        return {k for klass in td.__mro__ for k in getattr(klass, "__annotations__", {})}

    pairs = [
        (chat_params.CompletionCreateParamsBase, ChatCompletionRequest),
        (text_params.CompletionCreateParamsBase, CompletionRequest),
        (ChatCompletionStreamOptionsParam, StreamOptions),
    ]
    for sdk, ours in pairs:
        assert sdk_keys(sdk) <= set(ours.model_fields), (ours.__name__, sorted(sdk_keys(sdk) - set(ours.model_fields)))
    sent = {
        "messages": [{"role": "user", "content": "hi"}],
        "safety_identifier": "user-123",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "prompt_cache_options": {"ttl": "30m"},
        "verbosity": "medium",
        "moderation": None,
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }
    req, ignored = parse_chat_request(json.dumps(sent).encode(), strict=True)
    req.check()
    assert ignored == [] and req.include_usage()
    parse_chat_request(json.dumps({**sent, "verbosity": "low", "moderation": {}}).encode())[0].check()  # hints
    with pytest.raises(APIError) as info:  # asked to moderate: refused, not silently skipped
        parse_chat_request(json.dumps({**sent, "moderation": {"input": True}}).encode())[0].check()
    assert info.value.status == 400 and info.value.param == "moderation"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}, "messages[0].role"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls"),
    ],
)
def test_truly_unsupported_requests_name_the_field_and_the_alternative(extra, param):
    with pytest.raises(APIError) as info:
        parse_chat_request(json.dumps({"messages": USER, **extra}).encode())
    e = info.value
    assert e.status == 400 and e.param == param and e.code == "unsupported_parameter"
    assert any(w in e.message for w in ("instead", "yourself", "leave it out", "send"))


def test_completion_request_parsing():
    req, _ = parse_completion_request(b'{"prompt": ["Once upon"], "max_tokens": 5, "logprobs": 2, "echo": false}')
    assert req.text() == "Once upon" and req.logprobs == 2 and req.token_ids() is None
    # token ids, as OpenAI's API and evaluation harnesses send them: one prompt, flat or in a list of one
    for body in (b'{"prompt": [40, 1097, 0]}', b'{"prompt": [[40, 1097, 0]]}'):
        assert parse_completion_request(body)[0].token_ids() == [40, 1097, 0]
    for bad, param in (
        (b'{"prompt": ["a", "b"]}', "prompt"),
        (b'{"prompt": [[1], [2]]}', "prompt"),
        (b'{"prompt": []}', "prompt"),
        (b'{"prompt": [[]]}', "prompt"),
        (b'{"prompt": [-1]}', "prompt"),
        (b'{"prompt": "a", "echo": true}', "echo"),
    ):
        with pytest.raises(APIError) as info:
            parse_completion_request(bad)
        assert info.value.param == param


@pytest.mark.parametrize("split", [1, 2, 5])
def test_completion_logprob_offsets_run_on_across_stream_chunks_and_count_decoded_text(split):
    """``text_offset`` is where each token's text starts in the completion: a streamed reply's chunks continue the
    offsets of the ones before (they restarted at 0), and a character split over two tokens counts once, whole."""
    from serve.formats import CompletionFormat

    tok = ChatTokenizer("cl100k_base")
    text = "Tokyo 東京 is 日本's capital"
    tokens = tok.encode(text)
    assert len(tokens) > len(text.split())  # several tokens, some of them halves of a character
    alts = [(-0.5, [t], [-0.5]) for t in tokens]
    whole = CompletionFormat("cmpl-1", 0, "m", tok, logprobs=True).choice(0, text, "length", tokens, alts)
    offsets = whole.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    # each offset is the length of the whole characters the tokens before it make
    assert offsets == [len(tok.decode(tokens[:k]).rstrip("\ufffd")) for k in range(len(tokens))]
    fmt = CompletionFormat("cmpl-1", 0, "m", tok, logprobs=True)
    streamed = []
    for a in range(0, len(tokens), split):
        chunk = json.loads(fmt.delta_chunk(0, "", tokens[a : a + split], alts[a : a + split]))
        streamed += chunk["choices"][0]["logprobs"]["text_offset"]
    assert streamed == offsets


def test_a_streamed_chat_chunk_with_logprobs_is_the_models_json_written_directly():
    """A streamed chunk with log-probs is written without building pydantic objects (one request with ``n=16`` and
    ``top_logprobs: 20`` built ~84,000 of them on the replica's event loop: ~0.5 s that every other stream waited);
    it must parse to exactly what the response model gives: special tokens without bytes, a character split over
    two tokens, log-probs that arrive as numpy floats."""
    import numpy as np

    from serve.formats import ChatFormat, ChunkChoice, Delta, _chunk

    tok = ChatTokenizer("cl100k_base")
    tokens = [*tok.encode('東京 "quoted" \\ tab\t'), tok.eot_id]
    alts = [
        (np.float32(-0.25 * k), [t, tok.eot_id, 1], [np.float32(-0.25 * k), np.float32(-3.5), -7.0])
        for k, t in enumerate(tokens)
    ]
    fmt = ChatFormat("chatcmpl-1", 7, "rlchat", tok, logprobs=True)
    for i, (a, b) in enumerate([(0, 2), (2, 5), (5, len(tokens))]):
        direct = json.loads(fmt.delta_chunk(i, "t\u00e9xt", tokens[a:b], alts[a:b]))
        choice = ChunkChoice(index=i, delta=Delta(content="t\u00e9xt"), logprobs=fmt._logprobs(tokens[a:b], alts[a:b]))
        assert direct == json.loads(_chunk("chatcmpl-1", 7, "rlchat", [choice])), (a, b)


@pytest.mark.parametrize("logprobs", [True, False])
def test_a_plain_chat_body_is_the_models_dump_with_log_probs_written_directly(logprobs):
    """A plain reply's body is the response model's dump, its log-probs built from the same cached JSON pieces as a
    stream's (one ``n=16``, ``top_logprobs: 20`` reply built ~84,000 pydantic objects on the event loop) and written
    once, as text (they were written, parsed back and encoded again)."""
    import numpy as np

    from serve.formats import ChatFormat
    from serve.schemas import AssistantMessage, ChatCompletion, Choice, Usage

    tok = ChatTokenizer("cl100k_base")
    tokens = [*tok.encode('東京 "quoted"'), tok.eot_id]
    alts = [(np.float32(-0.5 * k), [t, 1], [np.float32(-0.5 * k), -2.0]) for k, t in enumerate(tokens)]
    fmt = ChatFormat("chatcmpl-1", 7, "rlchat", tok, logprobs=logprobs)
    usage = Usage(prompt_tokens=3, completion_tokens=len(tokens), total_tokens=3 + len(tokens))
    cases = [(0, "東京", "stop", tokens, alts), (1, "", "content_filter", [], None)]
    got = json.loads(fmt.plain_body(cases, usage))
    expected = ChatCompletion(
        id="chatcmpl-1",
        created=7,
        model="rlchat",
        choices=[
            Choice(index=i, message=AssistantMessage(content=text), finish_reason=reason, logprobs=fmt._logprobs(t, a))
            for i, text, reason, t, a in cases
        ],
        usage=usage,
    ).model_dump()
    assert got == json.loads(json.dumps(expected))
    assert list(got) == list(expected) and list(got["choices"][0]) == list(expected["choices"][0])  # field order


def test_penalties_logit_bias_and_top_logprobs_in_the_engine(engine):
    tok = engine.tokenizer
    prompt = tok.render_prompt(USER)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    base = engine.generate([prompt], greedy, [1]).tokens[0]
    # frequency penalty: a greedy untrained model repeats itself; the penalty breaks the repetition
    pen = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, frequency_penalty=2.0), [1])
    assert len(set(pen.tokens[0])) > len(set(base)) or len(set(base)) == len(base)
    # logit_bias -100 bans the greedy first token
    banned = SamplingParams(max_new_tokens=3, temperature=0, logit_bias=((base[0], -100.0),))
    assert engine.generate([prompt], banned, [1]).tokens[0][0] != base[0]
    with pytest.raises(ConfigError):
        engine.generate([prompt], SamplingParams(max_new_tokens=2, logit_bias=((VOCAB + 5, 1.0),)), [1])
    # top_logprobs: the greedy token is the likeliest alternative, with the same log-prob
    steps = list(engine.steps([prompt], SamplingParams(max_new_tokens=4, temperature=0, top_logprobs=3), [1]))
    for out in steps:
        lp, ids, lps = out.alternatives[0]
        assert len(ids) == 3 and ids[0] == int(out.tokens[0]) and abs(lps[0] - lp) < 1e-5
        assert lps == sorted(lps, reverse=True) and all(v <= 0 for v in lps)


def test_api_key_sources_and_exposure_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("RLCHAT_API_KEY", "from-env")
    assert resolve_api_key("") == "from-env"  # serve_config.yaml's api_key: "" no longer blocks the env
    assert resolve_api_key("given") == "given"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key("", str(key_file)) == "from-file"
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_api_key("", str(tmp_path / "missing"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert exposure_warning("0.0.0.0", "") and exposure_warning("0.0.0.0", "k") is None
    assert exposure_warning("127.0.0.1", "") is None


def test_feedback_rate_limit_per_client_address(tmp_path):
    from rlchat.config import ServeConfig
    from serve.feedback import FeedbackRecorder

    recorder = FeedbackRecorder(ServeConfig(feedback_rate_limit=3, feedback_store=f"sqlite:///{tmp_path / 'f.db'}"))
    for _ in range(3):
        recorder.rate_limit("10.0.0.1")
    with pytest.raises(APIError) as info:
        recorder.rate_limit("10.0.0.1")
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    recorder.rate_limit("10.0.0.2")  # per address
    recorder.cfg = ServeConfig(feedback_rate_limit=0)
    for _ in range(10):
        recorder.rate_limit("10.0.0.1")  # 0 = no limit


def test_cors_middleware_is_off_by_default_and_allows_configured_origins():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    import serve.asgi as asgi

    inner = Starlette(routes=[Route("/x", lambda r: PlainTextResponse("ok"), methods=["GET", "POST"])])
    client = TestClient(asgi.CORSMiddleware(inner))
    old = asgi.CORS_ORIGINS[0]
    try:
        asgi.CORS_ORIGINS[0] = ()
        assert "access-control-allow-origin" not in client.get("/x", headers={"Origin": "https://a.example"}).headers
        asgi.CORS_ORIGINS[0] = ("https://a.example",)
        r = client.get("/x", headers={"Origin": "https://a.example"})
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        assert "X-RLChat-Dropped-Turns" in r.headers["access-control-expose-headers"]
        assert "access-control-allow-origin" not in client.get("/x", headers={"Origin": "https://b.example"}).headers
        pre = client.options("/x", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204 and "Authorization" in pre.headers["access-control-allow-headers"]
        # the official JavaScript SDK sends x-stainless-* headers on every request (and clients may send their own
        # X-Request-Id): a preflight that leaves them out makes the browser refuse every request
        asked = "authorization,content-type,x-stainless-os,x-stainless-retry-count,x-request-id"
        pre = client.options(
            "/x",
            headers={
                "Origin": "https://a.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": asked,
            },
        )
        allowed = {h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")}
        assert pre.status_code == 204 and set(asked.split(",")) <= allowed, allowed
        assert "access-control-request-headers" in pre.headers["vary"].lower()
    finally:
        asgi.CORS_ORIGINS[0] = old


# --------------------------------------------------------------------------------------------------------------
# Over HTTP, against the shared app
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_openai_client_with_every_accepted_field(app):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=app.url + "/v1", api_key=app.api_key, max_retries=0, timeout=120)
    fields = {k: v for k, v in CLIENT_DEFAULTS.items() if k not in ("stream", "stream_options", "n")}
    fields.update(
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"100": -100}, logprobs=True, top_logprobs=2, seed=4
    )
    r = client.chat.completions.create(model="rlchat", messages=ECHOED_HISTORY, max_tokens=6, **fields)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert choice.logprobs is not None and 1 <= len(choice.logprobs.content) <= 6
    first = choice.logprobs.content[0]
    assert (
        len(first.top_logprobs) == 2 and first.logprob <= 0 and all(t.token != "100" for t in choice.logprobs.content)
    )
    # streamed, same seed: the same text and the same log-probs
    stream = client.chat.completions.create(
        model="rlchat",
        messages=ECHOED_HISTORY,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        **fields,
    )
    text, lps = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            lps += [t.logprob for t in (c.logprobs.content if c.logprobs and c.logprobs.content else [])]
    assert text == choice.message.content
    assert lps == pytest.approx([t.logprob for t in choice.logprobs.content], abs=1e-4)
    # unknown keys: accepted, named in the header
    raw = client.chat.completions.with_raw_response.create(
        model="rlchat", messages=USER, max_tokens=2, extra_body={"frobnicate": 1}
    )
    assert raw.headers[IGNORED_FIELDS_HEADER] == "frobnicate"
    # legacy completions
    c = client.completions.create(model="rlchat", prompt="Once upon a time", max_tokens=5, logprobs=2, seed=1)
    assert c.choices[0].finish_reason in ("stop", "length") and len(c.choices[0].logprobs.tokens) <= 5
    pieces = [
        ch.choices[0].text
        for ch in client.completions.create(
            model="rlchat", prompt="Once upon a time", max_tokens=5, seed=1, stream=True
        )
        if ch.choices
    ]
    assert "".join(pieces) == c.choices[0].text
    # the same prompt as token ids: the same completion; ids outside the vocabulary are a 400 naming the prompt
    ids = ChatTokenizer("cl100k_base", VOCAB).encode("Once upon a time")
    by_ids = client.completions.create(model="rlchat", prompt=ids, max_tokens=5, logprobs=2, seed=1)
    assert by_ids.choices[0].text == c.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="rlchat", prompt=[[5, VOCAB + 7]], max_tokens=2)
    assert info.value.body["param"] == "prompt" and str(VOCAB + 7) in info.value.body["message"]
    # a one-token prompt is a prefill of its own (it was a 500 when the one-token decode step took it)
    one = client.completions.create(model="rlchat", prompt="The", max_tokens=3, seed=1)
    assert one.usage.prompt_tokens == 1 and one.usage.completion_tokens >= 1


@pytest.mark.slow
def test_openapi_publishes_request_bodies_and_paths_need_the_key(app):
    spec = requests.get(app.url + "/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/feedback"):
        assert "requestBody" in spec["paths"][path]["post"], path
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "logprobs", "logit_bias", "tools", "response_format", "store"} <= set(props)
    anon = requests.get(app.url + "/readyz", timeout=30).json()
    assert "pid" not in anon and not anon["checkpoint"].startswith("/")
    full = requests.get(app.url + "/readyz", headers=_auth(app), timeout=30).json()
    assert full["checkpoint"] == str(app.checkpoint) and isinstance(full["pid"], int)
    card = requests.get(app.url + "/v1/models", headers=_auth(app), timeout=30).json()["data"][0]
    assert card["max_tokens"] == 64 and card["max_model_len"] == 256
    big = {"completion_id": "x", "rating": "up", "messages": USER, "content": "a" * 32001}
    r = requests.post(app.url + "/v1/feedback", json=big, headers=_auth(app), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_characters"


def test_the_fuzzed_overflowing_penalty_is_answered(app):
    """The request the schema fuzz turned into a 500 (a repetition penalty of 5e-324 made a logit +inf, the sampler
    nan), replayed on both routes, plain and streamed, with a tiny temperature too: 200s with text."""
    for route, body in (
        ("/v1/completions", {"prompt": " q<k t u", "repetition_penalty": 5e-324, "echo": None}),
        ("/v1/chat/completions", {"messages": USER, "repetition_penalty": 5e-324, "temperature": 1e-45}),
    ):
        for stream in (False, True):
            r = requests.post(
                app.url + route, json={**body, "max_tokens": 8, "stream": stream}, headers=_auth(app), timeout=60
            )
            assert r.status_code == 200, (route, stream, r.text[:300])
            assert r.text.strip()


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(app):
    """Bounded fuzz of every operation from /openapi.json: no 5xx (25 examples per operation, 2 s deadline)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    spec = requests.get(app.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    session = requests.Session()
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() == "POST" and op.path == "/v1/feedback":
            continue  # rate-limited (429 is expected under a fuzz); its body parser is fuzzed through the others

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def run(case):
            resp = case.call(base_url=app.url, session=session, headers=_auth(app), timeout=60)
            if resp.status_code >= 500:
                failures.append((case.method, case.path, resp.status_code, resp.text[:300], case.body))

        run()
    assert not failures, failures[:3]


@pytest.mark.slow
def test_an_app_without_a_key_strict_and_with_cors(app, monkeypatch):
    """A second app on the same Serve instance: no API key (loopback clients see paths), serve.strict_requests and
    serve.cors_origins, checked over real HTTP through Serve's proxy."""
    from ray import serve as ray_serve

    monkeypatch.delenv("RLCHAT_API_KEY", raising=False)
    name = "open-strict"
    base = testing.deploy(
        app.checkpoint,
        name=name,
        route_prefix=f"/{name}",
        api_key="",
        num_cpus=0,
        max_tokens=1000,  # beyond the model's 256 positions
        strict_requests=True,
        cors_origins=["http://ui.example"],
        feedback_store=app.feedback_store,
    )
    try:
        ready = requests.get(base + "/readyz", timeout=30).json()
        assert ready["checkpoint"] == str(app.checkpoint) and "pid" in ready  # this machine, no key configured
        # the advertised limit is one a reply can reach: serve.max_tokens (1000), cut to what the context leaves
        # after the shortest chat prompt; one token more is refused quoting that same number
        card = requests.get(base + "/v1/models", timeout=30).json()["data"][0]
        shortest = len(ChatTokenizer("cl100k_base", VOCAB).render_prompt([{"role": "user", "content": "x"}]))
        limit = 256 - shortest
        assert (card["max_model_len"], card["max_tokens"]) == (256, limit)
        one = [{"role": "user", "content": "x"}]
        url = base + "/v1/chat/completions"
        r = requests.post(url, json={"messages": one, "max_tokens": limit, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        r = requests.post(url, json={"messages": one, "max_tokens": limit + 1}, timeout=60)
        assert r.status_code == 400 and f"limit of {limit}" in r.json()["error"]["message"], r.text
        r = requests.post(base + "/v1/chat/completions", json={"messages": USER, "colour": 1}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unrecognized_parameter"
        ok = requests.post(
            base + "/v1/chat/completions",
            json={"messages": USER, "max_tokens": 2, **CLIENT_DEFAULTS},
            headers={"Origin": "http://ui.example"},
            timeout=60,
        )
        assert ok.status_code == 200, ok.text
        assert ok.headers["access-control-allow-origin"] == "http://ui.example"
        pre = requests.options(
            base + "/v1/chat/completions",
            headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"},
            timeout=30,
        )
        assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
        other = requests.get(base + "/healthz", headers={"Origin": "http://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in other.headers
    finally:
        ray_serve.delete(name)


@pytest.mark.parametrize("case", ["complete", "chunked past the limit", "stalls", "client leaves"])
def test_the_body_is_read_in_chunks_within_the_body_timeout(case):
    """``ChatServer._body`` on a real Starlette request fed by an ASGI ``receive``: a body in chunks is joined;
    one past the size limit is refused (413) when that chunk arrives, not after the rest; one that stalls is cut
    off at ``serve.body_timeout_s`` (408); a client that leaves mid-body is a 499 (logged and counted by the route
    like any refusal: it used to escape as a bare ``ClientDisconnect``, neither logged nor counted)."""
    import asyncio
    import time
    from types import SimpleNamespace

    from starlette.requests import Request

    from rlchat.config import ServeConfig
    from serve.app import ChatServer

    cfg = ServeConfig(max_chars=1000, body_timeout_s=0.5)  # limit: 4 * 1000 + 65536 bytes
    piece = b" " * 30_000
    messages = {
        "complete": [piece, piece, b"{}"],
        "chunked past the limit": [piece] * 3 + [None],  # None: the client would go on sending (never asked for)
        "stalls": [piece, "stall"],
        "client leaves": [piece, "leave"],
    }[case]
    asked = []

    async def receive() -> dict:
        item = messages[len(asked)]
        asked.append(item)
        if item is None:
            raise AssertionError("a chunk past the limit was asked for")
        if item == "stall":
            await asyncio.sleep(30)
        if item == "leave":
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": item, "more_body": len(asked) < len(messages)}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    request = Request(scope, receive)
    server = SimpleNamespace(cfg=cfg)
    t0 = time.monotonic()
    if case == "complete":
        assert asyncio.run(ChatServer.func_or_class._body(server, request)) == piece + piece + b"{}"
        return
    with pytest.raises(APIError) as e:
        asyncio.run(ChatServer.func_or_class._body(server, request))
    status, code = {
        "chunked past the limit": (413, "body_too_large"),
        "stalls": (408, "request_timeout"),
        "client leaves": (499, "client_disconnected"),
    }[case]
    assert (e.value.status, e.value.code) == (status, code), e.value
    assert time.monotonic() - t0 < 5


def test_a_stream_still_queued_at_its_deadline_is_a_503_before_its_response_starts(tmp_path):
    """A streamed request still waiting for the batch at its deadline (``serve.request_timeout_s``) was answered
    200 with the 503 ``queue_timeout`` in-band, as an error chunk after the role chunk: the ``openai`` SDK then
    raised a status-less ``APIError`` and never retried. The response now starts once the job has its first item,
    so the refusal is a real 503 (``Retry-After`` from the error handler), as for a plain request.

    In process (the replica class without Ray Serve), batch 1 with a 0.4 s step: a long reply runs past its 1 s
    deadline to the end of the step that notices it (1.2 s), and a stream sent 0.05 s after it is still queued at its
    own (1.05 s; the margin takes 0.15 s of scheduling delay)."""
    import asyncio
    import dataclasses

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=512)
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 400,
        "logit_bias": {str(ChatTokenizer("cl100k_base", 4096).eot_id): -100},  # no early end
    }

    async def main() -> None:
        server = await testing.inprocess_server(
            ckpt, engine_process=False, max_batch_size=1, batch_wait_timeout_s=0.0, request_timeout_s=1.0
        )
        try:
            testing.slow_steps(server, 0.4)
            route = "/v1/chat/completions"
            long = asyncio.create_task(server.chat_completions(testing.post_request(route, body)))
            await asyncio.sleep(0.05)
            with pytest.raises(APIError) as refused:
                await server.chat_completions(testing.post_request(route, {**body, "stream": True}))
            assert (refused.value.status, refused.value.code) == (503, "queue_timeout")
            answered = await long
            assert answered.status_code == 200
            assert json.loads(answered.body)["choices"][0]["finish_reason"] == "length"
            assert server.metrics.snapshot()["rejected"] == {"queue_timeout": 1}

            # a stream whose client leaves while it waits is a 499, gives its place back and never generates: with
            # no deadline it would have joined once the reply ahead of it ended
            server.cfg = server.admission.cfg = dataclasses.replace(server.cfg, request_timeout_s=0.0)
            ahead = {**body, "max_tokens": 4}
            long = asyncio.create_task(server.chat_completions(testing.post_request(route, ahead)))
            await asyncio.sleep(0.05)
            tokens_before = server.metrics.snapshot()["generated_tokens"]
            gone = await server.chat_completions(testing.post_request(route, {**body, "stream": True}, leaves=True))
            assert gone.status_code == 499
            assert json.loads((await long).body)["usage"]["completion_tokens"] == 4
            assert server.admission.waiting == {}  # the refused and the gone stream gave their places back
            await asyncio.sleep(1.0)  # two more steps: a stream that joined would have its first tokens by now
            assert server.metrics.snapshot()["generated_tokens"] - tokens_before == 4, "the stream's rows generated"

            # a stream that gets its place is a 200 stream as before
            short = {**body, "stream": True, "max_tokens": 2}
            reply = await server.chat_completions(testing.post_request(route, short))
            assert reply.status_code == 200 and reply.media_type == "text/event-stream"
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_running_requests_conversation_id_survives_thousands_of_refused_requests(tmp_path):
    """The conversation id (``X-RLChat-Conversation-Id``) was noted in a shared LRU of 2,048 entries before the
    request was authenticated, and only a recorded completion took its entry out: 2,048 refused requests (401s from
    anyone, 400s, 503s, clients gone) during a long reply evicted its id, its row was stored without it, and
    ``rlchat feedback delete CONVERSATION`` no longer found it. The id now travels with the request."""
    import asyncio
    import sqlite3
    import time

    from serve.app import CONVERSATION_HEADER

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=512)
    db = tmp_path / "feedback.db"
    route = "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    async def main() -> None:
        server = await testing.inprocess_server(
            ckpt, engine_process=False, api_key="k", feedback_store=f"sqlite:///{db}"
        )
        try:
            testing.slow_steps(server, 0.2)
            alice = {"Authorization": "Bearer k", CONVERSATION_HEADER: "alice-conv-1"}
            reply = asyncio.create_task(server.chat_completions(testing.post_request(route, body, alice)))
            await asyncio.sleep(0.05)
            for i in range(2100):
                with pytest.raises(APIError) as refused:
                    await server.chat_completions(testing.post_request(route, body, {CONVERSATION_HEADER: f"x{i}"}))
                assert refused.value.status == 401
            assert (await reply).status_code == 200
            until = time.monotonic() + 30
            rows: list[tuple[str, str]] = []
            while not rows and time.monotonic() < until:  # the store is written in the background
                await asyncio.sleep(0.1)
                with sqlite3.connect(db) as conn:
                    rows = conn.execute("SELECT request_id, conversation_id FROM rlchat_requests").fetchall()
            assert [conv for _, conv in rows] == ["alice-conv-1"], rows
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_stopped_replica_writes_the_request_rows_still_queued_for_the_store(tmp_path, monkeypatch):
    """Request rows are written to the feedback store in the background; when Serve stopped a replica (a rolling
    update, a scale-down) the rows still queued or being written died with its process. Serve calls the replica's
    ``__del__`` (its FastAPI ingress wrapper's: the ASGI app's shutdown, then ours) once its requests are done: it
    now waits (a bounded time) for those rows and stops the engines."""
    import asyncio
    import sqlite3
    import time

    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    db = tmp_path / "feedback.db"
    route = "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    asgi_shutdowns: list[bool] = []

    async def asgi_shutdown(self: object) -> None:  # the ASGI lifespan of an in-process server never started
        asgi_shutdowns.append(True)

    monkeypatch.setattr(ASGIAppReplicaWrapper, "__del__", asgi_shutdown)

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=True, feedback_store=f"sqlite:///{db}")
        store = server.feedback.store
        write = store.record_requests
        store.record_requests = lambda rows: (time.sleep(1.0), write(rows))[1]  # a slow database
        for _ in range(3):
            assert (await server.chat_completions(testing.post_request(route, body))).status_code == 200
        engine = server.models.default.scheduler
        await server.__del__()  # what Serve calls when it stops the replica
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT COUNT(*) FROM rlchat_requests").fetchone()[0]
        assert rows == 3
        assert server.models.default.closed
        assert engine.proc.wait(timeout=20) is not None  # the engine process exited
        assert asgi_shutdowns == [True]  # Serve's own shutdown of the ASGI app ran once

    asyncio.run(main())


def test_readyz_is_a_503_naming_the_version_whose_engine_died(tmp_path, no_replica_context):
    """``/readyz`` said ``"status": "ready"`` after a version's engine process had died, so a load balancer or
    Kubernetes probe kept sending traffic that got 500s until Serve's health check replaced the replica. It now
    answers 503 ``unhealthy`` naming the dead versions, as ``check_health`` does, and each version says ``alive``."""
    import asyncio
    import time

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=True)
        try:
            ready = await server.readyz(testing.post_request("/readyz", {}))
            assert ready.status_code == 200 and json.loads(ready.body)["status"] == "ready"
            assert [v["alive"] for v in json.loads(ready.body)["versions"]] == [True]
            server.models.default.scheduler.proc.kill()
            until = time.monotonic() + 30
            while server.models.default.alive and time.monotonic() < until:
                await asyncio.sleep(0.05)
            gone = await server.readyz(testing.post_request("/readyz", {}))
            body = json.loads(gone.body)
            assert gone.status_code == 503, body
            assert body["status"] == "unhealthy" and body["dead_versions"] == [server.models.default.name]
            assert [v["alive"] for v in body["versions"]] == [False]
            # new requests until Serve replaces the replica (a health check every 5 s, then a start): a 503 to
            # retry, not a 500 "generation failed" (a load balancer or SDK retries the one, reports the other)
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            for stream in (False, True):
                with pytest.raises(APIError) as refused:
                    await server.chat_completions(
                        testing.post_request("/v1/chat/completions", {**chat, "stream": stream})
                    )
                assert (refused.value.status, refused.value.code) == (503, "model_unavailable"), refused.value
        finally:
            server.models.default.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------------ found by the security review


def test_feedback_is_limited_like_chat_and_its_rate_limit_cannot_be_dodged_behind_haproxy(tmp_path):
    """``/v1/feedback`` took 4,999 prompt messages where chat allows ``serve.max_messages``; and behind
    ``serve.ingress: haproxy`` (which reaches the replica from loopback and adds no ``X-Forwarded-For``) uvicorn
    takes the client's own ``X-Forwarded-For`` as its address, so a new forged address per request was never
    rate-limited. Behind HAProxy every client now shares the ingress's limit, as docs/serving.md says."""
    import asyncio

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    user = {"role": "user", "content": "hi"}
    by_text = {"prompt": [user] * 5, "chosen": "a", "rejected": "b"}
    rating = {"completion_id": "chatcmpl-x", "rating": "up", "messages": [user] * 5, "content": "a"}

    async def main() -> None:
        server = await testing.inprocess_server(
            ckpt,
            engine_process=False,
            max_messages=4,
            feedback_rate_limit=2,
            feedback_store=f"sqlite:///{tmp_path / 'fb.db'}",
        )
        try:
            for i, body in enumerate((by_text, rating)):
                with pytest.raises(APIError) as refused:
                    await server.feedback_route(testing.post_request("/v1/feedback", body, client=f"10.0.0.{i}"))
                assert (refused.value.status, refused.value.code) == (400, "too_many_messages"), body
            server._behind_haproxy = True  # noqa: SLF001 - what active_ingress() says under serve.ingress: haproxy
            ok = {**by_text, "prompt": [user]}
            for i in range(2):  # uvicorn rewrote each client address from the request's own X-Forwarded-For
                await server.feedback_route(testing.post_request("/v1/feedback", ok, client=f"192.0.2.{i}"))
            with pytest.raises(APIError) as limited:
                await server.feedback_route(testing.post_request("/v1/feedback", ok, client="192.0.2.77"))
            assert limited.value.status == 429
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_conversation_chat_accepted_can_be_rated_with_its_text(tmp_path):
    """A rating may carry the conversation and the reply (so any replica can record it); ``serve.max_chars``
    bounds the conversation as it does a chat request's, and each reply text on its own, so a conversation at the
    chat limit can still be rated with its text. (Found by review: the limit applied to conversation + reply,
    a 400 for exactly the conversations chat had accepted near the limit.)"""
    import asyncio

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    messages = [{"role": "user", "content": "word " * 40}]  # 200 characters: the limit below

    async def main() -> None:
        server = await testing.inprocess_server(
            ckpt, engine_process=False, max_chars=200, max_tokens=8, feedback_store=f"sqlite:///{tmp_path / 'f.db'}"
        )
        try:
            chat = {"messages": messages, "max_tokens": 8, "seed": 1}
            reply = json.loads(
                (await server.chat_completions(testing.post_request("/v1/chat/completions", chat))).body
            )
            text = reply["choices"][0]["message"]["content"]
            assert text
            rating = {"completion_id": reply["id"], "rating": "up", "messages": messages, "content": text}
            answer = await server.feedback_route(testing.post_request("/v1/feedback", rating, client="10.0.0.1"))
            assert answer["recorded"] is True
            for body in (
                {**rating, "completion_id": "chatcmpl-other", "content": "a" * 201},  # a reply over the limit
                {**rating, "completion_id": "chatcmpl-other", "messages": [{"role": "user", "content": "a" * 201}]},
                {"prompt": messages, "chosen": "a" * 201, "rejected": "b"},
            ):
                with pytest.raises(APIError) as refused:
                    await server.feedback_route(testing.post_request("/v1/feedback", body, client="10.0.0.2"))
                assert (refused.value.status, refused.value.code) == (400, "too_many_characters"), body
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_what_clients_send_cannot_forge_log_lines_or_bloat_errors(tmp_path, caplog):
    """An unknown field's name was logged as sent, so a name holding a newline wrote a forged log line; a 404
    ``model_not_found`` echoed the whole ``model`` value (up to the body limit)."""
    import asyncio
    import logging

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    forged = "x\nINFO 2026-01-01 00:00:00,000 serve 1 -- chat id=chatcmpl-FORGED status=200"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, forged: 1, "y" * 5000: 1}

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=False)
        try:
            with caplog.at_level(logging.INFO, logger="ray.serve.rlchat"):
                reply = await server.chat_completions(testing.post_request("/v1/chat/completions", body))
            assert reply.status_code == 200
            logged = [r.getMessage() for r in caplog.records if "ignored unknown request fields" in r.getMessage()]
            assert len(logged) == 1 and "\n" not in logged[0] and len(logged[0]) < 1200, logged
            with pytest.raises(APIError) as missing:
                await server.chat_completions(
                    testing.post_request("/v1/chat/completions", {**body, "model": "m" * 100_000})
                )
            assert missing.value.status == 404 and len(str(missing.value)) < 1000
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_plain_reply_with_many_log_probs_does_not_stall_the_event_loop(tmp_path):
    """A 243-byte request (``n=16``, ``top_logprobs: 20``, long replies) returned ~12 MB built on the replica's
    event loop (the log-probs' JSON written, parsed back, then encoded again): every other request and health check
    waited ~2 s. The body is now written once, off the event loop; it is the same JSON.

    Then CI saw a 0.62 s stall with the body off the loop: the reply's ~300,000 new objects set off a full garbage
    collection, which walked the whole heap of the replica (torch, transformers, Ray: 0.27 s unloaded) holding the
    GIL. The replica now freezes its start-up heap (``serve/heap.py``), so a collection walks only young objects."""
    import asyncio
    import gc
    import time

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=512)
    eot = ChatTokenizer("cl100k_base", 4096).eot_id
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 400,
        "n": 16,
        "logprobs": True,
        "top_logprobs": 20,
        "logit_bias": {str(eot): -100},  # no early end
        "seed": 3,
    }
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=True)
        pauses: list[float] = []  # this process's full collections while the request runs
        started: list[float] = []

        def timed(phase: str, info: dict) -> None:
            if info["generation"] == 2:
                if phase == "start":
                    started.append(time.perf_counter())
                else:
                    pauses.append(time.perf_counter() - started.pop())

        gc.callbacks.append(timed)
        try:
            stop = asyncio.Event()
            tick = asyncio.create_task(ticker(stop))
            reply = await server.chat_completions(testing.post_request("/v1/chat/completions", body))
            stop.set()
            await tick
        finally:
            gc.callbacks.remove(timed)
            server.models.default.close()
        assert max(pauses, default=0.0) < 0.1, f"full garbage collections of {pauses} s held the GIL"
        assert reply.status_code == 200
        out = json.loads(reply.body)
        assert len(reply.body) > 2_000_000 and len(out["choices"]) == 16
        for choice in out["choices"]:
            content = choice["logprobs"]["content"]
            assert len(content) == 400 and all(len(e["top_logprobs"]) == 20 for e in content)
            replied = bytes(b for e in content for b in e["bytes"] or []).decode("utf-8", errors="replace")
            assert choice["message"]["content"] == replied
        assert max(gaps) < 0.5, f"the event loop stalled {max(gaps):.2f} s"

    asyncio.run(main())


# ------------------------------------------------------------------------------------ found by the operator review


def test_a_burst_up_to_a_full_batch_plus_the_queue_is_admitted_and_the_next_is_refused(tmp_path):
    """Admission counted every request without its first token as waiting, including those the batch takes at
    once: from idle, a burst of ``serve.max_queued_requests`` + 1 was refused though a batch of 16 stood empty. The
    bound is now on requests beyond a full batch: running + queued <= ``max_batch_size`` + ``max_queued_requests``."""
    import asyncio

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    route = "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    async def main() -> None:
        server = await testing.inprocess_server(
            ckpt, engine_process=False, max_batch_size=4, max_queued_requests=2, batch_wait_timeout_s=0.0
        )
        try:
            testing.slow_steps(server, 0.1)
            burst = [server.chat_completions(testing.post_request(route, body)) for _ in range(6)]
            replies = await asyncio.gather(*burst, return_exceptions=True)
            assert [getattr(r, "status_code", r) for r in replies] == [200] * 6
            running = [
                asyncio.create_task(server.chat_completions(testing.post_request(route, body))) for _ in range(6)
            ]
            await asyncio.sleep(0.05)  # all six admitted: four decoding, two queued
            with pytest.raises(APIError) as refused:
                await server.chat_completions(testing.post_request(route, body))
            assert (refused.value.status, refused.value.code) == (503, "overloaded")
            assert [r.status_code for r in await asyncio.gather(*running)] == [200] * 6
            assert server.admission.waiting == {} and server.admission.generating == {}  # every place given back
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_request_whose_deadline_passes_as_it_joins_the_batch_is_a_503_not_an_empty_reply(engine):
    """A queued job taken into the batch at the step whose start passes its deadline ended with ``length`` and no
    token: a 200 with an empty reply, where a job still queued a moment earlier got a 503 ``queue_timeout``."""
    import time

    from serve.batching import BatchRun, DeadlineExceeded, GenerationJob

    run = BatchRun(engine, [])
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    late = GenerationJob((1, 2, 3), params, (0,), deadline=time.monotonic() + 0.05)
    on_time = GenerationJob((1, 2, 3), params, (1,), deadline=time.monotonic() + 60)
    jids = [run.add(late), run.add(on_time)]
    time.sleep(0.06)
    items = run.step_items()
    assert isinstance(items[jids[0]].done, DeadlineExceeded), items[jids[0]]
    assert len(items[jids[1]].tokens[0]) == 1 and items[jids[1]].done is None
    # a job past its deadline with tokens already sent ends with them, as before
    started = GenerationJob((1, 2, 3), params, (2,), deadline=time.monotonic() + 0.2)
    jid = run.add(started)
    assert len(run.step_items()[jid].tokens[0]) == 1
    time.sleep(0.21)
    done = run.step_items()[jid].done
    assert done.finish_reasons == ["length"] and len(done.tokens[0]) == 1


def test_the_queue_depth_gauge_is_reported_again_while_it_does_not_change(monkeypatch):
    """The queue-depth gauge was set only when the depth changed, and Ray's metrics agent drops a gauge series not
    reported within two export intervals: on an idle replica the documented 0 vanished from Prometheus ("No data"
    in the queue panel) 15-20 s after the last change. Each open version's gauge is now set again periodically; a
    closed version's is not."""
    import time

    import serve.metrics as serve_metrics

    monkeypatch.setattr(serve_metrics, "GAUGE_REFRESH_S", 0.3)
    metrics = serve_metrics.ServeMetrics("m")
    sets: list[tuple[float, str]] = []
    monkeypatch.setattr(
        metrics.queue_depth.metric, "set", lambda value, tags=None: sets.append((value, (tags or {})["version"]))
    )
    live, gone = metrics.for_version("live"), metrics.for_version("gone")
    live.on_queue(3)
    gone.close()
    time.sleep(1.2)
    assert sets.count((3, "live")) >= 3, sets  # once at the change, then again every GAUGE_REFRESH_S
    assert [s for s in sets if s[1] == "gone"] == [(0, "gone"), (0, "gone")], sets  # first seen, closed: no more


def test_a_stream_whose_response_never_starts_gives_its_place_back(tmp_path):
    """A stream holds its place from admission to its end, and its generator's ``finally`` gave it back: when the
    client is gone before the SSE response sends anything (its generator never starts), the place stayed taken
    until the stale sweep, and a wave of clients that gave up left the replica answering 503 ``overloaded``."""
    import asyncio

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=False)
        try:
            reply = await server.chat_completions(testing.post_request("/v1/chat/completions", body))
            assert reply.status_code == 200 and server.admission.generating  # it has its first token

            async def receive() -> dict:
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                raise OSError("the client's connection is gone")

            with pytest.raises(OSError):
                scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"spec_version": "2.4"}}
                await reply(scope, receive, send)
            assert server.admission.generating == {} and server.admission.waiting == {}
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_log_prob_of_minus_infinity_is_written_as_valid_json():
    """A token the sampler masked has log-prob -inf (with ``top_logprobs`` above the unmasked count): written as
    ``-Infinity``, which is not JSON -- a 500 while the body went through ``JSONResponse``, an unparsable 200 once it
    was written directly. It is written as OpenAI's floor, -9999.0."""
    from serve.formats import ChatFormat

    tok = ChatTokenizer("cl100k_base")
    tokens = tok.encode("hi")
    alts = [(-0.5, [tokens[0], 7, 8], [-0.5, float("-inf"), float("nan")])]
    fmt = ChatFormat("chatcmpl-1", 7, "rlchat", tok, logprobs=True)
    body = json.loads(fmt.plain_body([(0, "hi", "stop", tokens, alts)], _usage()), parse_constant=pytest.fail)
    top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["logprob"] for t in top] == [-0.5, -9999.0, -9999.0]
    chunk = json.loads(fmt.delta_chunk(0, "hi", tokens, alts), parse_constant=pytest.fail)
    assert [t["logprob"] for t in chunk["choices"][0]["logprobs"]["content"][0]["top_logprobs"]][1:] == [-9999.0] * 2


def test_the_log_prob_text_cache_lets_a_swapped_out_versions_tokenizer_go():
    """Streamed log-probs write each token's JSON from a cache. It was keyed by (tokenizer, token id) with room for
    131,072 entries, and every loaded version has a tokenizer of its own: each config update under log-prob traffic
    added a version's worth of new entries, which kept the swapped-out tokenizers alive (the replica grew ~1.2-1.6
    MB per update in ``bench/serve_soak.py --swap-every 20``, 470 -> 517 MB in 8 minutes). The entries now go with
    their tokenizer, and each token is written the same from a tokenizer equal to the first."""
    import gc
    import weakref

    from serve.formats import ChatFormat

    def chunk(tok: ChatTokenizer) -> dict[str, Any]:
        tokens = tok.encode("hello there")
        alts = [(-0.5, [t, 7, 8], [-0.5, -1.0, -2.0]) for t in tokens]
        fmt = ChatFormat("chatcmpl-1", 7, "rlchat", tok, logprobs=True)
        return json.loads(fmt.delta_chunk(0, "hello there", tokens, alts))["choices"][0]["logprobs"]

    first = ChatTokenizer("cl100k_base", 4096)
    written = chunk(first)
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None, "the cache keeps a swapped-out version's tokenizer"
    assert chunk(ChatTokenizer("cl100k_base", 4096)) == written


def _usage():
    from serve.schemas import Usage

    return Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)


def test_readyz_counts_refused_requests_apart_from_server_errors(tmp_path, no_replica_context):
    """``/readyz``'s ``stats.errors`` counted every request that did not get its reply: 400s, 404s and the 503s
    that shed load along with the server's own failures, so a healthy replica at 4x overload showed thousands of
    "errors" (the soak's 320 clients: ~47 refusals a second). Refusals are ``stats.refused`` now; ``errors`` counts
    the requests the server failed (500s)."""
    import asyncio

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def stats(server: Any) -> dict[str, int]:
        return json.loads((await server.readyz(testing.post_request("/readyz", {}))).body)["stats"]

    async def refused(server: Any, body: dict[str, Any]) -> int:
        with pytest.raises(APIError) as e:
            await server.chat_completions(testing.post_request("/v1/chat/completions", body))
        return e.value.status

    async def main() -> None:
        server = await testing.inprocess_server(
            ckpt, engine_process=False, max_batch_size=1, max_queued_requests=1, batch_wait_timeout_s=0.0
        )
        try:
            assert await refused(server, {"messages": []}) == 400
            assert await refused(server, {**chat, "model": "nope"}) == 404
            testing.slow_steps(server, 0.3)  # two requests hold the batch and the queue; a third is shed
            post = testing.post_request
            busy = [asyncio.ensure_future(server.chat_completions(post("/v1/chat/completions", chat))) for _ in "ab"]
            await asyncio.sleep(0.1)
            assert await refused(server, chat) == 503
            await asyncio.gather(*busy)
            assert (await stats(server))["errors"] == 0
            assert (await stats(server))["refused"] == 3
            batch = server.models.default.scheduler._run.batch  # noqa: SLF001

            def broken(*_: Any) -> Any:
                raise RuntimeError("a failed decoding step")

            batch.step = broken
            with pytest.raises(RuntimeError, match="failed decoding step"):
                await server.chat_completions(testing.post_request("/v1/chat/completions", chat))
            assert ((await stats(server))["errors"], (await stats(server))["refused"]) == (1, 3)
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_version_whose_engine_makes_no_progress_fails_the_health_check(tmp_path, no_replica_context):
    """A hung engine (a stopped or stuck engine process, a GPU that stops answering) kept the replica "ready": the
    health check only asked whether the engine process was alive, so Serve kept routing up to ``max_ongoing_requests``
    requests into it and none of them ever ended (their deadlines are applied by the steps that no longer ran). A
    version with requests in flight that hands nothing out for longer than any request may live now fails the health
    check and ``/readyz`` (``stalled_versions``); the check stops the hung engine process, so its requests get a 503
    to retry (not a 500 when Serve kills the replica) and its memory (a GPU's) is free for the replacement. An idle
    version is never stalled."""
    import asyncio
    import os
    import signal

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

    async def ready(server: Any) -> tuple[int, dict[str, Any]]:
        r = await server.readyz(testing.post_request("/readyz", {}))
        return r.status_code, json.loads(r.body)

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=True)
        from serve.settings import SHUTDOWN_MARGIN_S, request_lifetime_s

        assert server.stall_after_s == request_lifetime_s(server.cfg) + SHUTDOWN_MARGIN_S  # 80 s by default
        server.stall_after_s = 1.0
        engine = server.models.default.scheduler
        try:
            await server.chat_completions(testing.post_request("/v1/chat/completions", chat))
            await asyncio.sleep(1.5)  # idle for longer than the limit: not a stall
            server.check_health()
            assert (await ready(server))[0] == 200
            os.kill(engine.proc.pid, signal.SIGSTOP)  # the engine hangs
            post = testing.post_request
            hung = asyncio.ensure_future(server.chat_completions(post("/v1/chat/completions", chat)))
            await asyncio.sleep(0.5)
            server.check_health()  # within the limit
            await asyncio.sleep(0.7)
            status, body = await ready(server)
            assert status == 503 and body["status"] == "unhealthy", body
            assert body["stalled_versions"] == [server.models.default.name]
            with pytest.raises(RuntimeError, match="no progress"):
                server.check_health()
            with pytest.raises(APIError) as refused:  # a 503 to retry elsewhere, at once
                await asyncio.wait_for(hung, 10)
            assert (refused.value.status, refused.value.code) == (503, "model_unavailable"), refused.value
            assert "no progress" in str(refused.value)
            for _ in range(50):  # killed, not left behind holding the model
                if engine.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            assert engine.proc.returncode == -signal.SIGKILL
            with pytest.raises(RuntimeError, match="has stopped"):  # dead now: Serve replaces the replica
                server.check_health()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine.proc.pid, signal.SIGCONT)
            server.models.default.close()

    asyncio.run(main())


@pytest.mark.parametrize("interval", [0.0, 0.25])
def test_serve_stream_interval_sets_how_often_a_stream_sends_a_chunk(tmp_path, interval):
    """``serve.stream_interval_s``: a stream sends at most one SSE chunk per choice this often (the first text at
    once). Fewer, larger chunks cost fewer hops through Serve's proxy (bench/README.md: ~13% more tokens/s at 16
    clients on 2 cores with 0.1); the text is the same."""
    import asyncio
    import time

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)
    eot = ChatTokenizer("cl100k_base", 4096).eot_id
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 30,
        "stream": True,
        "seed": 5,
        "logit_bias": {str(eot): -100},  # no early end
    }

    async def main() -> tuple[list[float], str]:
        server = await testing.inprocess_server(ckpt, engine_process=False, stream_interval_s=interval)
        testing.slow_steps(server, 0.02)  # ~0.6 s of steps
        sent: list[tuple[float, bytes]] = []
        try:
            reply = await server.chat_completions(testing.post_request("/v1/chat/completions", body))

            async def receive() -> dict:
                await asyncio.Event().wait()  # the client stays
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                if message.get("body"):
                    sent.append((time.monotonic(), message["body"]))

            scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"spec_version": "2.4"}}
            await reply(scope, receive, send)
        finally:
            server.models.default.close()
        times, text = [], ""
        for at, raw in sent:
            for line in raw.decode().splitlines():
                if line.startswith("data: {"):
                    content = json.loads(line[6:])["choices"][0]["delta"].get("content") if "choices" in line else None
                    if content:
                        times.append(at)
                        text += content
        return times, text

    times, text = asyncio.run(main())
    gaps = [b - a for a, b in zip(times, times[1:])]
    if interval == 0.0:
        assert len(times) >= 20, len(times)  # about one chunk per token
    else:
        assert 2 <= len(times) <= 5, len(times)  # the first text at once, then one per 0.25 s of ~0.6 s
        assert min(gaps[:-1]) >= 0.2, gaps  # the last: the rest of the text, sent at the end
    assert len(text) > 20


def test_the_safety_filter_judges_a_streamed_reply_by_its_finished_text_as_a_plain_one(tmp_path):
    """The safety filter decides on a reply's finished text, streamed or not: a pattern that matches a stream's
    unfinished text but not the finished reply (``\\bsea\\b`` while the reply has only reached the "sea" of
    "seaside") withholds neither; a reply the pattern does flag is withheld in both, with the same content (the
    notice alone when nothing was sent) and the same usage. (Found by review: the stream judged its unfinished text
    after every token, withheld such a reply, ended its row there and billed fewer tokens than the plain reply.)"""
    import asyncio
    import re

    from serve.safety import WITHHELD_NOTICE

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=128)

    def body(seed: int, **extra) -> dict:
        return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "seed": seed, **extra}

    async def plain(server, b: dict) -> dict:
        return json.loads((await server.chat_completions(testing.post_request("/v1/chat/completions", b))).body)

    async def streamed(server, b: dict) -> tuple[str, str, dict]:
        reply = await server.chat_completions(
            testing.post_request(
                "/v1/chat/completions", {**b, "stream": True, "stream_options": {"include_usage": True}}
            )
        )
        data: list[str] = []

        async def receive() -> dict:
            await asyncio.Event().wait()  # the client stays
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            data.extend(x[6:] for x in message.get("body", b"").decode().splitlines() if x.startswith("data: {"))

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"spec_version": "2.4"}}
        await reply(scope, receive, send)
        chunks = [json.loads(d) for d in data]
        text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
        reason = next(
            c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
        )
        return text, reason, next(c["usage"] for c in chunks if c.get("usage"))

    async def a_word_cut_by_a_token() -> tuple[int, str, str]:
        """A seed, its reply, and a word's start that ends a token while the next token goes on with the word."""
        server = await testing.inprocess_server(ckpt, engine_process=False)
        try:
            for seed in range(40):
                r = await plain(server, body(seed, logprobs=True))
                pieces = [bytes(e["bytes"]) for e in r["choices"][0]["logprobs"]["content"]]
                text = r["choices"][0]["message"]["content"]
                for k in range(1, len(pieces)):
                    try:
                        before = b"".join(pieces[:k]).decode()
                    except UnicodeDecodeError:
                        continue
                    word = re.search(r"(?<![A-Za-z])[A-Za-z]{3,}$", before)
                    goes_on = re.match(r"[A-Za-z]", pieces[k].decode("latin-1"))  # the next token goes on with it
                    whole = word and re.search(rf"\b{word.group()}\b", text, re.IGNORECASE)  # a word of the reply
                    if word and len(before) < 60 and goes_on and not whole:
                        return seed, text, word.group()
        finally:
            server.models.default.close()
        raise AssertionError("no reply with a word split across tokens in 40 seeds")

    async def main() -> None:
        seed, text, part = await a_word_cut_by_a_token()
        for pattern, flagged in [(rf"\b{part}\b", False), (part, True)]:
            server = await testing.inprocess_server(
                ckpt, engine_process=False, safety_filter=True, **{"reward.safety_patterns": [pattern]}
            )
            try:
                p = await plain(server, body(seed))
                s_text, s_reason, s_usage = await streamed(server, body(seed))
            finally:
                server.models.default.close()
            p_choice = p["choices"][0]
            assert (p_choice["finish_reason"] == "content_filter") == flagged, (pattern, text)
            assert p_choice["message"]["content"] == (WITHHELD_NOTICE if flagged else text)
            assert (s_text, s_reason) == (p_choice["message"]["content"], p_choice["finish_reason"]), pattern
            assert s_usage == p["usage"], pattern

    asyncio.run(main())


def test_a_stream_whose_client_leaves_at_its_end_or_before_its_start_is_counted_and_its_reply_kept(tmp_path):
    """A streamed reply was recorded (for ratings by id) and counted only after its ``[DONE]`` was written: a client
    that closed once it had its ``finish_reason`` (the whole reply) left it uncounted in every response metric and
    unratable (404 by its id). A stream whose client left before its first event was not counted either (its
    generator never ran)."""
    import asyncio
    import re

    from serve.schemas import APIError

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=512)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    route = "/v1/chat/completions"

    async def main() -> None:
        server = await testing.inprocess_server(
            ckpt, engine_process=False, feedback_store=f"sqlite:///{tmp_path / 'fb.db'}"
        )
        try:
            # 1. the client leaves as soon as the chunk with finish_reason is on the wire
            req = testing.post_request(route, body)
            resp = await server.chat_completions(req)
            cid = resp.headers["x-rlchat-completion-id"]
            gone = asyncio.Event()

            async def receive() -> dict:
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                if re.search(rb'"finish_reason": ?"', message.get("body", b"")):
                    gone.set()
                    await asyncio.sleep(0.05)  # the next write meets a closed connection

            await resp(req.scope, receive, send)
            assert server.metrics.snapshot()["responses"] == {"200": 1}
            rated = await server.feedback_route(
                testing.post_request("/v1/feedback", {"completion_id": cid, "rating": "up"})
            )
            assert rated["recorded"] is True, rated

            # 2. the client is gone before the first event is written
            req = testing.post_request(route, body)
            resp = await server.chat_completions(req)

            async def left() -> dict:
                return {"type": "http.disconnect"}

            async def slow(message: dict) -> None:
                await asyncio.sleep(0.2)  # the disconnect is seen first

            await resp(req.scope, left, slow)
            await asyncio.sleep(0.2)
            assert server.metrics.snapshot()["responses"] == {"200": 1, "499": 1}
            assert server.admission.waiting == {} and server.admission.generating == {}
        except APIError as e:
            raise AssertionError(f"{e.status} {e.code}: {e}") from None
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_streams_time_to_first_token_is_not_its_clients_reading_time(tmp_path):
    """rlchat_serve_ttft_seconds of a stream was taken when the SSE generator reached its first item, after the
    response's headers and role chunk were written: a client slow to read them (or a busy event loop) inflated it,
    though the first token had arrived before the response started."""
    import asyncio
    import time

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=512)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=False)
        seen: list[float] = []
        observe = server.metrics.ttft.observe
        server.metrics.ttft.observe = lambda v, tags=None: (seen.append(v), observe(v, tags))
        try:
            req = testing.post_request("/v1/chat/completions", body)
            t0 = time.perf_counter()
            resp = await server.chat_completions(req)
            started = time.perf_counter() - t0  # the response starts once the first item is in

            async def receive() -> dict:
                await asyncio.Event().wait()
                return {}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    await asyncio.sleep(1.0)  # a client (or proxy) slow to take the response

            await resp(req.scope, receive, send)
            assert len(seen) == 1 and seen[0] <= started + 0.1, (seen, started)
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_a_client_gone_mid_body_is_not_counted_as_refused(tmp_path, no_replica_context):
    """A client that left while sending its body (a 499) was counted in ``/readyz``'s ``refused`` (4xx the server
    gave), one that left later (also a 499) was not: a client's leaving is neither refused nor an error."""
    import asyncio

    from starlette.requests import Request

    from serve.schemas import APIError

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=512)
    scope = testing.post_request("/v1/chat/completions", {}).scope

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=False)
        try:
            with pytest.raises(APIError) as left:
                await server.chat_completions(Request(scope, gone))
            assert left.value.status == 499
            ready = json.loads((await server.readyz(testing.post_request("/readyz", {}))).body)
            assert ready["load"]["responses"] == {"499": 1}
            assert (ready["stats"]["refused"], ready["stats"]["errors"]) == (0, 0)
        finally:
            server.models.default.close()

    asyncio.run(main())


def test_openai_details_sampled_token_in_legacy_top_logprobs_top_p_0_null_usage_and_refusal_parts(tmp_path):
    """Found by a review against OpenAI's API reference, each a failing check first: legacy completions'
    ``top_logprobs`` must hold the sampled token too ("up to logprobs+1 elements"); ``top_p: 0`` is valid (the
    likeliest token only) and was a 400; with ``stream_options.include_usage`` every chunk carries ``"usage": null``
    but the last; an assistant turn whose content is a ``refusal`` part (as the SDK types allow) was a 400."""
    import asyncio

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", n_positions=512)
    hi = [{"role": "user", "content": "hi"}]

    async def sse(resp) -> list[dict]:
        events = []
        async for chunk in resp.body_iterator:
            text = chunk if isinstance(chunk, str) else chunk.decode() if isinstance(chunk, bytes) else chunk["data"]
            for line in text.splitlines():
                data = line.removeprefix("data: ").strip() if line.startswith("data:") else text.strip()
                if data and data != "[DONE]" and data.startswith("{"):
                    events.append(json.loads(data))
        return events

    async def main() -> None:
        server = await testing.inprocess_server(ckpt, engine_process=False)
        try:
            for k in (0, 2):
                body = {"prompt": "Once upon a time", "max_tokens": 6, "logprobs": k, "seed": 1}
                lp = json.loads((await server.completions(testing.post_request("/v1/completions", body))).body)
                lp = lp["choices"][0]["logprobs"]
                for tok, tok_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
                    assert top[tok] == tok_lp and len(top) <= k + 1, (k, tok, top)

            greedy = {"messages": hi, "max_tokens": 8, "temperature": 0}
            zero = {"messages": hi, "max_tokens": 8, "temperature": 1.0, "top_p": 0, "seed": 3}
            texts = []
            for body in (greedy, zero):
                reply = await server.chat_completions(testing.post_request("/v1/chat/completions", body))
                assert reply.status_code == 200
                texts.append(json.loads(reply.body)["choices"][0]["message"]["content"])
            assert texts[0] == texts[1]  # top_p 0: the likeliest token, whatever the temperature

            streamed = {"messages": hi, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
            chunks = await sse(await server.chat_completions(testing.post_request("/v1/chat/completions", streamed)))
            assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-1]["choices"] == []
            assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
            plain = {**streamed, "stream_options": None}
            chunks = await sse(await server.chat_completions(testing.post_request("/v1/chat/completions", plain)))
            assert not any("usage" in c for c in chunks)

            refused = [*hi, {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}, *hi]
            body = {"messages": refused, "max_tokens": 2}
            assert (
                await server.chat_completions(testing.post_request("/v1/chat/completions", body))
            ).status_code == 200
        finally:
            server.models.default.close()

    asyncio.run(main())
