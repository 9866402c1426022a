"""The feedback store: user ratings, preference pairs, request counts and (opt-in) transcripts in one database.

The Serve endpoint writes here (``POST /v1/feedback``, one row per chat completion); the reward-model stage reads
the pairs back (``rm.feedback: [postgresql://...]``); ``rlchat feedback export|stats|delete`` inspect it. No Ray:
the core owns the store, ``serve/`` and the CLI use it.

Two back ends behind one URL (``serve.feedback_store``):

================================  ===========================================================================
``sqlite:///runs/feedback.db``    the embedded default (``feedback.db`` in the serve directory): WAL mode, so
                                  replicas on one node write concurrently; writers take the lock up front
                                  (``BEGIN IMMEDIATE``) and wait up to :data:`SQLITE_BUSY_TIMEOUT_S` for it.
                                  A relative path is taken from the directory the command runs in.
``postgresql://u:p@host/db``      clusters: every replica on every node writes into one server (psycopg 3).
================================  ===========================================================================

What is stored, and how (tables below): every row records the model version that served it and the time; every
feedback row is marked ``untrusted`` (it is what a user of the public endpoint said) and ``client_text`` says
whether its prompt/reply text came from the client rather than from the replica's own memory of the completion
(a client can send any text with a rating). All SQL goes through SQLAlchemy Core expressions with bound
parameters: no SQL string is ever built from user text.

Transactions and faults: each write (a rating together with the preference pair it completes; a request row with
its transcript) is one transaction, so a replica killed mid-write leaves no partial rows. A database that cannot be
reached (connection refused, timeout, a locked SQLite file past its busy timeout) raises :class:`StoreUnavailable`,
which the endpoint turns into ``503`` + ``Retry-After``: feedback is never dropped without the client being told.

Schema migrations: a small versioned list (:data:`MIGRATIONS`) applied in one transaction, recorded in
``rlchat_schema``. Why not Alembic: the schema is a handful of tables that the replicas themselves create on first
use, concurrently, on either back end; what that needs is "take a lock, read the version, apply the missing steps,
commit", which is 30 lines here (the lock: ``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), whereas Alembic would add a migration environment, a script directory shipped as package data and the same
locking on top. A database at a newer schema version than this code knows is refused with a clear message.

Privacy: transcripts are written only with ``serve.transcripts: true`` and deleted after
``serve.transcript_retention_days`` (:meth:`FeedbackStore.prune`, run when the store opens and hourly while
serving); ``serve.scrub_pii`` replaces e-mail addresses and phone numbers (:func:`scrub_pii`) in every text the
store writes, feedback included; :meth:`FeedbackStore.delete_conversation` (``rlchat feedback delete URL ID``)
deletes one conversation: its transcripts, request rows, ratings and the pairs built from them.

Size: the row and reply digest each served completion leaves (~460 bytes with their indexes on SQLite) are deleted
after ``serve.request_retention_days`` by the same prune, their number kept per model version for :meth:`stats`.
Ratings and preference pairs are training data and are never pruned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from rlchat.core.errors import ConfigError, DataError, RLChatError

if TYPE_CHECKING:
    from rlchat.core.config import Config
    from rlchat.core.data import Collector, Record

logger = logging.getLogger(__name__)

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
"""A bare path with one of these suffixes names a SQLite store (``rm.feedback: [runs/feedback.db]``)."""
DEFAULT_SQLITE_NAME = "feedback.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for another replica's write lock before the store reports itself unavailable."""
PG_CONNECT_TIMEOUT_S = 5
"""PostgreSQL connect timeout: an unreachable server fails a feedback request within this, it does not hang it."""
PRUNE_INTERVAL_S = 3600.0
"""While serving, expired transcripts and request rows are deleted at most this often (and once when the store
opens)."""
RETRY_AFTER_S = 10
"""What ``Retry-After`` tells a client whose feedback could not be stored."""
SOURCE_API = "/v1/feedback"
MIGRATION_LOCK_ID = 0x726C63686174  # "rlchat": the advisory lock PostgreSQL replicas take to migrate one at a time

UP, DOWN = "up", "down"


class StoreUnavailable(RLChatError):
    """The feedback database cannot be reached or is busy; nothing was written. Retry later."""


class InvalidFeedback(RLChatError, ValueError):
    """Feedback that cannot become a usable preference pair (empty or identical replies, a bad prompt)."""


class AlreadyRated(InvalidFeedback):
    """The reply (completion id and choice) was rated before, or the comparison of two served replies was recorded
    before; nothing was written.

    Attributes:
        same: the earlier rating is the same one (a retry: the API answers it as already recorded); else the
            rating would change, which is refused (ratings are final, as on the web page).
    """

    def __init__(self, message: str, same: bool) -> None:
        super().__init__(message)
        self.same = same


# --------------------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------------------


def is_store_url(value: str) -> bool:
    """Whether ``value`` names a feedback store (a database URL or a ``.db`` file) rather than a data file."""
    return value.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgres://")) or (
        "://" not in value and value.endswith(SQLITE_SUFFIXES)
    )


def resolve_store_url(value: str, base: str | Path | None = None) -> str:
    """The canonical URL of a store: SQLite paths absolute (replicas and Ray workers run in other directories),
    PostgreSQL URLs as given (``postgres://`` spelled ``postgresql://``).

    Args:
        value: ``sqlite:///path.db``, a bare ``path.db``, or ``postgresql://user:password@host:port/db``.
        base: directory a relative SQLite path is taken from (default: the current directory).

    Raises:
        ConfigError: anything else.
    """
    if value.startswith("postgres://"):
        value = "postgresql://" + value.removeprefix("postgres://")
    if value.startswith(("postgresql://", "postgresql+psycopg://")):
        return value
    if value.startswith("sqlite:///"):
        path_part, _, query = value.removeprefix("sqlite:///").partition("?")
    elif "://" not in value and value.endswith(SQLITE_SUFFIXES):
        path_part, query = value, ""
    else:
        raise ConfigError(
            f"feedback store {value!r}: expected postgresql://USER:PASSWORD@HOST:PORT/DB, sqlite:///PATH.db or a "
            f"path ending in {', '.join(SQLITE_SUFFIXES)}"
        )
    if not path_part or path_part == ":memory:":
        raise ConfigError(
            f"feedback store {value!r}: expected a database file (sqlite:///feedback.db); an in-memory database "
            "would be lost with the process and is not shared between replicas"
        )
    path = Path(path_part).expanduser()
    if not path.is_absolute():
        path = (Path(base) if base is not None else Path.cwd()).joinpath(path).resolve()
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def default_store_url(feedback_path: str | Path) -> str:
    """``sqlite:///<directory of serve.feedback_path>/feedback.db``: the laptop default, no set-up needed."""
    return resolve_store_url(str(Path(feedback_path).expanduser().parent / DEFAULT_SQLITE_NAME))


def existing_store_url(url: str) -> str:
    """The store's canonical URL, refusing a SQLite file that is not there: readers (``rlchat feedback stats`` /
    ``export`` / ``delete``, ``rm.feedback`` for training) must not create an empty store (and its directories) at a
    misspelled path and then report, or train on, nothing from it.

    Raises:
        DataError: the SQLite file does not exist.
    """
    url = resolve_store_url(url)
    if url.startswith("sqlite:///"):
        path = Path(sa.engine.make_url(url).database or "")  # the file SQLAlchemy opens (percent-decoded)
        if not path.is_file():
            raise DataError(
                f"{path}: no feedback store there (no such file); give the one `rlchat serve` writes "
                "(serve.feedback_store: by default feedback.db in the directory it ran in) or its postgresql:// URL"
            )
    return url


def display_url(url: str) -> str:
    """The URL with its password hidden (for logs and printed tables)."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------------------------------------------
# Pure pieces: scrubbing, pair validation, the Wilson interval
# --------------------------------------------------------------------------------------------------------------

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE_CANDIDATE_RE = re.compile(r"(?<![\w+])(?:\+|00)?\(?\d[\d \t().\-/]{5,}\d(?![\w])")
ISO_DATE_RE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}")


def _is_phone(candidate: str) -> bool:
    """A phone-number heuristic: 9-15 digits (E.164 allows 15), not an ISO date, and, when dots separate the
    groups, no group longer than 4 digits (so ``3.14159265`` stays a number and ``555.123.4567`` is a phone)."""
    digits = sum(c.isdigit() for c in candidate)
    if not 9 <= digits <= 15 or ISO_DATE_RE.search(candidate):
        return False
    return not ("." in candidate and any(len(g) > 4 for g in re.findall(r"\d+", candidate)))


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses with ``[email]`` and phone numbers with ``[phone]``.

    A regex heuristic, not a guarantee: it catches the common written forms (``a.b@example.co.uk``,
    ``+44 20 7946 0958``, ``(555) 123-4567``, ``555.123.4567``, ``00491511234567``) and leaves short numbers,
    dates, prices and decimals alone; seven-digit local numbers without an area code are not caught.
    """
    text = EMAIL_RE.sub("[email]", text)
    return PHONE_CANDIDATE_RE.sub(lambda m: "[phone]" if _is_phone(m.group(0)) else m.group(0), text)


def _scrub_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{**m, "content": scrub_pii(m["content"])} for m in messages]


def check_preference(
    prompt: Sequence[dict[str, str]], chosen: str | Sequence[dict[str, str]], rejected: str | Sequence[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Validate a pair the way ``rlchat data`` reads one; return its (prompt, chosen, rejected) message lists.

    Raises:
        InvalidFeedback: the pair would not read back (empty reply, identical replies, a bad prompt).
    """
    from rlchat.core.data import parse_record

    obj = {"prompt": list(prompt), "chosen": chosen, "rejected": rejected}
    try:
        rec = parse_record(obj, source="feedback", fmt="preference")
    except ValueError as e:
        raise InvalidFeedback(str(e)) from None
    if rec.chosen is None or rec.rejected is None:  # parse_record guarantees both for fmt="preference"
        raise InvalidFeedback("chosen and rejected are both required")
    return rec.messages, rec.chosen, rec.rejected


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default ``z``).

    Why Wilson rather than the normal approximation ``p ± z·sqrt(p(1-p)/n)``: with the few ratings a canary gets,
    and rates near 0 or 1, the normal interval leaves [0, 1] or collapses to a point; Wilson's stays inside and keeps
    its coverage (Brown, Cai & DasGupta 2001, https://doi.org/10.1214/ss/1009213286).

    Returns:
        (low, high); (0.0, 1.0) when ``n == 0``.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _reply_digest(prompt_key: str, reply: str) -> str:
    """What a served reply is recognised by: its (stored) text under its prompt's key."""
    return hashlib.sha256(f"{prompt_key}\n{reply}".encode()).hexdigest()


def _prompt_key(prompt: Sequence[dict[str, str]]) -> str:
    """A fixed-size key of a prompt (thumbs ratings of the same prompt are matched on it, through an index)."""
    canonical = json.dumps(list(prompt), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------------------------------------------

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY
metadata = sa.MetaData()

schema_table = sa.Table(
    "rlchat_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.Float, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
)
requests_table = sa.Table(  # one row per chat completion: the analytics, no text
    "rlchat_requests",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("request_id", sa.Text, nullable=False, index=True),
    sa.Column("conversation_id", sa.Text, nullable=False, index=True),
    sa.Column("model_version", sa.Text, nullable=False, index=True),
    sa.Column("n_choices", sa.Integer, nullable=False),
    sa.Column("withheld", sa.Integer, nullable=False),
)
transcripts_table = sa.Table(  # opt-in (serve.transcripts); deleted after serve.transcript_retention_days
    "rlchat_transcripts",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("request_id", sa.Text, nullable=False, index=True),
    sa.Column("conversation_id", sa.Text, nullable=False, index=True),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("messages", sa.JSON, nullable=False),
    sa.Column("replies", sa.JSON, nullable=False),
)
ratings_table = sa.Table(
    "rlchat_ratings",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("request_id", sa.Text, nullable=False, index=True),
    sa.Column("choice_index", sa.Integer, nullable=False),
    sa.Column("rating", sa.String(4), nullable=False),
    sa.Column("prompt", sa.JSON, nullable=False),
    sa.Column("prompt_key", sa.String(64), nullable=False, index=True),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False, index=True),
    sa.Column("client_text", sa.Boolean, nullable=False),
    sa.Column("untrusted", sa.Boolean, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
)
replies_table = sa.Table(  # a digest of each served reply and its prompt: verifies reply text a client sends back
    "rlchat_replies",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.Text, nullable=False, index=True),
    sa.Column("choice_index", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
)
pruned_requests_table = sa.Table(  # per model version: request rows deleted past their retention (stats count them)
    "rlchat_pruned_requests",
    metadata,
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
)
rated_conversations_table = sa.Table(  # the conversation of each rated completion whose request row was pruned
    "rlchat_rated_conversations",
    metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("conversation_id", sa.Text, nullable=False, index=True),
)
pairs_table = sa.Table(  # preference pairs in the record format of `rlchat data` (prompt / chosen / rejected)
    "rlchat_pairs",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # "thumbs" (two opposite ratings) or "preference"
    sa.Column("prompt", sa.JSON, nullable=False),
    sa.Column("chosen", sa.JSON, nullable=False),
    sa.Column("rejected", sa.JSON, nullable=False),
    sa.Column("chosen_id", sa.Text, nullable=True, index=True),
    sa.Column("rejected_id", sa.Text, nullable=True, index=True),
    sa.Column("model_version", sa.Text, nullable=False, index=True),
    sa.Column("client_text", sa.Boolean, nullable=False),
    sa.Column("untrusted", sa.Boolean, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    """One schema step: ``apply(connection)`` runs inside the migration transaction."""

    version: int
    description: str
    tables: tuple[sa.Table, ...]

    def apply(self, conn: sa.Connection) -> None:
        for table in self.tables:
            table.create(conn)


MIGRATIONS: tuple[Migration, ...] = (
    # When a later step changes one of these tables (an ALTER TABLE in its own Migration), copy the version-1
    # definitions into this step first, so a fresh database still replays the history step by step.
    Migration(
        1,
        "requests, transcripts, ratings and preference pairs",
        (requests_table, transcripts_table, ratings_table, pairs_table),
    ),
    Migration(
        2,
        "reply digests: reply text a client sends with a rating is checked against what the server answered",
        (replies_table,),
    ),
    Migration(
        3,
        "counts of request rows deleted past serve.request_retention_days, per model version",
        (pruned_requests_table,),
    ),
    Migration(
        4,
        "the conversation of a rated completion outlives its request row, so deleting the conversation later still "
        "finds its ratings and pairs",
        (rated_conversations_table,),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


# --------------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------------

_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
"""Errors that mean "cannot reach / use the database right now" (not a bug of ours): refused or dropped
connections, timeouts, a SQLite file that cannot be opened or stays locked past the busy timeout."""


@dataclass(frozen=True)
class VersionStats:
    """The A/B read-out of one model version (``rlchat feedback stats``)."""

    model_version: str
    requests: int
    """Chat completions served."""
    ratings: int
    up: int
    down: int
    pairs: int
    """Preference pairs (each checked to read back with ``rlchat data``'s reader when it was written)."""

    @property
    def up_rate(self) -> float | None:
        return self.up / self.ratings if self.ratings else None

    @property
    def up_rate_ci(self) -> tuple[float, float]:
        """95% Wilson interval of the thumbs-up rate."""
        return wilson_interval(self.up, self.ratings)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.up_rate_ci
        return {
            "model_version": self.model_version,
            "requests": self.requests,
            "ratings": self.ratings,
            "up": self.up,
            "down": self.down,
            "up_rate": self.up_rate,
            "up_rate_ci95": [low, high],
            "pairs": self.pairs,
        }


def _set_wal(cur: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock.

    Why a loop: switching a fresh database file to WAL needs an exclusive lock, and SQLite answers "database is
    locked" at once for it instead of waiting on the busy timeout; several replicas opening the file together
    (measured: 1 run in 2 of the four-thread first-use test under CI load) would otherwise fail their first request.
    """
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@dataclass(frozen=True)
class RequestRecord:
    """One served chat completion for :meth:`FeedbackStore.record_requests` (the arguments of
    :meth:`FeedbackStore.record_request`; ``created_at`` None = the time of the write)."""

    request_id: str
    model_version: str
    n_choices: int
    withheld: int = 0
    conversation_id: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    replies: Sequence[str | None] | None = None
    created_at: float | None = None


class FeedbackStore:
    """One feedback database (SQLite or PostgreSQL); thread-safe, one per process.

    Nothing connects until the first call, so a replica starts (and serves chat) while its database is down; the
    schema is created or migrated on the first call that reaches the database.

    Args:
        url: see :func:`resolve_store_url` (resolved here too: a relative SQLite path is taken from the cwd).
        transcripts: write transcripts in :meth:`record_request` (``serve.transcripts``).
        transcript_retention_days: delete transcripts older than this (:meth:`prune`); None never prunes (the CLI,
            which does not know the server's setting).
        request_retention_days: delete request rows and reply digests older than this, counting them per model
            version (:meth:`prune`); None keeps them.
        scrub: scrub e-mail addresses and phone numbers from every text written (``serve.scrub_pii``).
    """

    def __init__(
        self,
        url: str,
        *,
        transcripts: bool = False,
        transcript_retention_days: float | None = None,
        request_retention_days: float | None = None,
        scrub: bool = False,
    ) -> None:
        self.url = resolve_store_url(url)
        self.transcripts = transcripts
        self.retention_days = transcript_retention_days
        self.request_retention_days = request_retention_days
        self.scrub = scrub
        self.backend = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        self._engine: sa.Engine | None = None
        self._lock = threading.RLock()  # the engine is created lazily under it, inside _ensure_schema too
        self._schema_ready = False
        self._next_prune = 0.0

    def __repr__(self) -> str:
        return f"FeedbackStore({display_url(self.url)!r})"

    @property
    def display_url(self) -> str:
        return display_url(self.url)

    # ------------------------------------------------------------------------------------------ connection
    def _make_engine(self) -> sa.Engine:
        if self.backend == "sqlite":
            path = Path(sa.engine.make_url(self.url).database or "")
            path.parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

            @sa.event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _: Any) -> None:
                # SQLAlchemy's documented recipe: take transaction control from the sqlite3 module (which would not
                # BEGIN before a SELECT), then BEGIN ourselves below.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
                _set_wal(cur)  # readers never block the writer; replicas share the file
                cur.execute("PRAGMA synchronous = FULL")  # a committed rating survives a power cut too
                cur.close()

            @sa.event.listens_for(engine, "begin")
            def _on_begin(conn: sa.Connection) -> None:
                # IMMEDIATE: take the write lock at BEGIN. A rating reads (its partner) then writes; with a plain
                # deferred BEGIN two replicas could both read, then deadlock upgrading to the write lock, which
                # SQLite reports at once as "database is locked" instead of waiting for the busy timeout.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        url = sa.engine.make_url(self.url).set(drivername="postgresql+psycopg")
        return sa.create_engine(
            url,
            pool_pre_ping=True,  # a server restart leaves dead pooled connections: test each one before use
            pool_size=4,
            max_overflow=8,
            pool_timeout=PG_CONNECT_TIMEOUT_S * 2,
            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S, "application_name": "rlchat"},
        )

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    try:
                        self._engine = self._make_engine()
                    except OSError as e:  # the SQLite file's directory cannot be created
                        raise StoreUnavailable(f"feedback store {self.display_url}: {e}") from e
        return self._engine

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        """One transaction (committed on exit, rolled back on error); database outages become StoreUnavailable."""
        self._ensure_schema()
        try:
            with self.engine.begin() as conn:
                yield conn
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"feedback store {self.display_url} is unavailable: {_short(e)}") from e
        except sa_exc.DataError as e:  # a value the database cannot hold (PostgreSQL: a NUL in an id): the caller's
            raise InvalidFeedback(f"feedback store {self.display_url} cannot hold this value: {_short(e)}") from e

    def _ensure_schema(self) -> None:
        """Create or migrate the schema once per process (retried on the next call after a failure)."""
        if self._schema_ready:
            return
        with self._lock:
            if self._schema_ready:
                return
            try:
                with self.engine.begin() as conn:
                    version = self._migrate(conn)
            except _UNAVAILABLE as e:
                raise StoreUnavailable(f"feedback store {self.display_url} is unavailable: {_short(e)}") from e
            logger.info("feedback store %s: schema version %d", self.display_url, version)
            self._schema_ready = True
        self.prune()

    def _migrate(self, conn: sa.Connection) -> int:
        """Apply the missing :data:`MIGRATIONS` in the caller's transaction; return the schema version."""
        if self.backend == "postgresql":
            # Replicas start together: one migrates, the others wait here, then find the work done.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_ID)))
        schema_table.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar() or 0
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"feedback store {self.display_url}: schema version {current} is newer than this rlchat knows "
                f"({SCHEMA_VERSION}); upgrade rlchat on this machine"
            )
        for m in MIGRATIONS:
            if m.version > current:
                m.apply(conn)
                conn.execute(
                    sa.insert(schema_table).values(
                        version=m.version, applied_at=time.time(), description=m.description
                    )
                )
                current = m.version
        return current

    def schema_version(self) -> int:
        with self._transaction() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar() or 0)

    def close(self) -> None:
        """Close pooled connections (the store reconnects on next use)."""
        if self._engine is not None:
            self._engine.dispose()

    # ------------------------------------------------------------------------------------------ writes
    def _text(self, text: str) -> str:
        text = _no_nul(text)
        return scrub_pii(text) if self.scrub else text

    def _messages(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        plain = [{"role": m["role"], "content": _no_nul(m["content"])} for m in messages]
        return _scrub_messages(plain) if self.scrub else plain

    def add_rating(
        self,
        request_id: str,
        choice_index: int,
        rating: str,
        prompt: Sequence[dict[str, str]],
        content: str,
        *,
        model_version: str,
        client_text: bool,
        now: float | None = None,
    ) -> dict[str, Any] | None:
        """Record a thumbs rating; when the same prompt already has the opposite rating on a different reply (a
        regenerated answer rated the other way), also write the preference pair they make, in the same
        transaction. A reply (``request_id``, ``choice_index``) is rated once: a retry must not count one
        comparison twice in the reward model's data.

        Returns:
            The pair written (``{"prompt", "chosen", "rejected", "feedback"}``), or None.

        Raises:
            InvalidFeedback: ``rating`` is not up/down.
            AlreadyRated: the reply was rated before (the same way, or the other way); nothing was written.
            StoreUnavailable: nothing was written.
        """
        if rating not in (UP, DOWN):
            raise InvalidFeedback(f"rating={rating!r}: expected 'up' or 'down'")
        prompt_msgs = self._messages(prompt)
        content = self._text(content)
        key = _prompt_key(prompt_msgs)
        # Scrubbing can make two real prompts one text ("call [phone]"); a thumbs pair must compare replies to the
        # same prompt, and a scrubbed prompt's identity is gone (a hash of the original would let anyone holding
        # the store recover a phone number by trying them all). Such a rating is kept and never paired: it gets a
        # pairing key of its own.
        plain = [{"role": m["role"], "content": _no_nul(m["content"])} for m in prompt]
        scrubbed = self.scrub and prompt_msgs != plain
        pair_key = f"scrubbed:{uuid.uuid4().hex}" if scrubbed else key
        now = time.time() if now is None else now
        r = ratings_table.c
        with self._transaction() as conn:
            self._lock_prompt(conn, key)
            earlier = conn.execute(  # under the prompt's lock: a retry racing its original on another replica
                sa.select(r.rating)
                .where(r.request_id == request_id, r.choice_index == choice_index)
                .order_by(r.id)
                .limit(1)
            ).first()
            if earlier is not None:
                same = earlier.rating == rating
                raise AlreadyRated(
                    f"completion {request_id} choice {choice_index} was already rated {earlier.rating!r}"
                    + ("" if same else "; ratings are final"),
                    same,
                )
            # the version that served the request labels its rating (the caller may know only its default one)
            q, d = requests_table.c, replies_table.c
            served = conn.execute(sa.select(q.model_version).where(q.request_id == request_id).limit(1)).first()
            if served is not None:
                model_version = str(served.model_version)
            if client_text and (
                conn.execute(
                    sa.select(d.id)
                    .where(
                        d.request_id == request_id,
                        d.choice_index == choice_index,
                        d.digest == _reply_digest(key, content),
                    )
                    .limit(1)
                ).first()
                is not None
            ):
                client_text = False  # the text and its prompt are what this server answered
            partner = conn.execute(
                sa.select(r.request_id, r.content, r.client_text)
                .where(r.prompt_key == pair_key, r.rating != rating, r.content != content)
                .order_by(r.id.desc())
                .limit(1)
            ).first()
            conn.execute(
                sa.insert(ratings_table).values(
                    created_at=now,
                    request_id=request_id,
                    choice_index=choice_index,
                    rating=rating,
                    prompt=prompt_msgs,
                    prompt_key=pair_key,
                    content=content,
                    model_version=model_version,
                    client_text=client_text,
                    untrusted=True,
                    source=SOURCE_API,
                )
            )
            if partner is None:
                return None
            this, other = (request_id, content), (str(partner.request_id), str(partner.content))
            up, down = (this, other) if rating == UP else (other, this)
            try:
                p, chosen, rejected = check_preference(prompt_msgs, up[1], down[1])
            except InvalidFeedback:
                return None  # e.g. an empty reply: the rating is kept, no pair is formed
            if self._recorded_comparison(conn, p, chosen, rejected, up[0], down[0]) is not None:
                return None  # compared already (a preference by ids): a copy would count twice, a reverse contradict
            client = client_text or bool(partner.client_text)  # either side's text may have come from a client
            return self._insert_pair(conn, p, chosen, rejected, "thumbs", up[0], down[0], model_version, client, now)

    def add_preference(
        self,
        prompt: Sequence[dict[str, str]],
        chosen: str,
        rejected: str,
        *,
        model_version: str,
        client_text: bool,
        chosen_id: str | None = None,
        rejected_id: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Record an explicit preference (by completion ids or by text).

        Returns:
            The pair written.

        Raises:
            InvalidFeedback: the pair would not read back with ``rlchat data`` (checked after scrubbing).
            AlreadyRated: by completion ids, this comparison or its reverse was recorded before; nothing was written.
            StoreUnavailable: nothing was written.
        """
        p, c, r = check_preference(self._messages(prompt), self._text(chosen), self._text(rejected))
        with self._transaction() as conn:
            if chosen_id is not None and rejected_id is not None:
                # recorded once: a retry, or the reverse (by ids or by thumbs), would weigh twice in the reward
                # model's data (thumbs after a preference form no pair either: add_rating)
                self._lock_prompt(conn, _prompt_key(p))
                found = self._recorded_comparison(conn, p, c, r, chosen_id, rejected_id)
                if found == "same":
                    raise AlreadyRated(
                        f"this preference between {chosen_id} and {rejected_id} was already recorded", True
                    )
                if found == "reverse":
                    raise AlreadyRated(
                        f"the opposite preference between {chosen_id} and {rejected_id} was already recorded; "
                        "preferences are final",
                        False,
                    )
            return self._insert_pair(
                conn, p, c, r, "preference", chosen_id, rejected_id, model_version, client_text, now or time.time()
            )

    def _lock_prompt(self, conn: sa.Connection, key: str) -> None:
        """Serialise the feedback of one prompt (its :func:`_prompt_key`) until the transaction ends: two opposite
        ratings arriving together on two replicas must see each other (one of them forms the pair), a retry must
        see its original. PostgreSQL: an advisory lock on the key's first 60 bits (fits its bigint), not the whole
        table; SQLite's writers are serialised already."""
        if self.backend == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(int(key[:15], 16))))

    @staticmethod
    def _recorded_comparison(
        conn: sa.Connection,
        prompt: list[dict[str, str]],
        chosen: list[dict[str, str]],
        rejected: list[dict[str, str]],
        chosen_id: str,
        rejected_id: str,
    ) -> str | None:
        """``"same"`` / ``"reverse"`` when a stored pair (of any kind) already compares these two replies of these
        completions on this prompt; else None. Pairs do not record choice indices, so the stored pairs of the two
        completion ids are compared by text."""
        t = pairs_table.c
        ids = (chosen_id, rejected_id)
        for row in conn.execute(
            sa.select(t.prompt, t.chosen, t.rejected).where(t.chosen_id.in_(ids), t.rejected_id.in_(ids))
        ):
            if row.prompt != prompt:
                continue
            if (row.chosen, row.rejected) == (chosen, rejected):
                return "same"
            if (row.chosen, row.rejected) == (rejected, chosen):
                return "reverse"
        return None

    def _insert_pair(
        self,
        conn: sa.Connection,
        prompt: list[dict[str, str]],
        chosen: list[dict[str, str]],
        rejected: list[dict[str, str]],
        kind: str,
        chosen_id: str | None,
        rejected_id: str | None,
        model_version: str,
        client_text: bool,
        now: float,
    ) -> dict[str, Any]:
        result = conn.execute(
            sa.insert(pairs_table).values(
                created_at=now,
                kind=kind,
                prompt=prompt,
                chosen=chosen,
                rejected=rejected,
                chosen_id=chosen_id,
                rejected_id=rejected_id,
                model_version=model_version,
                client_text=client_text,
                untrusted=True,
                source=SOURCE_API,
            )
        )
        return _pair_record(
            {
                "id": result.inserted_primary_key[0],  # type: ignore[index]  # always set after an INSERT
                "created_at": now,
                "kind": kind,
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_id": chosen_id,
                "rejected_id": rejected_id,
                "model_version": model_version,
                "client_text": client_text,
                "untrusted": True,
                "source": SOURCE_API,
            }
        )

    def record_request(
        self,
        request_id: str,
        *,
        model_version: str,
        n_choices: int,
        withheld: int = 0,
        conversation_id: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        replies: Sequence[str | None] | None = None,
        now: float | None = None,
    ) -> None:
        """One served chat completion: a request row (no text) and, with transcripts on, its transcript.

        Args:
            conversation_id: groups the turns of one conversation (the client's ``X-RLChat-Conversation-Id``);
                default: the request id.
            messages: the conversation the model answered; replies: one text per choice (None: withheld).

        Raises:
            StoreUnavailable: nothing was written.
        """
        record = RequestRecord(request_id, model_version, n_choices, withheld, conversation_id, messages, replies, now)
        self.record_requests([record])

    def record_requests(self, records: Sequence[RequestRecord]) -> None:
        """Several served completions (:meth:`record_request` each) in one transaction.

        A replica records every completion; one commit per request cost it ~18% of a core at 150 requests/s on 2
        cores (SQLite's commit and SQLAlchemy's per-statement work), so its writer drains what queued up while the
        last write ran and writes it with one multi-row insert per table and one commit.

        Raises:
            StoreUnavailable: nothing was written.
        """
        if not records:
            return
        now = time.time()
        requests, transcripts, digests = [], [], []
        for r in records:
            at = now if r.created_at is None else r.created_at
            conversation_id = r.conversation_id or r.request_id
            if r.messages is not None:
                key = _prompt_key(self._messages(r.messages))
                digests += [
                    {"request_id": r.request_id, "choice_index": i, "digest": _reply_digest(key, self._text(t))}
                    for i, t in enumerate(r.replies or [])
                    if t is not None
                ]
            requests.append(
                {
                    "created_at": at,
                    "request_id": r.request_id,
                    "conversation_id": conversation_id,
                    "model_version": r.model_version,
                    "n_choices": r.n_choices,
                    "withheld": r.withheld,
                }
            )
            if self.transcripts and r.messages is not None:
                transcripts.append(
                    {
                        "created_at": at,
                        "request_id": r.request_id,
                        "conversation_id": conversation_id,
                        "model_version": r.model_version,
                        "messages": self._messages(r.messages),
                        "replies": [None if t is None else self._text(t) for t in (r.replies or [])],
                    }
                )
        with self._transaction() as conn:
            conn.execute(sa.insert(requests_table), requests)
            if transcripts:
                conn.execute(sa.insert(transcripts_table), transcripts)
            if digests:
                conn.execute(sa.insert(replies_table), digests)
        latest = max(row["created_at"] for row in requests)
        if latest >= self._next_prune:
            self.prune(latest)

    # ------------------------------------------------------------------------------------------ retention
    def prune(self, now: float | None = None) -> dict[str, int]:
        """Delete transcripts, and request rows with their reply digests, older than their retention periods (none
        without one); returns how many of each (``{"transcripts", "requests"}``).

        Deleted request rows are added to their model version's count in ``rlchat_pruned_requests`` in the same
        transaction, so :meth:`stats` still counts every request. Each replica prunes, and the rows a transaction
        deletes are the ones it counts, so none is counted twice: on PostgreSQL by ``DELETE ... RETURNING`` (a
        concurrent prune waits for the rows' locks, then finds them gone), on SQLite under the write lock that
        ``BEGIN IMMEDIATE`` takes.

        Raises:
            StoreUnavailable: the database cannot be reached (nothing was deleted).
        """
        counts = {"transcripts": 0, "requests": 0}
        if self.retention_days is None and self.request_retention_days is None:
            return counts
        now = time.time() if now is None else now
        self._next_prune = now + PRUNE_INTERVAL_S
        with self._transaction() as conn:
            if self.retention_days is not None:
                cutoff = now - self.retention_days * 86400.0
                t = transcripts_table.c
                counts["transcripts"] = int(
                    conn.execute(sa.delete(transcripts_table).where(t.created_at < cutoff)).rowcount or 0
                )
            if self.request_retention_days is not None:
                counts["requests"] = self._prune_requests(conn, now - self.request_retention_days * 86400.0)
        if any(counts.values()):
            logger.info(
                "feedback store %s: deleted %d transcript(s) and %d request row(s) past their retention periods",
                self.display_url,
                counts["transcripts"],
                counts["requests"],
            )
        return counts

    def _prune_requests(self, conn: sa.Connection, cutoff: float) -> int:
        """Delete the request rows created before ``cutoff`` and their reply digests, adding the rows to their
        versions' counts; returns how many rows."""
        q, r, p = requests_table.c, ratings_table.c, pairs_table.c
        old = sa.select(q.request_id).where(q.created_at < cutoff)
        conn.execute(sa.delete(replies_table).where(replies_table.c.request_id.in_(old)))
        # ratings and pairs name completions, not conversations: a rated completion keeps its conversation id
        # (no text), else deleting the conversation later (`rlchat feedback delete`) would leave its ratings behind
        rated = sa.union(sa.select(r.request_id), sa.select(p.chosen_id), sa.select(p.rejected_id))
        keep = sa.select(q.request_id, q.conversation_id).where(q.created_at < cutoff, q.request_id.in_(rated))
        insert = postgresql_insert if self.backend == "postgresql" else sqlite_insert
        columns = [rated_conversations_table.c.request_id, rated_conversations_table.c.conversation_id]
        conn.execute(insert(rated_conversations_table).from_select(columns, keep).on_conflict_do_nothing())
        expired = sa.delete(requests_table).where(q.created_at < cutoff)
        if self.backend == "postgresql":  # what this transaction deleted: a concurrent prune's rows are not counted
            deleted = Counter(row.model_version for row in conn.execute(expired.returning(q.model_version)))
        else:  # BEGIN IMMEDIATE holds the write lock: the rows counted are the rows deleted (no RETURNING before
            # SQLite 3.35, which e.g. Debian 11's Python links)
            per_version = sa.select(q.model_version, sa.func.count()).where(q.created_at < cutoff)
            deleted = Counter({v: int(n) for v, n in conn.execute(per_version.group_by(q.model_version))})
            conn.execute(expired)
        if deleted:
            stmt = insert(pruned_requests_table).values(
                [{"model_version": v, "requests": n} for v, n in sorted(deleted.items())]
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[pruned_requests_table.c.model_version],
                    set_={"requests": pruned_requests_table.c.requests + stmt.excluded.requests},
                )
            )
        return sum(deleted.values())

    def delete_conversation(self, conversation_id: str) -> dict[str, int]:
        """Delete one conversation: its transcripts and request rows (by conversation id, or by the id of one of
        its completions), the digests of its replies, the ratings of its completions and the pairs that use them.

        Returns:
            Rows deleted per table: ``{"transcripts", "requests", "replies", "ratings", "pairs"}``.
        """
        t, q, c = transcripts_table.c, requests_table.c, rated_conversations_table.c
        maps = [(x.request_id, x.conversation_id) for x in (t, q, c)]  # completion id -> conversation id
        with self._transaction() as conn:
            # 1. the conversation(s): the id itself, or the conversation a completion id belongs to
            convs = {conversation_id}
            for col_id, col_conv in maps:
                convs.update(row[0] for row in conn.execute(sa.select(col_conv).where(col_id == conversation_id)))
            # 2. every completion of those conversations (ratings and pairs refer to completion ids)
            ids = set(convs)
            for col_id, col_conv in maps:
                ids.update(row[0] for row in conn.execute(sa.select(col_id).where(col_conv.in_(convs))))
            # 3. delete, in one transaction
            conn.execute(sa.delete(rated_conversations_table).where(c.conversation_id.in_(convs)))
            counts = {
                "transcripts": conn.execute(sa.delete(transcripts_table).where(t.conversation_id.in_(convs))).rowcount,
                "requests": conn.execute(sa.delete(requests_table).where(q.conversation_id.in_(convs))).rowcount,
                "replies": conn.execute(sa.delete(replies_table).where(replies_table.c.request_id.in_(ids))).rowcount,
                "ratings": conn.execute(sa.delete(ratings_table).where(ratings_table.c.request_id.in_(ids))).rowcount,
                "pairs": conn.execute(
                    sa.delete(pairs_table).where(
                        sa.or_(pairs_table.c.chosen_id.in_(ids), pairs_table.c.rejected_id.in_(ids))
                    )
                ).rowcount,
            }
        return {k: int(v or 0) for k, v in counts.items()}

    # ------------------------------------------------------------------------------------------ reads
    def pair_rows(self, model_version: str | None = None) -> list[dict[str, Any]]:
        """Every preference pair (oldest first) as a row dict, optionally of one model version."""
        query = sa.select(pairs_table).order_by(pairs_table.c.id)
        if model_version is not None:
            query = query.where(pairs_table.c.model_version == model_version)
        with self._transaction() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def preference_records(self, model_version: str | None = None) -> list[Record]:
        """The pairs as :class:`rlchat.core.data.Record` objects (no filters, dedup or split; see
        :func:`load_records`)."""
        from rlchat.core.data import parse_record

        return [
            parse_record(_pair_record(row), source=f"{self.display_url}#pairs:{row['id']}", fmt="preference")
            for row in self.pair_rows(model_version)
        ]

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of one table (``requests``, ``transcripts``, ``replies``, ``ratings``, ``pairs``), oldest
        first."""
        tables = {"requests": requests_table, "transcripts": transcripts_table, "ratings": ratings_table}
        tables["replies"], tables["pairs"] = replies_table, pairs_table
        if table not in tables:
            raise ConfigError(f"table {table!r}: expected one of {', '.join(tables)}")
        with self._transaction() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.select(tables[table]).order_by(tables[table].c.id))]

    def stats(self) -> list[VersionStats]:
        """Per model version: requests served, thumbs up / down, preference pairs (sorted by version)."""
        q, r, p = requests_table.c, ratings_table.c, pairs_table.c
        with self._transaction() as conn:
            requests: Counter[str] = Counter(
                {v: int(n) for v, n in conn.execute(sa.select(pruned_requests_table))}  # past their retention
            )
            for v, n in conn.execute(sa.select(q.model_version, sa.func.count()).group_by(q.model_version)):
                requests[v] += int(n)
            pairs: dict[str, int] = {
                v: int(n)
                for v, n in conn.execute(sa.select(p.model_version, sa.func.count()).group_by(p.model_version))
            }
            rated: dict[str, dict[str, int]] = {}
            for version, rating, n in conn.execute(
                sa.select(r.model_version, r.rating, sa.func.count()).group_by(r.model_version, r.rating)
            ):
                rated.setdefault(version, {})[rating] = int(n)
        versions = sorted(set(requests) | set(pairs) | set(rated))
        return [
            VersionStats(
                model_version=v,
                requests=int(requests.get(v, 0)),
                ratings=sum(rated.get(v, {}).values()),
                up=rated.get(v, {}).get(UP, 0),
                down=rated.get(v, {}).get(DOWN, 0),
                pairs=int(pairs.get(v, 0)),
            )
            for v in versions
        ]


def _no_nul(text: str) -> str:
    """``text`` with U+0000 as U+FFFD: PostgreSQL text cannot hold a NUL (SQLite can), and both back ends must keep
    the same rows (a model's byte-0 token is a NUL in its reply)."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _short(e: Exception) -> str:
    """The driver's own message of a SQLAlchemy error, on one line, without SQLAlchemy's background link."""
    orig = getattr(e, "orig", None) or e
    return " ".join(str(orig).split())[:300]


def _pair_record(row: dict[str, Any]) -> dict[str, Any]:
    """A stored pair as a preference record ``{"prompt", "chosen", "rejected", "feedback": {...}}``."""

    def side(messages: list[dict[str, str]]) -> str | list[dict[str, str]]:
        return messages[0]["content"] if len(messages) == 1 else messages

    return {
        "prompt": row["prompt"],
        "chosen": side(row["chosen"]),
        "rejected": side(row["rejected"]),
        "feedback": {
            "kind": row["kind"],
            "chosen_id": row["chosen_id"],
            "rejected_id": row["rejected_id"],
            "model_version": row["model_version"],
            "client_text": bool(row["client_text"]),
            "untrusted": bool(row["untrusted"]),
            "source": row["source"],
            "store_id": int(row["id"]),
            "time": float(row["created_at"]),
        },
    }


# --------------------------------------------------------------------------------------------------------------
# Training reads the store
# --------------------------------------------------------------------------------------------------------------


def collect_pairs(url: str, cfg: Config, model_version: str | None = None) -> tuple[Collector, str, int]:
    """The store's pairs through the same validation, filters and dedup as ``rlchat data prepare``.

    Returns:
        The collector (``kept`` rows in :data:`rlchat.core.data.PREPARED_SCHEMA` columns), the source name rows
        point at (``<url>#pairs:<id>``) and how many pairs were read.

    Raises:
        StoreUnavailable: the database cannot be reached.
        DataError: a bad pair with ``data.on_error: fail``.
    """
    from rlchat.core.data import Collector, needs_tokens, process_chunk

    store = FeedbackStore(url)
    try:
        rows = store.pair_rows(model_version)
    finally:
        store.close()
    name = f"{store.display_url}#pairs"
    if not cfg.rm.feedback_client_text:
        server_text = [row for row in rows if not row["client_text"]]
        if len(server_text) < len(rows):
            logger.warning(
                "%s: left out %d of %d pairs whose text a client sent (not verified as this server's replies); "
                "rm.feedback_client_text=true trains on them too",
                name,
                len(rows) - len(server_text),
                len(rows),
            )
        rows = server_text
    data = [json.dumps(_pair_record(row), ensure_ascii=False).encode("utf-8") for row in rows]
    chunk = {
        "path": name,
        "lines": [int(row["id"]) for row in rows],  # "line" = the pair's id: errors and stats point at the row
        "data": data,
        "sizes": [len(d) for d in data],
        "file_error": None,
        "error_line": 0,
        "max_line_bytes": max([cfg.data.max_line_bytes, *(len(d) for d in data)]),
    }
    tok = None
    if needs_tokens(cfg.data):
        from rlchat.core.tokenizer import ChatTokenizer

        tok = ChatTokenizer.from_config(cfg.tokenizer)
    collector = Collector(cfg.data.on_error, cfg.data)
    collector.add_all(process_chunk(chunk, "preference", tok, cfg.data))
    return collector, name, len(rows)


def load_records(url: str, split: str = "train", cfg: Config | None = None) -> list[Record]:
    """Preference records of a store for a training stage (what :func:`rlchat.core.data.load_records` is for files):
    validated, filtered and deduplicated per ``cfg.data``, split train/val by ``cfg.seed``.

    Raises:
        StoreUnavailable: the database cannot be reached.
        DataError: a SQLite file that is not there (:func:`existing_store_url`), or a bad split.
    """
    from rlchat.core.config import Config
    from rlchat.core.data import Record, split_rows

    cfg = cfg or Config()
    if split not in ("train", "val", "all"):
        raise DataError(f"split {split!r}: expected train, val or all")
    collector, name, n = collect_pairs(existing_store_url(url), cfg)
    if n == 0:
        logger.warning("%s: no preference pairs yet", name)
    train, val = split_rows(collector.kept, cfg.data.val_fraction, cfg.seed)
    rows = {"train": train, "val": val, "all": train + val}[split]
    return [Record.from_row(r) for r in rows]


__all__ = [
    "MIGRATIONS",
    "AlreadyRated",
    "RETRY_AFTER_S",
    "SCHEMA_VERSION",
    "FeedbackStore",
    "InvalidFeedback",
    "StoreUnavailable",
    "VersionStats",
    "check_preference",
    "existing_store_url",
    "collect_pairs",
    "default_store_url",
    "display_url",
    "is_store_url",
    "load_records",
    "resolve_store_url",
    "scrub_pii",
    "wilson_interval",
]
