"""The ``rlchat`` command line: parses arguments and dispatches, nothing else.

Each subcommand names the library function that implements it (``module:function``); that function receives the
parsed arguments as keyword arguments and returns an exit code. Imports are lazy so ``rlchat --help`` and
``rlchat config show`` start in well under a second, without torch or Ray.

    rlchat demo                                  # the built-in end-to-end demo
    rlchat config show --config configs/demo.yaml ppo.clip_coef=0.1
    rlchat data prepare data/*.jsonl --out prepared/
    rlchat sft --config configs/demo.yaml
    rlchat train --config configs/demo.yaml --resume runs/...
    rlchat serve runs/.../checkpoints/best
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from rlchat import __version__
from rlchat.core.errors import RLChatError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. ppo.clip_coef=0.1")


def _add_run_args(p: argparse.ArgumentParser, resume: bool = True) -> None:
    _add_config_args(p)
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<stage>-<timestamp>)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    if resume:
        p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--beams", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlchat", description="Distributed PPO for chat language models on Ray.")
    parser.add_argument("--version", action="version", version=f"rlchat {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("RLCHAT_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, target: str, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(_target=target)
        p.add_argument(
            "--verbose",
            "-v",
            action="store_true",
            help="show Ray's and transformers' own logs here (also RLCHAT_VERBOSE=1); default: RUN_DIR/logs/",
        )
        return p

    # config
    config = sub.add_parser("config", help="inspect the configuration schema").add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND"
    )
    p = cmd("show", "rlchat.cli.parser:config_show", "print the resolved config as YAML", config)
    _add_config_args(p)
    p = cmd("keys", "rlchat.cli.parser:config_keys", "list every config key with its default and meaning", config)
    p.add_argument("--markdown", action="store_true", help="print the table of docs/config.md")

    # data
    data = sub.add_parser("data", help="prepare and inspect conversation data").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    p = cmd(
        "prepare",
        "rlchat.cli.prepare_cmd:prepare_command",
        "normalise, validate, filter and split data (Ray Data)",
        data,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl / .jsonl.gz files or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format", default="auto", choices=["auto", "messages", "sharegpt", "alpaca", "pair", "preference"]
    )
    p.add_argument("--on-error", default=None, choices=["fail", "skip"])
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--address", default=None)
    p = cmd("stats", "rlchat.cli.prepare_cmd:stats_command", "print a table of a prepared dataset's statistics", data)
    p.add_argument("path", help="prepared directory (or its stats.json)")

    # the Serve endpoint's feedback store
    feedback = sub.add_parser("feedback", help="export, summarise and delete the Serve endpoint's feedback")
    feedback = feedback.add_subparsers(dest="feedback_command", required=True, metavar="SUBCOMMAND")
    store_help = "the feedback store: postgresql://USER:PASSWORD@HOST:PORT/DB, sqlite:///PATH.db or PATH.db"
    p = cmd(
        "export", "rlchat.cli.feedback_cmd:feedback_export_command", "write the preference pairs as Parquet", feedback
    )
    p.add_argument("url", metavar="URL", help=store_help)
    p.add_argument("--out", required=True, help="output directory (the layout of `rlchat data prepare`)")
    p.add_argument("--model-version", default=None, help="only this model version's pairs")
    p.add_argument("--config", "-c", default=None, help="YAML config: data.* filters, tokenizer, seed")
    p.add_argument(
        "--client-text",
        action="store_true",
        help="also pairs whose text a client sent (rm.feedback_client_text): preferences by text, unverified replies",
    )
    p = cmd(
        "stats", "rlchat.cli.feedback_cmd:feedback_stats_command", "per model version: thumbs-up rate, pairs", feedback
    )
    p.add_argument("url", metavar="URL", help=store_help)
    p.add_argument("--json", dest="json_output", action="store_true", help="print JSON instead of a table")
    p = cmd(
        "delete",
        "rlchat.cli.feedback_cmd:feedback_delete_command",
        "delete one conversation and its feedback",
        feedback,
    )
    p.add_argument("url", metavar="URL", help=store_help)
    p.add_argument("conversation_id", metavar="CONVERSATION_ID", help="X-RLChat-Conversation-Id, or a completion id")

    # training stages
    p = cmd("sft", "rlchat.cli.stages_cmd:sft_command", "supervised fine-tuning on Ray Train")
    _add_run_args(p)
    p = cmd("rm", "rlchat.cli.stages_cmd:rm_command", "reward-model training on preference pairs (Ray Train)")
    _add_run_args(p)
    p = cmd("train", "rlchat.cli.train_cmd:train_command", "PPO: rollout workers + central learner on Ray")
    _add_run_args(p)
    p = cmd("demo", "rlchat.cli.demo:demo_command", "built-in demo: prepare data, SFT, RM and PPO, then compare")
    _add_run_args(p, resume=False)
    p.add_argument("--quick", action="store_true", help="a reduced run (used by tests)")
    p.add_argument(
        "--full",
        action="store_true",
        help="also RLHF with a gold check: PPO on the reward model alone from a weaker SFT policy (~3 min more)",
    )

    p = cmd("eval", "rlchat.cli.eval_cmd:eval_command", "evaluate a checkpoint on held-out prompts")
    p.add_argument("checkpoint")
    p.add_argument("--baseline", default=None, help="checkpoint to compare against (win rate by the reward model)")
    p.add_argument("--data", default=None, help="held-out data (default: the checkpoint config's prompts)")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--out", default=None, help="where eval.json goes (default: RUN_DIR/eval/STEP/eval.json)")
    p.add_argument("--samples", type=int, default=3, help="sample conversations to show")
    p.add_argument("--max-prompts", type=int, default=128)

    p = cmd("plot", "rlchat.cli.plot_cmd:plot_command", "write PNG curves of a run's metrics to RUN_DIR/plots/")
    p.add_argument("run_dir")

    # serving and chat
    p = cmd("serve", "rlchat.cli.serve_cmd:serve_command", "serve a checkpoint behind an OpenAI-compatible HTTP API")
    p.add_argument("checkpoint", nargs="?", default=None)
    p.add_argument("--from-run", default=None, metavar="RUN_DIR", help="serve this run's best checkpoint")
    p.add_argument(
        "--follow",
        action="store_true",
        help="with --from-run: swap to each new best checkpoint while the run trains (serve.follow_interval_s)",
    )
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--config", "-c", default=None)
    p.add_argument(
        "--api-key",
        default=None,
        help="visible in ps: prefer --api-key-file or the RLCHAT_API_KEY environment variable",
    )
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key from FILE's first line")
    p.add_argument("--address", default=None)
    p.add_argument(
        "--ingress",
        choices=["proxy", "haproxy"],
        default=None,
        help="serve.ingress when this command starts Ray: proxy (Ray Serve's) or haproxy (faster; docs/serving.md)",
    )
    p.add_argument("--blocking", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. serve.max_batch_size=8 'serve.versions=[{name: a, checkpoint: ...}]'",
    )

    p = cmd("chat", "rlchat.cli.chat:chat_command", "interactive terminal chat with a checkpoint or an endpoint URL")
    p.add_argument("target", metavar="CKPT_OR_URL")
    p.add_argument(
        "--api-key",
        default=None,
        help="visible in ps: prefer --api-key-file or the RLCHAT_API_KEY environment variable",
    )
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key from FILE's first line")
    p.add_argument("--system", default=None)
    _add_decoding_args(p)

    p = cmd("tune", "rlchat.cli.tune_cmd:tune_command", "Ray Tune hyperparameter sweep over config keys")
    _add_run_args(p)
    p.add_argument("--space", default=None, help="search-space YAML, e.g. tune/spaces/demo.yaml (not with --resume)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--scheduler", default="asha", choices=["asha", "pbt"])
    p.add_argument("--deploy", action="store_true", help="serve the best checkpoint when the sweep ends")

    p = cmd("generate", "rlchat.cli.generate_cmd:generate_command", "batch generation over many prompts (Ray Data)")
    p.add_argument("checkpoint")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--jsonl", action="store_true")
    p.add_argument("--logprobs", action="store_true")
    p.add_argument("--rewards", action="store_true")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    p.add_argument("--address", default=None)
    _add_decoding_args(p)

    p = cmd("doctor", "rlchat.cli.doctor:doctor_command", "check the installation and the machine")
    p.add_argument("--address", default=None)
    p.add_argument("--run-dir", default="runs")
    p = cmd("tokenize", "rlchat.cli.tokenize_cmd:tokenize_command", "show how text is tokenized")
    p.add_argument("text", metavar="TEXT_OR_FILE")
    p.add_argument("--encoding", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="render as a chat and mark the loss mask")
    return parser


def _resolve(target: str) -> Callable[..., int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def config_show(config: str | None, overrides: list[str], **_: Any) -> int:
    from rlchat.core.config import load_config, to_yaml

    sys.stdout.write(to_yaml(load_config(config, overrides)))
    return 0


def config_keys(markdown: bool = False, **_: Any) -> int:
    from rlchat.core.config import describe_keys

    rows = describe_keys()
    if markdown:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, doc in rows:
            print(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
        return 0
    width = max(len(k) for k, _, _ in rows)
    for key, default, doc in rows:
        print(f"{key:<{width}}  {default:<14} {doc}")
    return 0


PATH_ARGS = (
    "config", "run_dir", "resume", "checkpoint", "baseline", "data", "out", "inputs", "input", "output",
    "from_run", "path", "target", "space", "api_key_file",
)  # fmt: skip
"""Arguments that name local files or directories (a URL or ``builtin:`` set passes through unchanged)."""


def resolve_path_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Make every path argument absolute against the directory the user typed the command in.

    This is the CLI half of the one boundary where user paths become absolute (the config half is
    :func:`rlchat.core.config.resolve_paths`): nothing downstream -- Ray tasks, actors, Ray Train workers, whose
    working directories differ from the user's -- ever sees a relative path.
    """
    from rlchat.core.config import resolve_path

    out = dict(kwargs)
    for key in PATH_ARGS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = resolve_path(value)
        elif isinstance(value, list):
            out[key] = [resolve_path(v) if isinstance(v, str) else v for v in value]
    return out


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=.*", re.DOTALL)
"""A ``key=value`` config override (a key of letters, digits, ``_`` and dots)."""


def _serve_positionals(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``rlchat serve`` takes an optional checkpoint and then overrides; argparse hands the first override to the
    checkpoint when there is none (``rlchat serve --from-run RUN serve.max_batch_size=8``). A ``key=value`` whose key
    is a config key (letters, digits, ``_`` and dots: no ``/``, so no path or URI such as ``runs/lr=3e-4/...``) and
    that is no file here is an override."""
    ckpt = kwargs.get("checkpoint")
    if isinstance(ckpt, str) and _OVERRIDE.fullmatch(ckpt) and not os.path.exists(ckpt):
        return {**kwargs, "checkpoint": None, "overrides": [ckpt, *(kwargs.get("overrides") or [])]}
    return kwargs


QUIET_COMMANDS = ("demo", "sft", "rm", "train", "tune", "serve", "generate", "prepare", "eval")
"""Long-running commands whose Ray / transformers logs go to ``RUN_DIR/logs/console.log`` unless ``--verbose``."""


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on the write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout is not a real file
        return False


def main(argv: list[str] | None = None) -> int:
    from rlchat.core import console

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # argparse fills `key=value ...` only up to the first flag: take overrides that follow flags too
    # (`rlchat serve CKPT --port 8123 serve.max_batch_size=1`); anything else unknown is still an error
    late = [a for a in unknown if _OVERRIDE.fullmatch(a)]
    if len(late) < len(unknown) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*(args.overrides or []), *late]
    kwargs = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("log_level",)}
    for k in ("command", "config_command", "data_command"):
        kwargs.pop(k, None)
    verbose = console.verbose_requested(kwargs.pop("verbose", False))
    name = args._target.split(":")[1].removesuffix("_command")
    if verbose:
        os.environ["RLCHAT_VERBOSE"] = "1"  # read by the library (e.g. Tune's own progress tables)
    elif name in QUIET_COMMANDS:
        console.quiet_console(name)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if name == "serve":
        kwargs = _serve_positionals(kwargs)
    kwargs = resolve_path_args(kwargs)

    def fail(message: str, code: int) -> int:
        log = console.log_path()
        where = f"\n  full log: {log} (or run again with --verbose)" if log is not None else ""
        print(f"error: {message}{where}", file=console.console(), flush=True)
        return code

    try:
        return int(_resolve(args._target)(**kwargs) or 0)
    except RLChatError as e:
        return fail(str(e), 2)
    except KeyboardInterrupt:
        print("interrupted", file=console.console())
        return 130
    except BrokenPipeError as e:
        if not _stdout_reader_gone():
            return fail(f"{type(e).__name__}: {e}", 1)  # another pipe or socket broke: say so
        # `rlchat ... | head`: the reader of our output has gone; end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit fails otherwise
        return 141
    except Exception as e:
        if console.log_path() is None:
            raise
        import traceback

        traceback.print_exc()  # into the log; the terminal gets one line
        return fail(f"{type(e).__name__}: {e}", 1)
    finally:
        # In-process callers (tests, notebooks: they pass argv) get their stderr back. The program itself (argv is
        # None) keeps it on the log to the end: Ray's log thread still forwards worker lines while the process exits.
        if argv is not None:
            console.restore_console()


if __name__ == "__main__":
    sys.exit(main())
