"""The Serve chat endpoint: OpenAI shape (official client, plain and streaming), errors over raw HTTP, batching,
feedback into `rlchat rm`'s reader, auth, request logs without bodies, the safety filter and replica recovery.

The pure pieces (streaming text, batch grouping, request parsing, settings) are tested in-process (the feedback
store itself in tests/test_feedback_store.py);
the rest runs against ONE shared app (serve.testing.shared_app) on the session's local Ray, because starting Serve
costs ~10-40 s on 2 shared cores. The safety test deploys a second application on the same Serve instance; the
``--from-run`` test deploys through ``serve_command`` itself (over the shared app, which is put back afterwards).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from rlchat.config import Config
from rlchat.data import normalize_text
from rlchat.errors import CheckpointError, ConfigError
from rlchat.feedback_store import FeedbackStore, scrub_pii
from rlchat.generation import FINISH_LENGTH, GenerationEngine, SamplingParams
from rlchat.model import PolicyValueModel
from rlchat.text_stream import TextStreamer
from rlchat.tokenizer import ChatTokenizer, fit_history
from serve import testing
from serve.batching import BatchRun, GenerationJob, JobOutput, run_jobs
from serve.safety import WITHHELD_NOTICE
from serve.schemas import APIError, parse_chat_request, parse_feedback_request
from serve.settings import DEPLOYMENT_NAME, deployment_options, resolve_settings

VOCAB = 4096
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", VOCAB)


@pytest.fixture(scope="module")
def engine(tok) -> GenerationEngine:
    sizes = {"tokenizer.vocab_size": VOCAB, "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2}
    cfg = Config().replace(**sizes)
    return GenerationEngine(PolicyValueModel.build(cfg, tok).eval(), tok, precision="fp32")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("serve_unit") / "ckpt")


@pytest.fixture(scope="session")
def app(ray_local, tmp_path_factory) -> testing.TestApp:
    a = testing.shared_app(tmp_path_factory.mktemp("serve_app"))
    yield a
    testing.shutdown()


def _auth(app: testing.TestApp) -> dict[str, str]:
    return {"Authorization": f"Bearer {app.api_key}"}


def _post(app: testing.TestApp, body, path: str = "/v1/chat/completions", **kw) -> requests.Response:
    headers = kw.pop("headers", _auth(app))
    if isinstance(body, (bytes, str)):
        return requests.post(app.url + path, data=body, headers=headers, timeout=120, **kw)
    return requests.post(app.url + path, json=body, headers=headers, timeout=120, **kw)


def _sse(resp: requests.Response) -> list[str]:
    """The data fields of an SSE response, in order."""
    return [line[5:].strip() for line in resp.iter_lines(decode_unicode=True) if line.startswith("data:")]


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------


def test_text_streamer_never_splits_a_character(tok):
    text = "héllo 😀 wörld 日本語 ✓"
    ids = tok.encode(text)
    st = TextStreamer(tok)
    pieces = [st.push(t) for t in ids] + [st.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the test is only meaningful if some token ended inside a character (the streamer held it back)
    assert any(p == "" for p in pieces[:-1]), "no token split a UTF-8 character; pick other text"
    assert len(ids) > len([p for p in pieces if p])


def test_text_streamer_cuts_stop_strings_and_holds_back_their_prefix(tok):
    st = TextStreamer(tok, stop_strings=["STOP"])
    out = []
    for t in tok.encode("abc STO"):
        out.append(st.push(t))
    assert "".join(out) == "abc "  # "STO" may become STOP: held back
    for t in tok.encode("P and more"):
        out.append(st.push(t))
    out.append(st.finish())
    assert "".join(out) == "abc " and st.stopped and st.text == "abc "
    # a near miss is released in the end
    st = TextStreamer(tok, stop_strings=["STOP"])
    pieces = [st.push(t) for t in tok.encode("a STOIC b")] + [st.finish()]
    assert "".join(pieces) == "a STOIC b" and not st.stopped


def _first_stop_cut(text: str, stops: list[str]) -> int:
    """Where a reply is cut: at the stop string that completes first (the earliest end; of those ending there, the
    longest), found by brute force over every end position."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return end - max(len(s) for s in done)
    return len(text)


def test_text_streamer_cuts_at_the_first_stop_to_complete_however_the_tokens_fall(tok):
    """Overlapping stop strings over texts that repeat their pieces (the worst case for a naive matcher), pushed
    token by token and in chunks: the text is cut where the first stop string completes, nothing past that point
    is ever released, and what is held back is released at the end when no stop completes."""
    import random

    rng = random.Random(0)
    for trial in range(300):
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        stops = [st for st in stops if st.strip()] or ["ab"]
        text = "".join(rng.choice(["a", "b", " ", "ab", "ba ", "aab"]) for _ in range(rng.randint(0, 40)))
        cut = _first_stop_cut(text, stops)
        ids = tok.encode(text)
        one = TextStreamer(tok, stop_strings=stops)
        out = []
        for t in ids:
            out.append(one.push(t))
            assert one.released <= cut, (trial, stops, text)
        out.append(one.finish())
        assert "".join(out) == one.text == text[:cut], (trial, stops, text)
        assert one.stopped == (cut < len(text) or any(text.endswith(st) for st in stops))
        many = TextStreamer(tok, stop_strings=stops)
        pieces, i = [], 0
        while i < len(ids):
            k = rng.randint(1, 5)
            piece, taken = many.push_many(ids[i : i + k])
            pieces.append(piece)
            i += k
            if many.stopped:
                break
        pieces.append(many.finish())
        assert "".join(pieces) == text[:cut], (trial, stops, text)


def test_text_streamer_work_grows_with_the_text_not_with_its_square(tok, monkeypatch):
    """Four 46,000-character stop strings (a 184 KB body) and a long reply cost seconds of the replica's event loop
    when each token re-checked every prefix of every stop string against the text's end. The matcher keeps a state
    per stop string instead: the characters it examines grow linearly with the reply."""
    import rlchat.core.text_stream as ts

    stops = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(46_000)) for i in range(4)]
    ids = tok.encode("abcdefghijklmnopqrstuvwxyz" * 40 + " the end")
    steps = 0
    step = ts._advance

    def counted(*args):
        nonlocal steps
        steps += 1
        return step(*args)

    monkeypatch.setattr(ts, "_advance", counted)
    st = TextStreamer(tok, stop_strings=stops)
    released = "".join(st.push(t) for t in ids) + st.finish()
    assert released == tok.decode(ids) and not st.stopped
    assert steps == len(released), steps  # one automaton step per character of the reply


def test_text_streamer_holdback_window(tok):
    st = TextStreamer(tok, holdback=5)
    sent = "".join(st.push(t) for t in tok.encode("0123456789 abcdefghij"))
    assert sent == "0123456789 abcdefghij"[:-5]
    assert st.finish() == "fghij"


def test_run_jobs_batches_by_settings_and_ends_rows_at_their_budgets(engine, tok):
    prompt = tuple(tok.render_prompt([{"role": "user", "content": "hi there"}]))
    other = tuple(tok.render_prompt([{"role": "user", "content": "a longer question here?"}]))
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0)
    jobs = [
        GenerationJob(prompt, sampled, (11, 12)),
        GenerationJob(other, SamplingParams(max_new_tokens=5, temperature=1.0), (13,)),
        GenerationJob(prompt, SamplingParams(max_new_tokens=7, temperature=0.0), (14,)),  # its own group
        GenerationJob(prompt, SamplingParams(max_new_tokens=600, temperature=1.0), (15,)),  # beyond the context
    ]
    outs = run_jobs(engine, jobs)
    # a budget beyond the context ends at the model's position limit ("length"), it does not fail the batch
    assert isinstance(outs[3], JobOutput) and outs[3].finish_reasons[0] in ("stop", "length")
    assert len(prompt) + len(outs[3].tokens[0]) <= engine.max_positions
    for job, out in zip(jobs[:3], outs[:3]):
        assert isinstance(out, JobOutput) and len(out.tokens) == len(job.seeds)
        alone = engine.generate([list(job.prompt)] * len(job.seeds), job.params, list(job.seeds))
        assert out.tokens == alone.tokens  # batching never changes a seeded reply
        assert out.finish_reasons == alone.finish_reasons
        for toks, reason in zip(out.tokens, out.finish_reasons):
            assert len(toks) <= job.params.max_new_tokens
            assert reason == FINISH_LENGTH or toks[-1] == tok.eot_id


def test_batch_run_reports_each_job_when_it_ends_and_obeys_stream_control(engine, tok):
    prompt = tuple(tok.render_prompt([{"role": "user", "content": "hello"}]))
    short = GenerationJob(prompt, SamplingParams(max_new_tokens=3, temperature=1.0), (1,))
    long = GenerationJob(prompt, SamplingParams(max_new_tokens=10, temperature=1.0), (2, 3))
    run = BatchRun(engine, [short, long])
    assert run.rows == 3
    steps = 0
    done_at: dict[int, int] = {}
    while (items := run.step()) is not None:
        steps += 1
        for j, item in enumerate(items):
            if item is not None and item.done is not None:
                done_at[j] = steps
        if steps == 2:
            long.control.finish.add(1)  # the request side saw a stop string in choice 1
    assert done_at[0] <= 3 < done_at[1]  # the short job did not wait for the long one
    out = run_jobs(engine, [short])[0]
    assert isinstance(out, JobOutput) and len(out.tokens[0]) <= 3
    tokens, reasons = run.tokens[1], run.reasons[1]
    assert reasons[1] == "stop" and len(tokens[1]) == 2  # ended before its next token
    assert len(tokens[0]) == 10 or reasons[0] == "stop"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{bad json", None, None),
        (b"[1, 2]", None, None),
        (b"", None, None),
        (b"\xff\xfe\x00", None, None),
        (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}', "tools", "unsupported_parameter"),
        (b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 2}}', "logit_bias", None),
        (b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}', "presence_penalty", None),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', "top_logprobs", None),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}',
            "response_format",
            "unsupported_parameter",
        ),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', "messages[0].role", "unsupported_parameter"),
        (b'{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content[0]", None),
        (b'{"messages": []}', "messages", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "0.5"}', "temperature", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}', "temperature", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', "stop", None),
        (b'{"temperature": 1}', "messages", "missing_required_parameter"),
    ],
)
def test_parse_chat_request_rejects_with_openai_errors(body, param, code):
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    e = info.value
    assert e.status == 400 and e.param == param and e.message
    if code:
        assert e.code == code
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_a_deeply_nested_body_with_a_lone_surrogate_is_a_400_not_a_500():
    """The walk that finds unpaired surrogates recursed, outside the parser's ``RecursionError`` handler: a 1.3 KB
    body nesting a ``\\ud800`` 600 lists deep was a 500 on every POST route."""
    nested = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 600 + b'"\\ud800"' + b"]" * 600
    for parse in (parse_chat_request, parse_feedback_request):
        with pytest.raises(APIError) as info:
            parse(nested + b"}")
        assert (info.value.status, info.value.code) == (400, "invalid_value")
        assert "surrogate" in info.value.message


def test_parse_chat_request_accepts_openai_and_extension_fields():
    req, ignored = parse_chat_request(
        json.dumps(
            {
                "model": "rlchat",
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
                ],
                "max_completion_tokens": 9,
                "max_tokens": 30,
                "stop": "END",
                "seed": 3,
                "n": 2,
                "top_k": 5,
                "repetition_penalty": 1.2,
                "presence_penalty": 0,
                "stream_options": {"include_usage": True},
            }
        ).encode()
    )
    assert [m.as_message() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    assert req.budget() == 9 and req.stop_strings() == ("END",) and req.top_k == 5 and ignored == []


def test_parse_feedback_request_shapes():
    assert parse_feedback_request(b'{"completion_id": "c", "rating": "up"}').rating == "up"
    fb = parse_feedback_request(
        b'{"chosen": {"completion_id": "a"}, "rejected": {"completion_id": "b", "choice_index": 1}}'
    )
    assert fb.rejected.choice_index == 1
    for bad in (
        b"{}",
        b'{"rating": "up"}',
        b'{"completion_id": "c", "rating": "meh"}',
        b'{"chosen": "a", "rejected": "b"}',
        b'{"chosen": {"completion_id": "a"}}',
    ):
        with pytest.raises(APIError) as info:
            parse_feedback_request(bad)
        assert info.value.status == 400


def test_resolve_settings_and_deployment_options(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RLCHAT_FEEDBACK_STORE", raising=False)  # conftest points the suite's apps at a temp store
    s = resolve_settings(
        {"checkpoint": str(ckpt), "max_batch_size": "4", "max_replicas": "3", "reward.safety_patterns": ["x"]}
    )
    assert s.config.serve.max_batch_size == 4 and s.config.reward.safety_patterns == ("x",)
    assert Path(s.config.serve.feedback_path) == tmp_path / "feedback.jsonl"  # resolved on the driver
    assert s.config.serve.feedback_store == f"sqlite:///{tmp_path / 'feedback.db'}"  # the default store, beside it
    rel = resolve_settings({"checkpoint": str(ckpt), "feedback_store": "sqlite:///db/fb.db"}).config.serve
    assert rel.feedback_store == f"sqlite:///{tmp_path / 'db' / 'fb.db'}"
    pg = "postgresql://rlchat:pw@db.internal:5432/rlchat"
    assert resolve_settings({"checkpoint": str(ckpt), "feedback_store": pg}).config.serve.feedback_store == pg
    monkeypatch.setenv("RLCHAT_FEEDBACK_STORE", pg)  # as RLCHAT_API_KEY: a password need not be in a YAML file
    assert resolve_settings({"checkpoint": str(ckpt)}).config.serve.feedback_store == pg
    monkeypatch.delenv("RLCHAT_FEEDBACK_STORE")
    opts = deployment_options(s)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16.0}
    assert opts["max_ongoing_requests"] >= 4 and "num_replicas" not in opts
    fixed = deployment_options(resolve_settings({"checkpoint": str(ckpt), "replicas": 2}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    monkeypatch.setenv("RLCHAT_API_KEY", "from-env")
    assert resolve_settings({"checkpoint": str(ckpt)}).config.serve.api_key == "from-env"
    with pytest.raises(ConfigError, match="unknown"):
        resolve_settings({"checkpoint": str(ckpt), "max_batchsize": 4})
    # limits that no request could meet (a server with max_tokens=-5 started, then refused every request)
    bad = [("max_tokens", -5), ("max_messages", 0), ("max_chars", 0), ("port", 99999), ("port", -1)]
    for key, value in [*bad, ("stream_interval_s", -0.1), ("stream_interval_s", 5.0), ("stream_chunks_per_s", -1.0)]:
        with pytest.raises(ConfigError, match=f"serve.{key}={value}: expected"):
            resolve_settings({"checkpoint": str(ckpt), key: value})
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_settings({"checkpoint": str(ckpt), "from_run": str(tmp_path)})
    # --from-run: the run's best checkpoint
    run = tmp_path / "run"
    best = testing.make_tiny_checkpoint(run / "checkpoints" / "step_000003", step=3)
    s = resolve_settings({"from_run": str(run)})
    assert Path(s.checkpoint) == best.resolve()
    with pytest.raises(CheckpointError):
        resolve_settings({"checkpoint": str(tmp_path / "missing")})


def test_serve_config_yaml_is_a_valid_serve_deploy_config(ckpt, tmp_path, monkeypatch):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    raw = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app_schema,) = schema.applications
    assert app_schema.import_path == "serve.app:build_app"
    (dep,) = app_schema.deployments
    assert dep.name == DEPLOYMENT_NAME
    assert set(app_schema.args) >= {"checkpoint", "max_batch_size", "batch_wait_timeout_s"}
    # Serve applies a YAML deployment option over the code's (ray_actor_options as a whole): every option the code
    # derives from the args (CPUs, serve.resources, the shutdown timeout from the deadline, queues, replicas) is
    # left to it, so editing args is enough (a YAML num_cpus: 1 dropped serve.resources and a 300 s deadline kept an
    # 80 s shutdown timeout)
    derived = {"ray_actor_options", "graceful_shutdown_timeout_s", "max_ongoing_requests", "max_queued_requests",
               "backpressure_config", "autoscaling_config", "num_replicas", "health_check_period_s"}  # fmt: skip
    assert not derived & dep.model_dump(exclude_unset=True).keys(), dep.model_dump(exclude_unset=True)
    # the builder accepts the YAML's args the way `serve run` passes them
    monkeypatch.chdir(tmp_path)
    from serve.settings import deployment_options, resolve_settings

    monkeypatch.delenv("RLCHAT_FEEDBACK_STORE", raising=False)  # conftest points the suite's apps at a temp store
    settings = resolve_settings({**app_schema.args, "checkpoint": str(ckpt)})
    assert settings.config.serve.feedback_store == f"sqlite:///{tmp_path / 'feedback.db'}"  # laptop default
    opts = deployment_options(settings)
    assert opts["autoscaling_config"]["max_replicas"] > opts["autoscaling_config"]["min_replicas"] >= 1
    # the shipped config honours the environment's store, as it does RLCHAT_API_KEY (docs/cluster.md sets both)
    pg = "postgresql://rlchat:pw@db.internal:5432/rlchat"
    monkeypatch.setenv("RLCHAT_FEEDBACK_STORE", pg)
    assert resolve_settings({**app_schema.args, "checkpoint": str(ckpt)}).config.serve.feedback_store == pg
    app = call_user_app_builder_with_args_if_necessary(build_app, {**app_schema.args, "checkpoint": str(ckpt)})
    assert isinstance(app, Application)


def test_rlchat_serve_warns_of_a_sqlite_store_that_a_node_or_a_job_would_lose(tmp_path):
    """In a ``ray job submit --working-dir`` job the default ./feedback.db is in Ray's unpacked copy of the
    checkout, deleted with it: every rating lost without a word. Now a warning; a store elsewhere gets none."""
    from rlchat.cli.serve_cmd import feedback_store_notes

    job = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    doomed = feedback_store_notes(f"sqlite:///{job / 'feedback.db'}", nodes=1)
    assert len(doomed) == 1 and doomed[0].startswith("warning:") and "RLCHAT_FEEDBACK_STORE" in doomed[0], doomed
    assert feedback_store_notes(f"sqlite:///{tmp_path / 'feedback.db'}", nodes=1) == []
    assert len(feedback_store_notes(f"sqlite:///{tmp_path / 'feedback.db'}", nodes=2)) == 1  # one file per node
    assert feedback_store_notes("postgresql://u:p@h:5432/db", nodes=3) == []


def test_serve_command_needs_a_checkpoint():
    from rlchat.cli.serve_cmd import serve_command

    with pytest.raises(ConfigError, match="exactly one"):
        serve_command(checkpoint=None, from_run=None, blocking=False)


def test_rlchat_serve_arguments_resolve_as_typed(ckpt, tmp_path):
    """``rlchat serve [CKPT] [key=value ...]``: a checkpoint whose path holds "=" (a sweep's ``lr=1e-5`` run, a URI)
    stays the checkpoint; an override is one after ``--from-run`` too; an API key stays the string typed (YAML
    would read ``0777`` as 511); versions alone may be given as an override; and the driver copies a URI into the
    cache the overrides name, evicting nothing there (the replicas keep that cache)."""
    import os
    import shutil

    from rlchat.cli.parser import _serve_positionals, build_parser
    from rlchat.cli.serve_cmd import serve_args
    from serve.models import _cache_entry

    def parse(*argv: str) -> dict:
        return _serve_positionals(vars(build_parser().parse_args(["serve", *argv])))

    for path in ("s3://b/sweep/lr=1e-5/step_000100", "runs/lr=3e-4/checkpoints/best"):
        assert parse(path)["checkpoint"] == path and parse(path)["overrides"] == []
    got = parse("--from-run", "runs/x", "serve.max_batch_size=3", "serve.scrub_pii=true")
    assert got["checkpoint"] is None and got["overrides"] == ["serve.max_batch_size=3", "serve.scrub_pii=true"]

    s = resolve_settings(serve_args(checkpoint=str(ckpt), overrides=["serve.api_key=0777", "serve.max_batch_size=3"]))
    assert s.config.serve.api_key == "0777" and s.config.serve.max_batch_size == 3
    s = resolve_settings(serve_args(overrides=[f"serve.versions=[{{name: a, checkpoint: {ckpt}, weight: 1}}]"]))
    assert [v.name for v in s.versions] == ["a"]

    cache = tmp_path / "cache"
    old = _cache_entry(cache, "an old copy")
    shutil.copytree(ckpt, old)
    os.utime(old, (1.0, 1.0))
    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    overrides = [f"serve.checkpoint_cache={cache}", "serve.checkpoint_cache_keep=1"]
    resolve_settings(serve_args(checkpoint=f"file://{src}", overrides=overrides))
    copies = [p for p in cache.iterdir() if p.is_dir()]  # beside the fill lock (a file)
    assert old.is_dir() and len(copies) == 2  # copied there; nothing evicted by the driver

    # serve.checkpoint_cache from --config: the driver's copy goes there too (it went to the default cache, a second
    # copy of the checkpoint on the head node beside the replicas' one)
    from rlchat.config import save_config

    cfg_cache = tmp_path / "config_cache"
    cfg_file = tmp_path / "serve.yaml"
    save_config(Config().replace(**{"serve.checkpoint_cache": str(cfg_cache)}), cfg_file)
    s = resolve_settings(serve_args(checkpoint=f"file://{src}", config=str(cfg_file)))
    assert s.config.serve.checkpoint_cache == str(cfg_cache)
    assert [p for p in cfg_cache.iterdir() if p.is_dir()], "the driver fetched the URI elsewhere"


# --------------------------------------------------------------------------------------------------------------
# Against the running app
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_openai_client_plain_and_streaming(app, tok):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=app.url + "/v1", api_key=app.api_key, max_retries=0, timeout=120)
    models = client.models.list()
    assert [m.id for m in models.data] == ["rlchat"]
    card = client.models.retrieve("rlchat")
    assert card.id == "rlchat" and card.model_dump() == models.data[0].model_dump()
    # the limits a client (the web page) takes from the card can be met: a reply fits the context
    assert card.model_extra["max_tokens"] < card.model_extra["max_model_len"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Tell me a story."}]
    kw = dict(model="rlchat", messages=messages, max_tokens=12, temperature=1.0, seed=7)
    r1 = client.chat.completions.create(n=2, **kw)
    assert r1.id.startswith("chatcmpl-") and r1.object == "chat.completion" and r1.model == "rlchat"
    assert [c.index for c in r1.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r1.choices)
    assert r1.usage.prompt_tokens == len(tok.render_prompt(messages))
    assert 2 <= r1.usage.completion_tokens <= 24
    assert r1.usage.total_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
    r2 = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in r2.choices] == [c.message.content for c in r1.choices]  # seeded
    assert r2.id != r1.id

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r1.choices[0].message.content  # same seed, same reply, plain or streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r1.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == r1.usage.prompt_tokens
    assert {c.id for c in chunks} == {chunks[0].id}
    # n=2 streamed: the choices interleave by index and equal the plain ones
    texts = ["", ""]
    for c in client.chat.completions.create(stream=True, n=2, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in r1.choices]

    # one X-Request-Id (Serve's request id, or the client's own), the completion id in a header of its own
    raw = client.chat.completions.with_raw_response.create(**kw)
    assert raw.headers["x-rlchat-completion-id"] == raw.parse().id
    assert raw.request_id and "," not in raw.request_id and not raw.request_id.startswith("chatcmpl-")
    for stream in (False, True):
        r = _post(app, {**kw, "stream": stream}, stream=stream, headers={**_auth(app), "X-Request-Id": "mine-1"})
        assert r.raw.headers.getlist("x-request-id") == ["mine-1"], r.raw.headers
        assert r.headers["X-RLChat-Completion-Id"].startswith("chatcmpl-")


@pytest.mark.slow
def test_streamed_chunks_are_whole_characters_and_end_with_done(app):
    for seed in range(4):
        user = [{"role": "user", "content": "日本語で"}]
        body = {"messages": user, "max_tokens": 48, "temperature": 2.0, "seed": seed}
        plain = _post(app, body).json()["choices"][0]["message"]["content"]
        resp = _post(app, {**body, "stream": True}, stream=True)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        data = _sse(resp)
        assert data[-1] == "[DONE]"
        pieces = [json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]]
        # a split character would show up as U+FFFD in a chunk and make the concatenation differ from the plain reply
        assert "".join(pieces) == plain


@pytest.mark.slow
def test_stop_strings_end_the_reply_and_are_not_shown(app):
    base = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 24, "temperature": 0.0}
    full = _post(app, base).json()["choices"][0]["message"]["content"]
    assert len(full) > 8, full
    stop = full[4:7]
    expected = full[: full.index(stop)]
    r = _post(app, {**base, "stop": [stop, "zzzz-not-there"]}).json()
    assert r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    data = _sse(_post(app, {**base, "stop": stop, "stream": True}, stream=True))
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_error_cases_over_raw_http(app):
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ("no key", {"messages": user}, {}, 401, "invalid_api_key"),
        ("wrong key", {"messages": user}, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
        ("bad json", b'{"messages": [', None, 400, "invalid_value"),
        ("not an object", b'"hello"', None, 400, "invalid_value"),
        ("not utf-8", b"\xff\xfe{}", None, 400, "invalid_value"),
        ("empty body", b"", None, 400, "invalid_value"),
        ("tools", {"messages": user, "tools": [{"type": "function"}]}, None, 400, "unsupported_parameter"),
        ("logit_bias id", {"messages": user, "logit_bias": {"999999": 5}}, None, 400, "invalid_value"),
        ("wrong type", {"messages": "hi"}, None, 400, "invalid_value"),
        ("temperature", {"messages": user, "temperature": -0.5}, None, 400, "invalid_value"),
        ("too many messages", {"messages": user * 65}, None, 400, "too_many_messages"),
        ("too many chars", {"messages": [{"role": "user", "content": "a" * 32001}]}, None, 400, "too_many_characters"),
        ("max_tokens", {"messages": user, "max_tokens": 65}, None, 400, "invalid_value"),
        ("context", {"messages": [{"role": "user", "content": "word " * 300}]}, None, 400, "context_length_exceeded"),
        ("context+budget", {"messages": [{"role": "user", "content": "word " * 220}], "max_tokens": 60}, None, 400,
         "context_length_exceeded"),
        ("model", {"messages": user, "model": "gpt-4o"}, None, 404, "model_not_found"),
        ("beams with n", {"messages": user, "num_beams": 2, "n": 2}, None, 400, "invalid_value"),
        ("too large", b"{" + b" " * 300_000 + b"}", None, 413, "body_too_large"),
        # what json.loads accepts but no text or number of ours can hold: Python's 4,300-digit limit on ints, a lone
        # UTF-16 surrogate (a JavaScript string cut inside an emoji); both were 500s
        ("huge int", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"1" * 5000 + b"}", None, 400,
         "invalid_value"),
        ("huge bias key", {"messages": user, "logit_bias": {"1" * 5000: 1}}, None, 400, "invalid_value"),
        ("long stop", {"messages": user, "stop": ["x" * 1001]}, None, 400, "invalid_value"),
        ("lone surrogate", b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', None, 400, "invalid_value"),
        ("surrogate bytes", b'{"messages": [{"role": "user", "content": "hi \xed\xa0\xbd"}]}', None, 400,
         "invalid_value"),
        ("utf-16 body", '{"messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"), None, 400,
         "invalid_value"),
    ]  # fmt: skip
    for name, body, headers, status, code in cases:
        r = _post(app, body, headers=_auth(app) if headers is None else headers)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], name
        assert err["code"] == code, (name, err)  # the documented code of every case (docs/serving.md)
    for body in (b'{"completion_id": "x", "rating": "up", "choice_index": ' + b"1" * 5000 + b"}",
                 b'{"completion_id": "x", "rating": "up", "content": "\\udc00", "messages": []}'):  # fmt: skip
        r = _post(app, body, "/v1/feedback", headers=_auth(app))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text[:300]
    # a body sent in chunks (no Content-Length) is refused once it passes the limit, while it is still arriving
    # (it was read whole first: an endless one was never answered)
    import select
    import socket
    from urllib.parse import urlparse

    u = urlparse(app.url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {app.api_key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        piece = b'{"messages": [' + b" " * 100_000
        sent = 0
        while sent < 50 and not select.select([sock], [], [], 0.05)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += 1
        answer = sock.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:300]
    assert sent < 50, sent  # answered before the client had sent 5 MB
    r = _post(app, {"messages": user, "model": "gpt-4o"})
    assert r.json()["error"]["message"].count("'rlchat'") == 1  # the served names, each once
    # routes: unknown path, wrong method, auth on models and feedback, open health endpoints
    assert requests.get(app.url + "/v1/nothing", timeout=30).status_code == 404
    r = requests.get(app.url + "/v1/chat/completions", headers=_auth(app), timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]  # a 405 names the methods the route takes (RFC 9110)
    assert requests.get(app.url + "/v1/models", timeout=30).status_code == 401
    assert _post(app, {"completion_id": "x", "rating": "up"}, "/v1/feedback", headers={}).status_code == 401
    assert requests.get(app.url + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(app.url + "/readyz", timeout=30, headers=_auth(app)).json()
    assert ready["checkpoint"] == str(app.checkpoint) and ready["step"] == 1 and ready["stage"] == "sft"
    # the server still answers after all that
    assert _post(app, {"messages": user, "max_tokens": 2}).status_code == 200


@pytest.mark.slow
def test_a_40_turn_conversation_keeps_getting_answers_from_a_demo_size_model(app, tok, tmp_path):
    """Clients send the whole history every turn: past the context (256 positions) the server drops the oldest
    exchanges by :func:`fit_history` (never the system message or the latest turn) and says how many in a header."""
    from ray import serve as ray_serve

    ckpt = testing.make_tiny_checkpoint(tmp_path / "demo", n_layer=2, n_embd=64, n_head=4, n_positions=256)
    url = testing.deploy(
        ckpt, name="longchat", route_prefix="/longchat", api_key=app.api_key, max_messages=128, num_cpus=0
    )
    try:
        card = requests.get(url + "/v1/models", headers=_auth(app), timeout=30).json()["data"][0]
        assert (card["max_model_len"], card["max_messages"], card["max_chars"]) == (256, 128, 32000)
        messages = [{"role": "system", "content": "You are terse."}]
        dropped = []
        for i in range(40):
            messages.append({"role": "user", "content": f"Turn {i}: what should I cook for dinner tonight?"})
            body = {"messages": messages, "max_tokens": 8, "seed": i, "stream": i % 2 == 1}
            r = requests.post(url + "/v1/chat/completions", json=body, headers=_auth(app), timeout=120, stream=True)
            assert r.status_code == 200, (i, r.text[:300])
            dropped.append(int(r.headers["X-RLChat-Dropped-Turns"]))
            if body["stream"]:
                chunks = [json.loads(d) for d in _sse(r)[:-1]]
                reply = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            else:
                out = r.json()
                reply = out["choices"][0]["message"]["content"]
                kept, n = fit_history(messages, tok, 256 - 8)  # the one rule, on the server too
                assert n == dropped[-1] and out["usage"]["prompt_tokens"] == len(tok.render_prompt(kept))
                assert out["usage"]["total_tokens"] <= 256
            messages.append({"role": "assistant", "content": reply})
        assert dropped[0] == 0 and dropped[-1] > 20 and dropped == sorted(dropped), dropped
        # without max_tokens the history is fitted to leave a quarter of the context (here 64 tokens) for the reply
        r = requests.post(
            url + "/v1/chat/completions", json={"messages": messages[:-1]}, headers=_auth(app), timeout=120
        )
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= 256 - 64
        # a latest turn that alone does not fit: a 400 that says so, however much history could be dropped
        long_turn = messages + [{"role": "user", "content": "word " * 240}]
        r = requests.post(
            url + "/v1/chat/completions",
            json={"messages": long_turn, "max_tokens": 30},
            headers=_auth(app),
            timeout=120,
        )
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
        assert "latest user message" in err["message"] and "lower max_tokens to at most" in err["message"]
    finally:
        ray_serve.delete("longchat")


@pytest.mark.slow
def test_concurrent_requests_are_batched_without_changing_seeded_replies(app):
    bodies = [
        {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4 + i, "seed": 100 + i}
        for i in range(8)
    ]
    alone = [_post(app, b).json()["choices"][0]["message"]["content"] for b in bodies]
    before = requests.get(app.url + "/readyz", timeout=30).json()["stats"]
    together: list[str | None] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        start.wait()
        if i % 2:  # streamed and plain requests share the batches
            data = _sse(_post(app, {**bodies[i], "stream": True}, stream=True))
            together[i] = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
        else:
            together[i] = _post(app, bodies[i]).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = requests.get(app.url + "/readyz", timeout=30).json()["stats"]
    assert together == alone
    assert after["requests"] - before["requests"] == 4 and after["streams"] - before["streams"] == 4
    steps, rows = after["batches"] - before["batches"], after["batched_rows"] - before["batched_rows"]
    assert rows > steps  # decoding steps ran several rows at once
    assert after["largest_batch"] > 1 and after["largest_batch"] <= 8  # bounded by serve.max_batch_size


@pytest.mark.slow
def test_feedback_round_trip_into_the_reward_model_reader(app):
    messages = [{"role": "user", "content": "Pick a colour."}]
    r = _post(app, {"messages": messages, "n": 2, "max_tokens": 8, "seed": 5, "temperature": 1.0}).json()
    a, b = (c["message"]["content"] for c in r["choices"])
    assert a.strip() and b.strip() and a != b
    fb = "/v1/feedback"
    first = _post(app, {"completion_id": r["id"], "choice_index": 0, "rating": "up"}, fb).json()
    assert first == {"recorded": True, "kind": "rating", "preference_written": False}
    second = _post(app, {"completion_id": r["id"], "choice_index": 1, "rating": "down"}, fb).json()
    assert second["preference_written"] is True
    # a retried rating is answered as recorded before and writes nothing; a changed one is a conflict
    again = _post(app, {"completion_id": r["id"], "choice_index": 1, "rating": "down"}, fb)
    assert again.status_code == 200, again.text
    assert again.json() == {"recorded": False, "kind": "rating", "preference_written": False, "duplicate": True}
    changed = _post(app, {"completion_id": r["id"], "choice_index": 0, "rating": "down"}, fb)
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "already_rated", changed.text
    # the openai SDK retries a 409 (a lock timeout on OpenAI) unless told not to: a refused re-rating is final
    assert changed.headers["x-should-retry"] == "false"
    # the reverse of the thumbs pair, by ids: a contradiction, refused
    reverse = {"chosen": {"completion_id": r["id"], "choice_index": 1}, "rejected": {"completion_id": r["id"]}}
    refused = _post(app, reverse, fb)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "already_rated", refused.text
    # an explicit preference between two replies of another completion; its retry writes nothing
    r2 = _post(app, {"messages": messages, "n": 2, "max_tokens": 8, "seed": 6, "temperature": 1.0}).json()
    a2, b2 = (c["message"]["content"] for c in r2["choices"])
    assert a2 != b2
    by_ids = {"chosen": {"completion_id": r2["id"], "choice_index": 1}, "rejected": {"completion_id": r2["id"]}}
    third = _post(app, by_ids, fb).json()
    assert third["preference_written"] is True
    assert _post(app, by_ids, fb).json() == {
        "recorded": False,
        "kind": "preference",
        "preference_written": False,
        "duplicate": True,
    }
    by_text = {"prompt": messages, "chosen": "Blue.", "rejected": "I refuse."}
    assert _post(app, by_text, fb).json()["preference_written"] is True
    # any replica can take a rating when the client sends the text along (the web page does); this "down" pairs
    # with the most recent "up" of the same prompt (reply a)
    other = {"completion_id": "chatcmpl-elsewhere", "rating": "down", "messages": messages, "content": "Grey?"}
    assert _post(app, other, fb).json()["preference_written"] is True

    recs = FeedbackStore(app.feedback_store).preference_records()
    got = [(r.messages, r.chosen[0]["content"], r.rejected[0]["content"]) for r in recs[-4:]]
    a, b = normalize_text(scrub_pii(a)), normalize_text(scrub_pii(b))  # what the store and `rlchat data` make of it
    a2, b2 = normalize_text(scrub_pii(a2)), normalize_text(scrub_pii(b2))
    assert got == [
        (messages, a, b),  # thumbs up on choice 0 + thumbs down on choice 1
        (messages, b2, a2),  # explicit preference by completion ids
        (messages, "Blue.", "I refuse."),  # explicit preference by text
        (messages, a, "Grey?"),
    ]
    fb_meta = recs[-4].meta["feedback"]
    assert (fb_meta["kind"], fb_meta["chosen_id"], fb_meta["rejected_id"]) == ("thumbs", r["id"], r["id"])
    assert fb_meta["model_version"] == "tiny_ckpt" and fb_meta["untrusted"] is True
    # text the replica remembered vs text the client sent (by text, or a rating of a completion it does not know)
    assert [x.meta["feedback"]["client_text"] for x in recs[-4:]] == [False, False, True, True]
    assert all(r.is_preference for r in recs)

    assert _post(app, {"completion_id": "chatcmpl-unknown", "rating": "up"}, fb).status_code == 404
    assert _post(app, {"completion_id": r["id"], "choice_index": 5, "rating": "up"}, fb).status_code == 400
    assert _post(app, b"{nope", fb).status_code == 400
    assert _post(app, {"prompt": messages, "chosen": "same", "rejected": "same"}, fb).status_code == 400


@pytest.mark.slow
def test_request_logs_carry_ids_but_no_message_bodies(app, ray_local):
    secret = "purple-elephant-4471"
    r = _post(app, {"messages": [{"role": "user", "content": f"my secret is {secret}"}], "max_tokens": 3})
    cid = r.json()["id"]
    logs_dir = Path(ray_local._private.worker._global_node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = "\n".join(p.read_text(errors="replace") for p in logs_dir.glob("replica_*.log"))
        if cid in text:
            break
        time.sleep(0.5)
    line = next(x for x in text.splitlines() if cid in x)
    assert "status=200" in line and "prompt_tokens=" in line and "completion_tokens=" in line
    assert secret not in text


@pytest.mark.slow
def test_safety_filter_withholds_flagged_replies(app):
    from ray import serve as ray_serve

    url = testing.deploy(
        app.checkpoint,
        name="filtered",
        route_prefix="/filtered",
        safety_filter=True,
        **{"reward.safety_patterns": [r"\S"]},  # flags any visible character: every non-empty reply
        api_key=app.api_key,
        num_cpus=0.25,
    )
    try:
        body = {"messages": [{"role": "user", "content": "say something"}], "max_tokens": 8, "seed": 1}
        r = requests.post(url + "/v1/chat/completions", json=body, headers=_auth(app), timeout=120).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == WITHHELD_NOTICE
        resp = requests.post(
            url + "/v1/chat/completions", json={**body, "stream": True}, headers=_auth(app), timeout=120, stream=True
        )
        chunks = [json.loads(d) for d in _sse(resp)[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text.strip() == WITHHELD_NOTICE  # nothing of the flagged reply left the server
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    finally:
        ray_serve.delete("filtered")
    # the main app is unaffected
    r = _post(app, {"messages": [{"role": "user", "content": "say something"}], "max_tokens": 8, "seed": 1}).json()
    assert r["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_a_withheld_reply_leaves_nothing_of_its_held_back_text_in_logprobs(app):
    """Streaming with the safety filter holds the last SAFETY_HOLDBACK_CHARS characters back until the filter has
    seen them; the log-probs of the tokens of that window must wait with them. A reply flagged once it is 250
    characters long (far enough for several chunks to be released first): what was streamed before the notice, text
    and logprobs tokens alike, ends 64 characters earlier, and a plain reply that is withheld carries no logprobs."""
    from ray import serve as ray_serve

    from serve.safety import SAFETY_HOLDBACK_CHARS

    url = testing.deploy(
        app.checkpoint,
        name="filtered-late",
        route_prefix="/filtered-late",
        safety_filter=True,
        max_tokens=200,
        **{"reward.safety_patterns": [r"(?s)^.{250}"]},  # flags a reply once it reaches 250 characters
        api_key=app.api_key,
        num_cpus=0.25,
    )
    try:
        body = {
            "messages": [{"role": "user", "content": "say something long"}],
            "max_tokens": 200,
            "seed": 3,
            "logprobs": True,
            "top_logprobs": 2,
        }
        r = requests.post(url + "/v1/chat/completions", json=body, headers=_auth(app), timeout=120).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "content_filter"  # the reply did reach 250 characters
        assert not (choice["logprobs"] or {}).get("content")
        resp = requests.post(
            url + "/v1/chat/completions", json={**body, "stream": True}, headers=_auth(app), timeout=120, stream=True
        )
        chunks = [json.loads(d) for d in _sse(resp)[:-1]]
        deltas = [c["choices"][0] for c in chunks if c["choices"]]
        assert deltas[-1]["finish_reason"] == "content_filter"
        text = "".join(d["delta"].get("content") or "" for d in deltas)
        shown, notice = text.rsplit(WITHHELD_NOTICE, 1)[0].rstrip("\n"), WITHHELD_NOTICE
        assert notice in text and 0 < len(shown) <= 250 - SAFETY_HOLDBACK_CHARS
        lp_tokens = [e["bytes"] for d in deltas if d.get("logprobs") for e in d["logprobs"]["content"]]
        lp_text = bytes(b for t in lp_tokens for b in (t or [])).decode("utf-8", "replace")
        # nothing beyond the shown text; at most the token the hold-back edge cut through is not reported
        assert shown.startswith(lp_text) and len(shown) - len(lp_text) < 32, (lp_text, shown)
    finally:
        ray_serve.delete("filtered-late")


@pytest.mark.slow
def test_serve_from_run_serves_the_runs_best_checkpoint_to_the_openai_client(
    ray_local, tok, tmp_path, capsys, monkeypatch
):
    """`rlchat serve --from-run RUN_DIR` (serve_command, non-blocking) on a run directory made by the project's own
    run, metrics and checkpoint writers, whose best checkpoint (by the run's metric) is not its latest."""
    from openai import OpenAI

    from rlchat.checkpoint import CheckpointManager, find_best_checkpoint
    from rlchat.metrics import EVAL_REWARD_MEAN, MetricsWriter, make_run_dir, read_metrics, write_run_config

    monkeypatch.delenv("RLCHAT_API_KEY", raising=False)
    # 1. a short PPO run: three checkpoints, the middle one best by eval/reward_mean, the oldest pruned
    sizes = {"tokenizer.vocab_size": VOCAB, "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2}
    cfg = Config().replace(
        **sizes,
        **{"model.precision": "fp32", "checkpoint.keep_last": 1, "checkpoint.best_metric": EVAL_REWARD_MEAN},
    )
    run = make_run_dir(tmp_path / "run", "train")
    write_run_config(run, cfg)
    manager = CheckpointManager.from_config(run, cfg, "ppo")
    model = PolicyValueModel.build(cfg, tok)
    with MetricsWriter(run, cfg, tensorboard=False, mlflow_uri="") as writer:
        for step, reward in ((1, 0.2), (2, 0.9), (3, 0.4)):
            writer.log(step, {EVAL_REWARD_MEAN: reward})
            manager.save(step, model=model, tokenizer=tok, config=cfg, stage="ppo", metrics={EVAL_REWARD_MEAN: reward})
    best, latest = run / "checkpoints" / "step_000002", run / "checkpoints" / "step_000003"
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert manager.best() == best and manager.latest() == latest and find_best_checkpoint(run) == best
    assert not (run / "checkpoints" / "step_000001").exists()

    # 2. serve it from the run directory alone, then talk to it with the official client over real HTTP
    #    (as typed: the CLI's parser, a config override after the options and no checkpoint argument)
    from rlchat.cli.parser import main as cli_main

    with testing.serve_command_port() as port:
        argv = ["serve", "--from-run", str(run), "--port", str(port), "--api-key", "from-run-key", "--no-blocking"]
        assert cli_main([*argv, "serve.max_batch_size=3"]) == 0
        url = f"http://127.0.0.1:{port}"
        assert f"serving {best.resolve()} as model 'rlchat' at {url}" in capsys.readouterr().out
        ready = testing.wait_ready(url, api_key="from-run-key")
        assert (Path(ready["checkpoint"]), ready["step"], ready["stage"]) == (best.resolve(), 2, "ppo")
        assert ready["batching"]["max_batch_size"] == 3  # the override reached the replica
        assert ready["auth"] is True
        client = OpenAI(base_url=url + "/v1", api_key="from-run-key", max_retries=0, timeout=120)
        (card,) = client.models.list().data
        extra = card.model_dump()
        assert card.id == "rlchat" and (Path(extra["checkpoint"]), extra["step"]) == (best.resolve(), 2)
        r = client.chat.completions.create(
            model="rlchat", messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=6, seed=3
        )
        assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 6
        assert isinstance(r.choices[0].message.content, str)
        denied = requests.get(url + "/v1/models", timeout=30)  # the key given to `rlchat serve` is required
        assert denied.status_code == 401


@pytest.mark.slow
def test_killed_replica_is_replaced_and_the_endpoint_answers_again(app):
    old = testing.wait_ready(app.url, api_key=app.api_key)
    os.kill(old["pid"], signal.SIGKILL)
    new = testing.wait_ready(app.url, timeout_s=180, not_pid=old["pid"], api_key=app.api_key)
    assert new["pid"] != old["pid"] and new["replica"] != old["replica"] and new["step"] == 1
    r = _post(app, {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_rlchat_serve_flags_are_taken_as_typed_and_the_configs_ray_address_is_used(ckpt, tmp_path, monkeypatch):
    """Found by a review: ``rlchat serve``'s typed flags went through the YAML reading meant for ``key=value`` text,
    so ``--host ::`` was refused (YAML reads a mapping) and ``--api-key-file "key #1"`` lost its end (a YAML
    comment); the config's ``ray.address`` was ignored (a new local Ray was started instead of joining the
    cluster, as train and tune do); an IPv6 host made the printed URLs unusable."""
    import rlchat.distributed.cluster as cluster
    from rlchat.cli.serve_cmd import endpoint_url, serve_args, serve_command

    key = tmp_path / "key #1"
    key.write_text("s3cret\n", encoding="utf-8")
    s = resolve_settings(serve_args(str(ckpt), host="::", api_key_file=str(key))).config.serve
    assert (s.host, s.api_key) == ("::", "s3cret")
    typed = resolve_settings(serve_args(str(ckpt), overrides=["serve.model_version=2024", "max_batch_size=4"]))
    assert (typed.config.serve.model_version, typed.config.serve.max_batch_size) == ("2024", 4)  # str stays str
    # relative paths given as overrides are taken from here, as the config's are (the replicas run elsewhere)
    monkeypatch.chdir(tmp_path)
    paths = resolve_settings(serve_args(str(ckpt), overrides=["reward.model_path=rm", "serve.checkpoint_cache=cache"]))
    assert paths.config.reward.model_path == str(tmp_path / "rm")
    assert paths.config.serve.checkpoint_cache == str(tmp_path / "cache")
    assert endpoint_url("::1", 8123) == "http://[::1]:8123" and endpoint_url("127.0.0.1", 80) == "http://127.0.0.1:80"

    class Joined(Exception):
        pass

    def init_ray(address, num_cpus=0):
        raise Joined(address)

    monkeypatch.setattr(cluster, "init_ray", init_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"ray:\n  address: auto\nserve:\n  port: {testing.free_port()}\n", encoding="utf-8")
    with pytest.raises(Joined) as joined:
        serve_command(checkpoint=str(ckpt), config=str(cfg), blocking=False)
    assert joined.value.args[0] == "auto"
