"""The feedback store on both back ends: a SQLite file and a real PostgreSQL server (Debian's `postgresql`, started
by the session fixture in tests/conftest.py as an unprivileged cluster in a temp dir).

Every store test runs once per back end: concurrent writers from several processes (1,000 ratings, all come back,
opposite ratings pair up exactly once), an unreachable database (StoreUnavailable, then recovery after a PostgreSQL
restart), a writer SIGKILLed inside its transaction (no partial rows), export to the `rlchat data` layout and into
the reward-model loader, stats against hand-computed Wilson intervals, transcript retention, scrubbing and
deleting a conversation. The Serve tests (slow) check the endpoint: 503 + Retry-After while the store is down with
chat completions unaffected, and transcripts of served chats on the session's shared app. The two-replica,
two-node version of the concurrency test is in tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from rlchat.cli import main as cli_main
from rlchat.config import Config
from rlchat.data import load_records as load_data_records
from rlchat.errors import ConfigError, DataError
from rlchat.feedback_store import (
    RETRY_AFTER_S,
    SCHEMA_VERSION,
    AlreadyRated,
    FeedbackStore,
    InvalidFeedback,
    RequestRecord,
    StoreUnavailable,
    default_store_url,
    display_url,
    is_store_url,
    load_records,
    resolve_store_url,
    schema_table,
    scrub_pii,
    wilson_interval,
)
from serve import testing

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("sqlite", "postgresql")
PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> str:
    """An empty store of each back end: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def store(store_url):
    s = FeedbackStore(store_url, transcripts=True, transcript_retention_days=7.0)
    yield s
    s.close()


def _run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    # p = 8/10, z = 1.96: center = (0.8 + z²/20) / (1 + z²/10) = 0.71674, half = 0.22658 (by hand)
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    # p = 1/4: center = 0.37247, half = 0.32689
    assert wilson_interval(1, 4) == pytest.approx((0.04559, 0.69936), abs=1e-5)
    low, high = wilson_interval(0, 5)  # never below 0, and not a point interval at p = 0 as the normal one is
    assert low == 0.0 and high == pytest.approx(0.43448, abs=1e-5)
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(5, 5)[0] == pytest.approx(0.56552, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_scrub_pii_replaces_emails_and_phone_numbers_and_leaves_numbers():
    cases = {
        "write to jane.doe+rl@mail.example.co.uk today": "write to [email] today",
        "call +44 20 7946 0958 or (555) 123-4567": "call [phone] or [phone]",
        "or 555.123.4567, or 00491511234567": "or [phone], or [phone]",
        "2 + 3 = 5, pi is 3.14159265358, it costs $1,250,000": "2 + 3 = 5, pi is 3.14159265358, it costs $1,250,000",
        "on 2024-01-15 10:30, order 123456": "on 2024-01-15 10:30, order 123456",
    }
    for text, want in cases.items():
        assert scrub_pii(text) == want, text


def test_store_urls_resolve_relative_sqlite_paths_and_refuse_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_store_url("sqlite:///sub/fb.db") == f"sqlite:///{tmp_path / 'sub' / 'fb.db'}"
    assert resolve_store_url("runs/feedback.db") == f"sqlite:///{tmp_path / 'runs' / 'feedback.db'}"
    assert resolve_store_url("sqlite:////abs/fb.db") == "sqlite:////abs/fb.db"
    assert resolve_store_url("postgres://u:p@h/db") == "postgresql://u:p@h/db"
    assert (
        default_store_url(tmp_path / "serve" / "feedback.jsonl") == f"sqlite:///{tmp_path / 'serve' / 'feedback.db'}"
    )
    assert display_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert is_store_url("postgresql://h/db") and is_store_url("x/feedback.db") and not is_store_url("fb.jsonl")
    for bad in ("mysql://h/db", "feedback.jsonl", "sqlite:///:memory:"):
        with pytest.raises(ConfigError, match="feedback store"):
            resolve_store_url(bad)
    with pytest.raises(ConfigError, match=r"serve.feedback_store='mysql://h/db'.*postgresql://"):
        Config().replace(**{"serve.feedback_store": "mysql://h/db"})
    with pytest.raises(ConfigError, match="serve.transcript_retention_days"):
        Config().replace(**{"serve.transcript_retention_days": 0})
    with pytest.raises(ConfigError, match="serve.request_retention_days=-1.*positive number of days"):
        Config().replace(**{"serve.request_retention_days": -1})
    assert Config().serve.transcripts is False  # privacy: off unless asked for


# --------------------------------------------------------------------------------------------------------------
# The store, on both back ends
# --------------------------------------------------------------------------------------------------------------


def test_schema_is_migrated_once_by_concurrent_first_users(store_url):
    from concurrent.futures import ThreadPoolExecutor

    stores = [FeedbackStore(store_url) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:  # replicas starting together all create the schema "first"
        assert list(pool.map(lambda s: s.schema_version(), stores)) == [SCHEMA_VERSION] * 4
    engine = sa.create_engine(stores[0].engine.url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema_table)).scalar() == SCHEMA_VERSION
        conn.execute(sa.insert(schema_table).values(version=99, applied_at=0.0, description="from the future"))
        conn.commit()
    engine.dispose()
    with pytest.raises(ConfigError, match="schema version 99 is newer than this rlchat knows"):
        FeedbackStore(store_url).schema_version()
    for s in stores:
        s.close()


def test_opposite_ratings_make_a_pair_that_the_rm_reader_reads(store):
    v = "run-a/step_000010"
    other = [{"role": "user", "content": "other"}]
    assert store.add_rating("c1", 0, "down", PROMPT, "five", model_version=v, client_text=True) is None  # alone
    assert store.add_rating("c9", 0, "up", other, "x", model_version=v, client_text=False) is None  # other prompt
    assert store.add_rating("c5", 0, "up", PROMPT, "five", model_version=v, client_text=False) is None  # same reply
    pair = store.add_rating("c2", 0, "up", PROMPT, "4", model_version=v, client_text=False)
    assert pair is not None and (pair["chosen"], pair["rejected"]) == ("4", "five")
    assert (pair["feedback"]["kind"], pair["feedback"]["chosen_id"], pair["feedback"]["rejected_id"]) == (
        "thumbs",
        "c2",
        "c1",
    )
    assert pair["feedback"]["client_text"] is True and pair["feedback"]["untrusted"] is True  # c1's text was sent
    # an explicit preference; ones that would not read back are refused and write nothing
    store.add_preference(PROMPT, "4.", "22", model_version=v, client_text=True, chosen_id=None, rejected_id=None)
    with pytest.raises(InvalidFeedback, match="chosen"):
        store.add_preference(PROMPT, "same", "same", model_version=v, client_text=True)
    with pytest.raises(InvalidFeedback):
        store.add_rating("c3", 0, "meh", PROMPT, "x", model_version=v, client_text=True)
    # an empty reply rated the other way: the rating is kept, no pair is formed
    assert store.add_rating("c4", 0, "down", PROMPT, "", model_version=v, client_text=False) is None

    records = store.preference_records()
    assert [(r.messages, r.chosen[0]["content"], r.rejected[0]["content"]) for r in records] == [
        (PROMPT, "4", "five"),
        (PROMPT, "4.", "22"),
    ]
    assert all(r.is_preference and r.meta["feedback"]["model_version"] == v for r in records)
    ratings = store.rows("ratings")
    assert [(r["request_id"], r["rating"], r["client_text"], r["untrusted"]) for r in ratings] == [
        ("c1", "down", True, True),
        ("c9", "up", False, True),
        ("c5", "up", False, True),
        ("c2", "up", False, True),
        ("c4", "down", False, True),
    ]


def test_scrubbing_never_joins_the_replies_of_two_different_prompts_into_a_pair(store_url):
    """Scrubbing makes "call 555-123-4567" and "call 555-987-6543" one prompt text ("call [phone]"): two real
    prompts. A thumbs pair must compare two replies to the same prompt, so a prompt that scrubbing changed forms no
    pair (the ratings are kept); prompts without personal data still pair."""
    store = FeedbackStore(store_url, scrub=True)
    v = "run-a/step_000010"
    one = [{"role": "user", "content": "Please call me at +1 555-123-4567 about the order"}]
    two = [{"role": "user", "content": "Please call me at +1 555-987-6543 about the order"}]
    assert store.add_rating("p1", 0, "down", one, "no", model_version=v, client_text=False) is None
    assert store.add_rating("p2", 0, "up", two, "sure, I will call", model_version=v, client_text=False) is None
    # the same prompt rated both ways on two replies: it too is not paired (scrubbed, its identity is gone)
    assert store.add_rating("p3", 0, "up", one, "ok, calling", model_version=v, client_text=False) is None
    # a prompt whose text reads like a scrubbed one never pairs with a scrubbed prompt's rating either
    literal = [{"role": "user", "content": "Please call me at [phone] about the order"}]
    assert store.add_rating("p4", 0, "down", literal, "meh", model_version=v, client_text=False) is None
    # without personal data, opposite ratings pair as before
    assert store.add_rating("q1", 0, "down", PROMPT, "five", model_version=v, client_text=False) is None
    assert store.add_rating("q2", 0, "up", PROMPT, "4", model_version=v, client_text=False) is not None
    assert [r.chosen[0]["content"] for r in store.preference_records()] == ["4"]
    assert {r["prompt"][0]["content"] for r in store.rows("ratings")} >= {"Please call me at [phone] about the order"}
    store.close()


def test_text_with_a_nul_character_is_kept_by_both_back_ends(store):
    """PostgreSQL text cannot hold U+0000: a rating whose reply held one (the byte-0 token) was a 500 there and
    stored on SQLite. Both back ends now keep it as U+FFFD; an id no back end can hold is an InvalidFeedback (a
    400), not a database error."""
    v = "run-a/step_000010"
    prompt = [{"role": "user", "content": "x\x00y"}]
    store.add_rating("c1", 0, "up", prompt, "a\x00b", model_version=v, client_text=True)
    (row,) = store.rows("ratings")
    assert row["content"] == "a\ufffdb" and row["prompt"] == [{"role": "user", "content": "x\ufffdy"}]
    store.add_preference(PROMPT, "4\x00", "22", model_version=v, client_text=True)
    assert store.preference_records()[-1].chosen[0]["content"] == "4\ufffd"
    try:
        store.add_rating("c\x002", 0, "up", PROMPT, "4", model_version=v, client_text=True)
    except InvalidFeedback as e:
        assert "NUL" in str(e)
    assert len(store.rows("ratings")) in (1, 2)
    # with scrub_pii on, a prompt with a NUL is still one prompt: two opposite ratings of its replies make a pair
    scrubbing = FeedbackStore(store.url, scrub=True)
    try:
        scrubbing.add_rating("s1", 0, "up", prompt, "yes", model_version=v, client_text=False)
        pair = scrubbing.add_rating("s2", 0, "down", prompt, "no", model_version=v, client_text=False)
        assert pair is not None and (pair["chosen"], pair["rejected"]) == ("yes", "no")
    finally:
        scrubbing.close()


def test_a_reply_is_rated_once_retries_write_nothing_and_a_changed_rating_is_refused(store):
    """A client that retries a rating (a timeout, a double click through the API) must not write the rating or the
    pair it forms twice: duplicated pairs would weigh one comparison twice in the reward model's data. A reply rated
    the other way later is refused (ratings are final, as on the web page) and changes nothing."""
    v = "run-a/step_000010"
    assert store.add_rating("c1", 0, "down", PROMPT, "five", model_version=v, client_text=False) is None
    pair = store.add_rating("c2", 0, "up", PROMPT, "4", model_version=v, client_text=False)
    assert pair is not None
    for _ in range(2):
        with pytest.raises(AlreadyRated) as e:
            store.add_rating("c2", 0, "up", PROMPT, "4", model_version=v, client_text=False)
        assert e.value.same
    with pytest.raises(AlreadyRated, match="already rated 'up'") as e:
        store.add_rating("c2", 0, "down", PROMPT, "4", model_version=v, client_text=False)
    assert not e.value.same
    with pytest.raises(AlreadyRated):
        store.add_rating("c1", 0, "down", PROMPT, "five", model_version=v, client_text=False)
    # another choice of the same completion is another reply
    assert store.add_rating("c2", 1, "down", PROMPT, "22", model_version=v, client_text=False) is not None
    assert [(r["request_id"], r["choice_index"], r["rating"]) for r in store.rows("ratings")] == [
        ("c1", 0, "down"),
        ("c2", 0, "up"),
        ("c2", 1, "down"),
    ]
    assert [(r.chosen[0]["content"], r.rejected[0]["content"]) for r in store.preference_records()] == [
        ("4", "five"),
        ("4", "22"),
    ]


def test_a_preference_between_two_served_replies_is_recorded_once_and_never_reversed(store):
    """Preferences by completion id are server text, so they train the reward model: a retry must not add the pair
    twice, and the reverse of a recorded comparison (by id or by thumbs) must be refused, not stored beside it."""
    v = "run/step_1"

    def prefer(chosen: str, rejected: str, chosen_id: str, rejected_id: str) -> dict:
        return store.add_preference(
            PROMPT, chosen, rejected, model_version=v, client_text=False, chosen_id=chosen_id, rejected_id=rejected_id
        )

    first = prefer("four", "5", "a", "b")
    assert first["chosen"] == "four"
    with pytest.raises(AlreadyRated) as e:
        prefer("four", "5", "a", "b")
    assert e.value.same
    with pytest.raises(AlreadyRated, match="opposite") as e:
        prefer("5", "four", "b", "a")
    assert not e.value.same
    # thumbs made c > d; the explicit reverse is refused too
    store.add_rating("c", 0, "up", PROMPT, "six", model_version=v, client_text=False)
    assert store.add_rating("d", 0, "down", PROMPT, "seven", model_version=v, client_text=False) is not None
    with pytest.raises(AlreadyRated):
        prefer("seven", "six", "d", "c")
    # two choices of one completion (same id on both sides) are still two different replies
    prefer("eight", "nine", "e", "e")
    prefer("eight", "ten", "e", "e")
    assert [(r.chosen[0]["content"], r.rejected[0]["content"]) for r in store.preference_records()] == [
        ("four", "5"),
        ("six", "seven"),
        ("eight", "nine"),
        ("eight", "ten"),
    ]


def test_thumbs_after_a_preference_by_ids_add_no_second_pair_of_the_same_replies(store):
    """A comparison recorded by ids first, then thumbs on the same two replies: the ratings are kept, but they add
    no pair -- neither the reverse (a contradiction in the reward model's data) nor a copy (counted twice). (Found
    by review: only the preference checked for an earlier comparison, so thumbs after it wrote either.)"""
    v = "run/step_1"
    store.add_preference(PROMPT, "four", "5", model_version=v, client_text=False, chosen_id="a", rejected_id="b")
    assert store.add_rating("a", 0, "down", PROMPT, "four", model_version=v, client_text=False) is None
    assert store.add_rating("b", 0, "up", PROMPT, "5", model_version=v, client_text=False) is None  # the reverse
    other = [{"role": "user", "content": "What is 3 + 3?"}]
    store.add_preference(other, "six", "7", model_version=v, client_text=False, chosen_id="c", rejected_id="d")
    assert store.add_rating("c", 0, "up", other, "six", model_version=v, client_text=False) is None
    assert store.add_rating("d", 0, "down", other, "7", model_version=v, client_text=False) is None  # a copy
    assert [(r.chosen[0]["content"], r.rejected[0]["content"]) for r in store.preference_records()] == [
        ("four", "5"),
        ("six", "7"),
    ]
    assert len(store.rows("ratings")) == 4


def test_reply_text_a_client_sends_is_verified_and_unverified_text_stays_out_of_training(store):
    """A rating that reaches a replica which did not serve the completion carries the reply's text from the client.
    The store checks that text (and its prompt) against the digest of what the server answered, and labels the
    rating with the version that served it; text no server produced (a made-up id, edited text, a withheld choice)
    stays ``client_text`` and out of the reward model's data unless ``rm.feedback_client_text`` lets it in."""
    store.record_request("c1", model_version="canary/step_7", n_choices=1, messages=PROMPT, replies=["four"])
    store.record_request("c2", model_version="stable/step_5", n_choices=2, messages=PROMPT, replies=["5", None])
    store.record_request("c3", model_version="stable/step_5", n_choices=1, messages=PROMPT, replies=["6"])
    store.record_request("c4", model_version="stable/step_5", n_choices=1, messages=PROMPT, replies=["6"])
    # c1's reply, rated on a replica that only knows its default version: verified, labelled with c1's version
    assert store.add_rating("c1", 0, "up", PROMPT, "four", model_version="stable/step_5", client_text=True) is None
    made_up = store.add_rating("fake", 0, "down", PROMPT, "I hate you", model_version="x", client_text=True)
    assert made_up is not None and made_up["feedback"]["client_text"] is True
    verified = store.add_rating("c2", 0, "down", PROMPT, "5", model_version="x", client_text=True)
    assert verified is not None and verified["feedback"]["client_text"] is False
    edited = store.add_rating("c3", 0, "down", PROMPT, "6 (edited)", model_version="x", client_text=True)
    assert edited is not None and edited["feedback"]["client_text"] is True
    withheld = store.add_rating("c2", 1, "down", PROMPT, "7", model_version="x", client_text=True)
    assert withheld is not None and withheld["feedback"]["client_text"] is True
    other_prompt = [{"role": "user", "content": "something else"}]
    moved = store.add_rating("c4", 0, "down", other_prompt, "6", model_version="x", client_text=True)
    assert moved is None  # alone for its prompt; its rating row says client text (the prompt was not c4's)
    store.add_preference(PROMPT, "Four.", "Six.", model_version="x", client_text=True)  # a preference by text

    ratings = {(r["request_id"], r["choice_index"], r["content"]): r for r in store.rows("ratings")}
    assert (ratings["c1", 0, "four"]["client_text"], ratings["c1", 0, "four"]["model_version"]) == (
        False,
        "canary/step_7",
    )
    assert (ratings["c2", 0, "5"]["client_text"], ratings["c2", 0, "5"]["model_version"]) == (False, "stable/step_5")
    assert ratings["fake", 0, "I hate you"]["client_text"] and ratings["fake", 0, "I hate you"]["model_version"] == "x"
    assert ratings["c3", 0, "6 (edited)"]["client_text"] and ratings["c2", 1, "7"]["client_text"]
    assert ratings["c4", 0, "6"]["client_text"]

    trusted = load_records(store.url, "all")
    assert [(r.chosen[0]["content"], r.rejected[0]["content"]) for r in trusted] == [("four", "5")]
    everything = load_records(store.url, "all", Config().replace(**{"rm.feedback_client_text": True}))
    assert len(everything) == 5


def test_a_version_1_store_is_migrated_to_keep_reply_digests_and_pruned_counts(store_url, monkeypatch):
    import rlchat.core.feedback_store as fs

    with monkeypatch.context() as m:
        m.setattr(fs, "MIGRATIONS", fs.MIGRATIONS[:1])
        m.setattr(fs, "SCHEMA_VERSION", 1)
        old = fs.FeedbackStore(store_url)
        assert old.schema_version() == 1
        old.add_rating("a", 0, "up", PROMPT, "four", model_version="v", client_text=False)
        old.close()
    new = FeedbackStore(store_url, request_retention_days=1.0)
    assert new.schema_version() == SCHEMA_VERSION == 4
    new.record_request("b", model_version="v", n_choices=1, messages=PROMPT, replies=["5"])
    pair = new.add_rating("b", 0, "down", PROMPT, "5", model_version="v", client_text=True)
    assert pair is not None and pair["feedback"]["client_text"] is False  # verified against the new digests
    new.record_request("c", model_version="v", n_choices=1, now=time.time() - 2 * 86400.0)
    assert new.prune()["requests"] == 1 and [s.requests for s in new.stats()] == [2]  # counted past retention
    new.close()


def test_1000_concurrent_ratings_from_four_processes_all_come_back(store_url):
    """Four writer processes (replicas) x 8 threads; rating i of prompt i // 2 is "up" for even i, "down" for odd i
    and the two of each prompt come from different processes: every rating is stored once and each prompt's two
    ratings make exactly one pair (PostgreSQL: per-prompt advisory lock; SQLite: BEGIN IMMEDIATE)."""
    n, procs = 1000, 4
    code = f"""
        import sys
        from concurrent.futures import ThreadPoolExecutor
        from rlchat.feedback_store import FeedbackStore

        k = int(sys.argv[1])
        store = FeedbackStore({store_url!r})
        def rate(i):
            prompt = [{{"role": "user", "content": f"question {{i // 2}}"}}]
            return store.add_rating(f"chatcmpl-{{i}}", 0, "up" if i % 2 == 0 else "down", prompt, f"answer {{i}}",
                                    model_version="v", client_text=True)
        with ThreadPoolExecutor(8) as pool:
            pairs = sum(p is not None for p in pool.map(rate, [i for i in range({n}) if (i + i // 2) % {procs} == k]))
        print("PAIRS", pairs)
    """
    workers = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(k)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for k in range(procs)
    ]  # fmt: skip
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-2000:] for o in outs]
    reported = sum(int(o[0].split("PAIRS")[1]) for o in outs)
    store = FeedbackStore(store_url)
    ratings = store.rows("ratings")
    assert sorted(r["request_id"] for r in ratings) == sorted(f"chatcmpl-{i}" for i in range(n))
    pairs = store.rows("pairs")
    assert len(pairs) == reported == n // 2
    assert sorted(p["chosen_id"] for p in pairs) == sorted(f"chatcmpl-{i}" for i in range(0, n, 2))
    store.close()


def test_an_unreachable_database_raises_store_unavailable_then_recovers(store_url, tmp_path, request):
    if store_url.startswith("sqlite"):
        path = tmp_path / "blocked" / "feedback.db"
        path.mkdir(parents=True)  # a directory where the file should be: SQLite cannot open it (root or not)
        store = FeedbackStore(f"sqlite:///{path}")
        with pytest.raises(StoreUnavailable, match="is unavailable"):
            store.add_rating("c1", 0, "up", PROMPT, "4", model_version="v", client_text=True)
        path.rmdir()
        assert store.add_rating("c1", 0, "up", PROMPT, "4", model_version="v", client_text=True) is None
        return
    server = request.getfixturevalue("postgres_server")
    closed = testing.free_port()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="Connection refused|connection failed"):
        FeedbackStore(f"postgresql://rlchat@127.0.0.1:{closed}/x").schema_version()
    assert time.monotonic() - t0 < 15
    store = FeedbackStore(store_url)
    store.add_rating("c1", 0, "up", PROMPT, "4", model_version="v", client_text=True)  # pooled connections now
    server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            store.add_rating("c2", 0, "down", PROMPT, "5", model_version="v", client_text=True)
    finally:
        server.start()
    # the pool's dead connections are noticed (pre-ping) and replaced: the next write just works
    assert store.add_rating("c2", 0, "down", PROMPT, "5", model_version="v", client_text=True) is not None
    assert [r["request_id"] for r in store.rows("ratings")] == ["c1", "c2"]
    store.close()


def test_a_writer_killed_inside_its_transaction_leaves_no_partial_rows(store_url):
    store = FeedbackStore(store_url)
    store.add_rating("c1", 0, "up", PROMPT, "4", model_version="v", client_text=True)
    # The child's "down" completes a pair: it is killed after inserting its rating, before inserting the pair.
    code = f"""
        import time
        from rlchat import feedback_store

        real = feedback_store.FeedbackStore._insert_pair
        def stall(self, conn, *args):
            out = real(self, conn, *args)  # the pair row is written too; the commit never comes
            print("WRITTEN", flush=True)
            time.sleep(600)
            return out
        feedback_store.FeedbackStore._insert_pair = stall
        store = feedback_store.FeedbackStore({store_url!r})
        store.add_rating("c2", 0, "down", {PROMPT!r}, "5", model_version="v", client_text=True)
    """
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "WRITTEN"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert [r["request_id"] for r in store.rows("ratings")] == ["c1"] and store.rows("pairs") == []
    # the lock died with the writer: the next write goes through at once
    t0 = time.monotonic()
    assert store.add_rating("c3", 0, "down", PROMPT, "6", model_version="v", client_text=True) is not None
    assert time.monotonic() - t0 < 10
    store.close()


def _fill(store: FeedbackStore) -> None:
    """v1: 10 requests, 8 up / 2 down, 2 pairs; v2: 4 requests, 1 up / 3 down, 1 pair."""
    for version, n_req, ups, downs in (("v1", 10, 8, 2), ("v2", 4, 1, 3)):
        for i in range(n_req):
            store.record_request(f"{version}-r{i}", model_version=version, n_choices=1)
        for i in range(ups + downs):
            prompt = [{"role": "user", "content": f"{version} question {i % 2}"}]
            store.add_rating(f"{version}-r{i}", 0, "up" if i < ups else "down", prompt, f"{version} answer {i}",
                             model_version=version, client_text=False)  # fmt: skip


def test_stats_per_model_version_against_hand_computed_values(store, capsys):
    _fill(store)
    got = {s.model_version: s for s in store.stats()}
    assert (got["v1"].requests, got["v1"].ratings, got["v1"].up, got["v1"].down, got["v1"].pairs) == (10, 10, 8, 2, 2)
    assert (got["v2"].requests, got["v2"].ratings, got["v2"].up, got["v2"].down, got["v2"].pairs) == (4, 4, 1, 3, 1)
    assert got["v1"].up_rate == 0.8 and got["v1"].up_rate_ci == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert got["v2"].up_rate == 0.25 and got["v2"].up_rate_ci == pytest.approx((0.04559, 0.69936), abs=1e-5)

    assert cli_main(["feedback", "stats", store.url]) == 0
    table = capsys.readouterr().out
    assert "0.800  [0.490, 0.943]" in table and "0.250  [0.046, 0.699]" in table
    assert cli_main(["feedback", "stats", store.url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model_version"], r["requests"], r["up"], r["pairs"]) for r in rows] == [
        ("v1", 10, 8, 2),
        ("v2", 4, 1, 1),
    ]


def test_feedback_commands_refuse_a_sqlite_store_that_does_not_exist(tmp_path, capsys):
    """A misspelled path made ``rlchat feedback stats`` / ``delete`` / ``export`` create an empty store (and its
    directories) and report nothing to see, exit 0: now exit 2 naming the file and where the server's store is."""
    missing = tmp_path / "nosuchdir" / "feedbak.db"
    for argv in (
        ["feedback", "stats", str(missing)],
        ["feedback", "delete", f"sqlite:///{missing}", "abc123"],
        ["feedback", "export", str(missing), "--out", str(tmp_path / "out")],
    ):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{missing}: no feedback store" in err and "serve.feedback_store" in err, err
    assert not missing.parent.exists() and not (tmp_path / "out").exists()


def test_export_writes_the_prepared_preference_layout_and_rm_reads_the_store(store, tmp_path, capsys):
    from rlchat.stages import prepare_rm_data
    from rlchat.tokenizer import ChatTokenizer

    for i in range(30):
        store.add_preference([{"role": "user", "content": f"Feedback question {i}?"}], f"A kind answer {i}.",
                             f"Go away {i}.", model_version="v1" if i < 20 else "v2", client_text=True)  # fmt: skip
    out = tmp_path / "exported"
    # preferences by text are client text: left out of training and export unless asked for
    assert cli_main(["feedback", "export", store.url, "--out", str(out)]) == 2
    assert "--client-text" in capsys.readouterr().err
    assert load_records(store.url, "all") == []
    assert cli_main(["feedback", "export", store.url, "--out", str(out), "--client-text"]) == 0
    assert "kept 30 (train 27, val 3)" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"train.parquet", "val.parquet", "stats.json", "stats.png"}
    records = load_data_records(str(out), "all")  # the prepared-directory reader of every stage
    assert len(records) == 30 and all(r.is_preference for r in records)
    assert {r.meta["feedback"]["model_version"] for r in records} == {"v1", "v2"}
    assert all(r.meta["feedback"]["untrusted"] and r.source.startswith(store.display_url) for r in records)
    # the same records straight from the store, with the same seeded split
    client = Config().replace(**{"rm.feedback_client_text": True})
    from_store = load_records(store.url, "val", client)
    assert [r.chosen for r in from_store] == [r.chosen for r in load_data_records(str(out), "val")]
    only = tmp_path / "v2"
    assert (
        cli_main(["feedback", "export", store.url, "--out", str(only), "--model-version", "v2", "--client-text"]) == 0
    )
    assert len(load_data_records(str(only), "all")) == 10

    # rm.feedback takes the store URL itself
    cfg = Config().replace(**{"data.preferences": str(out)})
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    _, base = prepare_rm_data(cfg, tok, 64)
    _, counts = prepare_rm_data(cfg.replace(**{"rm.feedback": [store.url], "rm.feedback_client_text": True}), tok, 64)
    assert (counts["train"], counts["val"]) == (base["train"] + 27, base["val"] + 3)
    _, trusted = prepare_rm_data(cfg.replace(**{"rm.feedback": [store.url]}), tok, 64)
    assert (trusted["train"], trusted["val"]) == (base["train"], base["val"])


def test_rm_feedback_naming_a_missing_sqlite_file_is_refused_not_created(tmp_path, monkeypatch):
    """``rm.feedback=[feedbak.db]`` (a typo) made an empty store at that path and trained on no feedback with only a
    log line; reading a store for training must not create one."""
    from rlchat.stages import prepare_rm_data
    from rlchat.tokenizer import ChatTokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}) + "\n"
    )
    cfg = Config().replace(**{"data.preferences": "prefs.jsonl", "rm.feedback": ["runs/feedbak.db"]})
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    with pytest.raises(DataError, match=r"feedbak\.db: no feedback store there"):
        prepare_rm_data(cfg, tok, 64)
    from rlchat.stages import run_rm

    with pytest.raises(DataError, match=r"feedbak\.db: no feedback store there"):  # before any run directory
        run_rm(cfg, run_dir="rm_run", quiet=True, use_ray=False)
    assert not (tmp_path / "rm_run").exists()
    with pytest.raises(DataError, match="no feedback store there"):
        load_records("sqlite:///runs/feedbak.db", "train", cfg)
    assert not (tmp_path / "runs").exists()
    # a URL's percent-encoded path is the file SQLAlchemy opens ("my dir"), not the literal "my%20dir"
    (tmp_path / "my dir").mkdir()
    spaced = FeedbackStore(f"sqlite:///{tmp_path / 'my dir' / 'fb.db'}")
    spaced.record_request("r0", model_version="v", n_choices=1)
    spaced.close()
    assert (tmp_path / "my dir" / "fb.db").is_file()
    assert load_records(f"sqlite:///{tmp_path / 'my%20dir' / 'fb.db'}", "train", cfg) == []


def test_transcripts_retention_scrubbing_and_deleting_a_conversation(store_url):
    day = 86400.0
    now = time.time()
    off = FeedbackStore(store_url)  # transcripts off: requests are counted, no text is kept
    off.record_request("r0", model_version="v", n_choices=1, messages=PROMPT, replies=["4"], now=now)
    assert off.rows("transcripts") == [] and len(off.rows("requests")) == 1
    off.close()

    store = FeedbackStore(store_url, transcripts=True, transcript_retention_days=7.0, scrub=True)
    mail = [{"role": "user", "content": "I am ann@example.org, call me on +1 415 555 0100"}]
    store.record_request("r1", model_version="v", n_choices=1, messages=mail, replies=["Hi ann@example.org"],
                         conversation_id="conv-a", now=now - 8 * day)  # fmt: skip
    store.record_request("r2", model_version="v", n_choices=2, messages=mail, replies=["ok", None],
                         conversation_id="conv-a", now=now)  # fmt: skip
    store.record_request("r3", model_version="v", n_choices=1, messages=PROMPT, replies=["4"], now=now)
    store.add_rating("r1", 0, "down", mail, "Hi ann@example.org", model_version="v", client_text=False)
    store.add_rating("r2", 0, "up", PROMPT, "ok", model_version="v", client_text=False)
    store.add_rating("r3", 0, "down", PROMPT, "no", model_version="v", client_text=False)  # pairs with r2's "up"
    rows = store.rows("transcripts")
    assert rows[0]["messages"] == [{"role": "user", "content": "I am [email], call me on [phone]"}]
    assert rows[0]["replies"] == ["Hi [email]"] and rows[1]["replies"] == ["ok", None]
    assert "ann@example.org" not in json.dumps(store.rows("ratings"))  # feedback text is scrubbed too

    assert store.prune(now) == {"transcripts": 1, "requests": 0}  # r1 is past 7 days; request rows: no retention
    assert [r["request_id"] for r in store.rows("transcripts")] == ["r2", "r3"]
    assert len(store.rows("requests")) == 4  # the request counts (no text) stay

    # delete by conversation id: its transcripts, requests, reply digests, ratings and the pair built from its rating
    assert {r["request_id"] for r in store.rows("replies")} == {"r0", "r1", "r2", "r3"}
    assert store.delete_conversation("conv-a") == {
        "transcripts": 1,
        "requests": 2,
        "replies": 2,
        "ratings": 2,
        "pairs": 1,
    }
    assert {r["request_id"] for r in store.rows("replies")} == {"r0", "r3"}  # no digest of its replies is left
    assert [r["request_id"] for r in store.rows("transcripts")] == ["r3"]
    # ... or, from the CLI, by the id of one of its completions (a conversation without a client-sent id)
    assert cli_main(["feedback", "delete", store.url, "r3"]) == 0
    assert store.rows("transcripts") == [] and store.rows("ratings") == []
    assert [r["request_id"] for r in store.rows("requests")] == ["r0"]
    store.close()


def test_deleting_an_id_that_matches_nothing_says_so_and_exits_1(store_url, capsys):
    """A deletion request with a mistyped id must not look done: "deleted ...: 0 transcripts" with exit 0 told a
    user (or a privacy script) that a conversation was gone when nothing had matched."""
    store = FeedbackStore(store_url)
    store.record_request("r0", model_version="v", n_choices=1, conversation_id="conv-a", messages=PROMPT)
    store.close()
    assert cli_main(["feedback", "delete", store_url, "conv-typo"]) == 1
    err = capsys.readouterr().err
    assert "conv-typo" in err and "nothing" in err and "deleted" not in err.replace("nothing deleted", "")
    assert cli_main(["feedback", "delete", store_url, "conv-a"]) == 0  # a real id still works, exit 0
    assert "deleted conversation 'conv-a'" in capsys.readouterr().out


def test_request_rows_past_their_retention_are_deleted_and_still_counted_in_stats(store_url):
    """A serving replica writes a request row and a reply digest per completion (~460 bytes with their indexes on
    SQLite: ~2 GB a day at 50 requests/s). Past ``serve.request_retention_days`` they are deleted; ``stats`` still
    counts them, once, however often prune runs."""
    day = 86400.0
    now = time.time()
    store = FeedbackStore(store_url, request_retention_days=7.0)
    store.record_request("old-a", model_version="a", n_choices=1, messages=PROMPT, replies=["4"], now=now - 8 * day)
    store.record_request("old-b", model_version="b", n_choices=1, messages=PROMPT, replies=["5"], now=now - 9 * day)
    store.record_request("older-a", model_version="a", n_choices=1, now=now - 30 * day)
    store.record_request("new-a", model_version="a", n_choices=1, messages=PROMPT, replies=["6"], now=now)
    store.add_rating("old-a", 0, "up", PROMPT, "4", model_version="default", client_text=True)
    assert store.rows("ratings")[-1]["client_text"] is False  # its digest verified the text
    before = {s.model_version: (s.requests, s.up) for s in store.stats()}
    assert before == {"a": (3, 1), "b": (1, 0)}

    assert store.prune(now) == {"transcripts": 0, "requests": 3}
    assert [r["request_id"] for r in store.rows("requests")] == ["new-a"]
    assert {s.model_version: (s.requests, s.up) for s in store.stats()} == before
    assert store.prune(now) == {"transcripts": 0, "requests": 0}  # nothing counted twice
    assert {s.model_version: (s.requests, s.up) for s in store.stats()} == before

    # the pruned reply's digest went with it: a late rating sending its text back is client text, under the
    # caller's label; a kept reply is still verified and labelled by the version that served it
    store.add_rating("old-b", 0, "down", PROMPT, "5", model_version="default", client_text=True)
    late = store.rows("ratings")[-1]
    assert (late["client_text"], late["model_version"]) == (True, "default")
    store.add_rating("new-a", 0, "down", PROMPT, "6", model_version="default", client_text=True)
    kept = store.rows("ratings")[-1]
    assert (kept["client_text"], kept["model_version"]) == (False, "a")

    # a store that keeps every row (the CLI's, which does not know the server's setting) deletes none
    store.record_request("old-c", model_version="c", n_choices=1, now=now - 40 * day)
    keeper = FeedbackStore(store_url)
    assert keeper.prune(now) == {"transcripts": 0, "requests": 0}
    assert "old-c" in {r["request_id"] for r in keeper.rows("requests")}
    keeper.close()
    store.close()

    # two replicas pruning at once count each deleted row once
    replicas = [FeedbackStore(store_url, request_retention_days=7.0) for _ in range(2)]
    for r in replicas:
        r.schema_version()  # opened (which prunes once), so the two prunes below start together
    old = [RequestRecord(f"d{i}", "d", 1, created_at=now - 10 * day) for i in range(300)]
    writer = FeedbackStore(store_url)
    writer.record_requests([*old, RequestRecord("old-c2", "c", 1, created_at=now - 40 * day)])
    writer.close()
    start = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        pruned = list(pool.map(lambda r: (start.wait(), r.prune(now)["requests"])[1], replicas))
    assert sum(pruned) == 301
    counted = {s.model_version: s.requests for s in replicas[0].stats()}
    assert counted == {"a": 3, "b": 1, "c": 2, "d": 300, "default": 0}  # "default": the late rating's label
    for r in replicas:
        r.close()


# --------------------------------------------------------------------------------------------------------------
# The Serve endpoint (slow: Serve deployments on the session's local Ray)
# --------------------------------------------------------------------------------------------------------------


def test_deleting_a_conversation_after_its_request_rows_were_pruned_still_deletes_its_ratings_and_pairs(store_url):
    """Ratings and pairs name completion ids, not conversations: the request rows that map a conversation to its
    completions are pruned after ``serve.request_retention_days``, while the ratings (training data) stay. Deleting
    the conversation later must still find them, by its id or by one of its completion ids."""
    day = 86400.0
    now = time.time()
    store = FeedbackStore(store_url, request_retention_days=7.0)
    for rid, conv, reply in (("a1", "conv-a", "4"), ("a2", "conv-a", "5"), ("b1", "conv-b", "6")):
        store.record_request(rid, model_version="v", n_choices=1, messages=PROMPT, replies=[reply],
                             conversation_id=conv, now=now - 8 * day)  # fmt: skip
    store.record_request("c1", model_version="v", n_choices=1, messages=PROMPT, replies=["7"], now=now - 8 * day)
    store.add_rating("a1", 0, "up", PROMPT, "4", model_version="v", client_text=False)
    assert store.add_rating("a2", 0, "down", PROMPT, "5", model_version="v", client_text=False) is not None
    other = [{"role": "user", "content": "And 3 + 4?"}]  # no pair with conv-a's ratings
    store.add_rating("b1", 0, "up", other, "6", model_version="v", client_text=False)
    store.add_rating("c1", 0, "up", other, "7", model_version="v", client_text=False)
    assert store.prune(now)["requests"] == 4 and store.rows("requests") == []

    deleted = store.delete_conversation("conv-a")  # its reply digests went with its request rows
    assert deleted == {"transcripts": 0, "requests": 0, "replies": 0, "ratings": 2, "pairs": 1}
    assert sorted(r["request_id"] for r in store.rows("ratings")) == ["b1", "c1"] and store.rows("pairs") == []
    # a conversation without a client-sent id is deleted by the id of one of its completions, as before pruning
    assert store.delete_conversation("c1")["ratings"] == 1
    assert [r["request_id"] for r in store.rows("ratings")] == ["b1"]
    assert store.delete_conversation("b1")["ratings"] == 1 and store.rows("ratings") == []
    store.close()


@pytest.fixture(scope="session")
def app(ray_local, tmp_path_factory) -> testing.TestApp:
    """The session's shared Serve app (SQLite store, transcripts on; deployed once, whichever module asks first)."""
    yield testing.shared_app(tmp_path_factory.mktemp("serve_app"))
    testing.shutdown()


def _auth(app: testing.TestApp) -> dict[str, str]:
    return {"Authorization": f"Bearer {app.api_key}"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_feedback_answers_503_with_retry_after_while_chat_completions_go_on(app, backend, tmp_path):
    from ray import serve as ray_serve

    if backend == "sqlite":
        blocked = tmp_path / "feedback.db"
        blocked.mkdir()  # SQLite cannot open a directory: the store is "down"
        url = f"sqlite:///{blocked}"
    else:
        url = f"postgresql://rlchat@127.0.0.1:{testing.free_port()}/rlchat"  # nothing listens there
    name = f"down-{backend}"
    base = testing.deploy(app.checkpoint, name=name, route_prefix=f"/{name}", api_key=app.api_key, num_cpus=0,
                          feedback_store=url, max_tokens=16)  # fmt: skip
    try:
        rating = {"completion_id": "chatcmpl-x", "rating": "up", "messages": PROMPT, "content": "4"}
        for body in (rating, {"prompt": PROMPT, "chosen": "4", "rejected": "5"}):
            r = requests.post(base + "/v1/feedback", json=body, headers=_auth(app), timeout=60)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == str(RETRY_AFTER_S)
            err = r.json()["error"]
            assert err["code"] == "feedback_store_unavailable" and "not recorded" in err["message"], err
        chat = {"messages": PROMPT, "max_tokens": 4}
        for stream in (False, True):
            r = requests.post(base + "/v1/chat/completions", json={**chat, "stream": stream}, headers=_auth(app),
                              timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
        assert requests.get(base + "/readyz", timeout=30).status_code == 200
    finally:
        ray_serve.delete(name)


@pytest.mark.slow
def test_served_chats_are_counted_and_transcribed_and_a_conversation_can_be_deleted(app):
    conv = f"conv-{time.time_ns()}"
    headers = {**_auth(app), "X-RLChat-Conversation-Id": conv}
    messages = [{"role": "user", "content": "Reach me at zoe@example.com please."}]
    ids = []
    for stream in (False, True):
        r = requests.post(app.url + "/v1/chat/completions", headers=headers, timeout=120, stream=stream,
                          json={"messages": messages, "max_tokens": 4, "stream": stream})  # fmt: skip
        assert r.status_code == 200
        ids.append(r.headers["X-RLChat-Completion-Id"])
        r.content  # noqa: B018 - read the stream to its end
    store = FeedbackStore(app.feedback_store)
    deadline = time.monotonic() + 60  # rows are written in the background, after the response
    while time.monotonic() < deadline:
        rows = [t for t in store.rows("transcripts") if t["conversation_id"] == conv]
        if len(rows) == 2:
            break
        time.sleep(0.5)
    assert sorted(t["request_id"] for t in rows) == sorted(ids)
    assert rows[0]["messages"] == [{"role": "user", "content": "Reach me at [email] please."}]  # scrub_pii is on
    requests_rows = [q for q in store.rows("requests") if q["conversation_id"] == conv]
    assert len(requests_rows) == 2 and {q["model_version"] for q in requests_rows} == {"tiny_ckpt"}
    assert store.delete_conversation(conv)["transcripts"] == 2
    assert not [t for t in store.rows("transcripts") if t["conversation_id"] == conv]
    store.close()


def test_record_requests_writes_a_batch_like_one_call_per_request(store):
    now = time.time()
    store.record_request("a", model_version="v", n_choices=2, withheld=1, conversation_id="c", messages=PROMPT,
                         replies=["4", None], now=now)  # fmt: skip
    store.record_requests([
        RequestRecord("b", "v", 2, 1, "c", PROMPT, ["4", None], now),
        RequestRecord("d", "w", 1, created_at=now),  # no conversation id: the request id
    ])  # fmt: skip
    reqs = {r["request_id"]: r for r in store.rows("requests")}
    assert set(reqs) == {"a", "b", "d"}
    for key in ("created_at", "conversation_id", "model_version", "n_choices", "withheld"):
        assert reqs["a"][key] == reqs["b"][key]
    assert reqs["d"]["conversation_id"] == "d" and reqs["d"]["model_version"] == "w"
    trans = {r["request_id"]: r for r in store.rows("transcripts")}
    assert set(trans) == {"a", "b"} and trans["a"]["replies"] == trans["b"]["replies"] == ["4", None]
    store.record_requests([])  # nothing to write: no transaction, no error
    assert len(store.rows("requests")) == 3


def test_the_replicas_completion_memory_is_bounded_by_text_not_only_by_count(tmp_path, monkeypatch):
    """A replica remembers recent completions so feedback can name them by id. Counted in entries alone, 2,048
    requests at the size limit (32,000 characters of messages, 16 long choices) held hundreds of MB per replica;
    the memory is also bounded by the characters it holds: the oldest go first, the newest always stays."""
    import serve.feedback as feedback
    from rlchat.config import ServeConfig

    monkeypatch.setattr(feedback, "COMPLETION_CACHE_CHARS", 3_000_000)
    rec = feedback.FeedbackRecorder(ServeConfig(feedback_store=f"sqlite:///{tmp_path / 'fb.db'}"))
    big = "x" * 500_000
    for i in range(10):
        rec.remember(f"r{i}", "v1", [{"role": "user", "content": big}], [big, None])
    assert list(rec._completions) == ["r7", "r8", "r9"]  # 1,000,000 characters each
    rec.remember("huge", "v1", [{"role": "user", "content": big * 8}], ["ok"])
    assert list(rec._completions) == ["huge"]
    for i in range(3):
        rec.remember(f"s{i}", "v1", [{"role": "user", "content": "hi"}], ["hello"])
    assert list(rec._completions) == ["s0", "s1", "s2"]  # the huge one alone was over the bound: it went next
    rec.store.close()


def test_replica_recorder_writes_queued_completions_in_batches(tmp_path):
    import threading

    from rlchat.config import ServeConfig
    from serve.feedback import FeedbackRecorder

    rec = FeedbackRecorder(ServeConfig(feedback_store=f"sqlite:///{tmp_path / 'fb.db'}", transcripts=True))
    gate, calls = threading.Event(), []
    real = rec.store.record_requests

    def held(records):  # the first write waits, as a slow database would, while completions keep coming
        calls.append(len(records))
        gate.wait(30)
        real(records)

    rec.store.record_requests = held
    for i in range(40):
        rec.remember(f"r{i}", "v1", [{"role": "user", "content": f"q{i}"}], [f"a{i}"])
    gate.set()
    deadline = time.monotonic() + 30
    while len(rec.store.rows("requests")) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(r["request_id"] for r in rec.store.rows("requests")) == sorted(f"r{i}" for i in range(40))
    assert sum(calls) == 40 and len(calls) <= 3  # the first row alone, then the rest that queued meanwhile
    assert {r["request_id"]: r["replies"] for r in rec.store.rows("transcripts")}["r7"] == ["a7"]
    rec.store.close()


def test_a_preference_by_ids_is_labelled_with_the_version_that_wrote_the_replies(tmp_path):
    """``/v1/feedback`` reaches a replica's default version whichever version served the replies; a rating was
    labelled with the version that wrote its reply, a preference by ids with the default one, so a canary's
    comparisons counted for the primary. (Found by review.)"""
    import asyncio
    import json

    from rlchat.config import ServeConfig
    from serve.feedback import FeedbackRecorder
    from serve.schemas import parse_feedback_request

    rec = FeedbackRecorder(ServeConfig(feedback_store=f"sqlite:///{tmp_path / 'fb.db'}"))
    rec.remember("c1", "canary", PROMPT, ["Four."])
    rec.remember("c2", "canary", PROMPT, ["Five."])
    body = {"chosen": {"completion_id": "c1"}, "rejected": {"completion_id": "c2"}}
    answer = asyncio.run(rec.record(parse_feedback_request(json.dumps(body).encode()), "primary"))
    assert answer["preference_written"] is True
    rec.close(10)
    assert [(r["kind"], r["model_version"]) for r in rec.store.rows("pairs")] == [("preference", "canary")]
    rec.store.close()


def test_a_completion_that_ends_after_the_recorder_closed_is_still_recorded(tmp_path):
    """Serve stops a replica (``__del__`` closes the recorder) once its requests are done or its graceful timeout is
    near; a request still finishing then remembered its completion through the writer thread that close() had shut
    down: a RuntimeError, a 500 for a finished reply, and the row lost. (Found by review.)"""
    from rlchat.config import ServeConfig
    from serve.feedback import FeedbackRecorder

    rec = FeedbackRecorder(ServeConfig(feedback_store=f"sqlite:///{tmp_path / 'fb.db'}"))
    rec.remember("early", "v1", PROMPT, ["Four."])
    assert rec.close(10)
    rec.remember("late", "v1", PROMPT, ["Five."])
    assert sorted(r["request_id"] for r in rec.store.rows("requests")) == ["early", "late"]
    rec.store.close()
