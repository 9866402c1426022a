"""The one checkpoint format of rlchat: write atomically, read with clear errors, keep the last M plus the best.

A checkpoint is a directory that plain ``transformers`` can load (``AutoModelForCausalLM.from_pretrained(ckpt)``,
``AutoTokenizer.from_pretrained(ckpt)``)::

    step_000120/
      config.json, model.safetensors          HF model (written by the model's save_pretrained)
      value_head.safetensors                  value head (policy) / reward head files (reward model)
      rlchat_tokenizer.json                   the tokenizer definition (+ tokenizer.tiktoken for file encodings)
      tokenizer.json, tokenizer_config.json,  the HF fast-tokenizer export (same ids as ChatTokenizer)
      special_tokens_map.json
      train_state.pt                          optional: optimizer / scheduler / RNG / KL / data position, for resume
      meta.json                               written last: format, stage, step, weights version, resolved config,
                                              tokenizer, package versions, metrics, created time, file sizes

Why it is safe:
- **Atomic.** Everything is written into a hidden sibling directory (``.step_000120.partial-<pid>-<rand>``),
  fsynced, and renamed into place. A crash (even SIGKILL) during a save leaves the previous checkpoints untouched
  and no directory under a final name; the next :class:`CheckpointManager` sweeps the leftovers away.
- **No unrestricted pickle.** Weights are safetensors; ``train_state.pt`` is checked at save time to hold only
  what ``torch.load(..., weights_only=True)`` accepts (tensors, numbers, strings, lists, tuples, dicts), and is
  only ever loaded that way.
- **Checked on load.** :func:`read_checkpoint` verifies meta.json, every recorded file and its size, the stage
  and the tokenizer, and raises :class:`~rlchat.core.errors.CheckpointError` naming what differs and how to fix it.

A run directory's ``checkpoints/`` holds ``step_XXXXXX`` directories and ``index.json``
(``{"latest": "step_000120", "best": "step_000100", "best_value": 0.91, ...}``): relative names in a JSON file
rather than symlinks, so a run directory survives ``scp``/``rsync``/zip to another machine. See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlchat.core.config import Config, from_dict
from rlchat.core.errors import CheckpointError, ConfigError, RLChatError
from rlchat.core.files import atomic_write_json, fsync_dir, fsync_path
from rlchat.core.metrics import STAGE_BEST_METRIC
from rlchat.core.tokenizer import ChatTokenizer

if TYPE_CHECKING:
    from rlchat.core.model import ImplicitRewardModel, PolicyValueModel, RewardModel

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when the layout changes incompatibly; read_checkpoint refuses newer formats."""
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
INDEX_FILE = "index.json"
STAGES = ("sft", "rm", "ppo")
POLICY_STAGES = ("sft", "ppo")
"""Stages whose checkpoints hold a policy (PolicyValueModel); "rm" holds a RewardModel."""
STEP_DIR_RE = re.compile(r"^step_(\d+)$")
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|trash)-(?P<pid>\d+)-[0-9a-f]+$")
_VERSIONED_PACKAGES = ("rlchat", "torch", "transformers", "safetensors", "tokenizers", "tiktoken", "numpy", "ray")


# --------------------------------------------------------------------------------------------------------------
# RNG state (python random, numpy, torch CPU, CUDA) as weights_only-loadable tensors and lists
# --------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG's state, in a form ``torch.load(weights_only=True)`` accepts.

    Python's and numpy's Mersenne-Twister keys become int64 tensors (values fit in 32 bits), the rest plain
    numbers, so the state can sit inside ``train_state`` without pickling numpy objects.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": uint8 tensor, "cuda": [uint8 tensor per device]}``.
    """
    py_version, py_key, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": py_version, "key": torch.tensor(py_key, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {
            "name": str(np_name),
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set python random, numpy, torch CPU (and CUDA when present) to a :func:`capture_rng_state` result.

    Draws made after restoring equal the draws made after capturing. CUDA states are restored only when this
    process sees the same number of devices (a resume on another machine type logs a warning instead).
    """
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["key"].tolist()), py["gauss_next"]))
    n = state["numpy"]
    np_key = n["key"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], np_key, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "the checkpoint holds CUDA RNG states for %d device(s) but this process sees %d; CUDA sampling "
                "will not replay exactly (CPU, numpy and python RNGs were restored)",
                len(cuda),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )


# --------------------------------------------------------------------------------------------------------------
# Helpers: versions, JSON, fsync, train-state validation
# --------------------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a checkpoint, read from metadata (imports nothing, not Ray)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _json_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Metrics as strict JSON values: numbers (non-finite -> null), strings, booleans."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (str, bool)) or value is None:
            out[str(key)] = value
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metrics[{key!r}]={value!r}: expected a number or a string") from None
        out[str(key)] = v if math.isfinite(v) else None
    return out


def _json_config(x: Any) -> Any:
    """Config dict with non-finite floats as the strings "inf"/"-inf"/"nan", which Config's float fields parse back;
    keeps meta.json strict JSON (no bare Infinity) while round-tripping e.g. ``data.min_quality=-inf``."""
    if isinstance(x, dict):
        return {k: _json_config(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_config(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


_SAFE_LEAVES = (torch.dtype, torch.device, torch.Size, int, float, bool, str, bytes, complex, type(None))


def _check_weights_only(obj: Any, where: str = "train_state") -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` could not read back.

    Checking at save time turns a resume that would fail hours later into an error at the line that saved it.
    """
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(obj).__name__} cannot be loaded with weights_only")
        return
    if isinstance(obj, _SAFE_LEAVES):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f"{where} key {k!r}")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    hint = ""
    if isinstance(obj, (np.ndarray, np.generic)):
        hint = " (convert numpy values with torch.from_numpy(...) or .item(); RNG states with capture_rng_state())"
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be saved in train_state.pt, which "
        f"must load with torch.load(weights_only=True); use tensors, numbers, strings, lists, tuples and dicts{hint}"
    )


def _directory_files(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file under directory (POSIX separators)."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------------


def _write_generation_config(directory: Path, tokenizer: ChatTokenizer) -> None:
    """Make plain ``transformers`` stop a reply where rlchat's engine does, at ``<|end|>`` only (the engine does
    not stop at ``<|endoftext|>``), padding with ``<|pad|>``; so ``model.generate(...)`` on a loaded checkpoint
    needs no extra arguments and gives the engine's greedy reply."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(directory)
    except OSError:
        gen = GenerationConfig()
    gen.eos_token_id = tokenizer.eot_id
    gen.pad_token_id = tokenizer.pad_id
    gen.save_pretrained(directory)


def save_checkpoint(
    directory: str | Path,
    *,
    model: PolicyValueModel | RewardModel | ImplicitRewardModel,
    tokenizer: ChatTokenizer,
    config: Config,
    stage: str,
    step: int,
    weights_version: int = 0,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: into a hidden sibling directory, fsynced, then renamed to ``directory``.

    An existing checkpoint at ``directory`` is replaced (moved aside, the new one renamed in, the old removed).

    Args:
        directory: final checkpoint directory (its parent is created).
        model: anything with ``save_pretrained(dir)`` writing HF ``config.json`` + ``model.safetensors`` (+ heads);
            a DDP wrapper is unwrapped.
        tokenizer: the ChatTokenizer the model was trained with; saved with its HF export.
        config: the resolved run config (stored in meta.json; :func:`read_checkpoint` rebuilds it).
        stage: "sft", "rm" or "ppo".
        step: optimizer step / iteration of this checkpoint.
        weights_version: PPO weights version (the tag rollout batches carry).
        metrics: metrics at save time (non-finite values are stored as null).
        train_state: state for resuming (optimizer/scheduler state dicts, RNG from :func:`capture_rng_state`,
            KL controller, data position); must be loadable with ``torch.load(weights_only=True)``.

    Returns:
        The final checkpoint path.

    Raises:
        CheckpointError: unknown stage.
        TypeError: train_state holds something weights_only loading cannot read (named by its key path).
    """
    if stage not in STAGES:
        raise CheckpointError(f"stage={stage!r}: expected one of {', '.join(STAGES)}")
    if not hasattr(model, "save_pretrained") and hasattr(model, "module"):
        # a DDP / FSDP wrapper: save the wrapped model, whose keys have no "module." prefix
        model = model.module  # type: ignore[assignment]
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    if train_state is not None:
        _check_weights_only(train_state)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.partial-{token}"
    tmp.mkdir()
    try:
        # 1. tokenizer, then weights (a reward model with its own HF tokenizer, e.g. a BERT trunk, overwrites the
        # chat tokenizer's HF export with its own files, which is what loading that model needs), then resume state
        tokenizer.save(tmp)
        model.save_pretrained(tmp)
        if stage in POLICY_STAGES and (tmp / "config.json").is_file():
            _write_generation_config(tmp, tokenizer)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
        # 2. meta.json last: a directory with a meta.json is complete
        meta = {
            "format_version": FORMAT_VERSION,
            "stage": stage,
            "step": int(step),
            "weights_version": int(weights_version),
            "model_class": type(model).__name__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time(),
            "versions": package_versions(),
            "metrics": _json_metrics(metrics),
            "tokenizer": tokenizer.to_dict(),
            "has_train_state": train_state is not None,
            "files": _directory_files(tmp),
            "config": _json_config(config.to_dict()),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        # 3. durable before visible
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        fsync_dir(tmp)
        # 4. publish: rename is atomic within one filesystem
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{token}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s checkpoint step %d to %s", stage, step, final)
    return final


# --------------------------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read and checked by :func:`read_checkpoint` (weights not loaded yet).

    Attributes:
        path: the checkpoint directory.
        meta: meta.json as a dict.
        config: the resolved config the checkpoint was trained with.
        tokenizer: its tokenizer.
    """

    path: Path
    meta: dict[str, Any]
    config: Config
    tokenizer: ChatTokenizer

    @property
    def stage(self) -> str:
        return str(self.meta["stage"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def weights_version(self) -> int:
        return int(self.meta.get("weights_version", 0))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics") or {})

    def load_train_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The resume state (``torch.load(weights_only=True)``), or None when the checkpoint has none."""
        f = self.path / TRAIN_STATE_FILE
        if not f.is_file():
            return None
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{f}: cannot load the resume state ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                "the file is corrupt or was not written by rlchat; resume from an earlier checkpoint"
            ) from None


def tokenizer_differences(found: ChatTokenizer, expected: ChatTokenizer) -> list[str]:
    """Human-readable differences between two tokenizers (empty when they give the same ids for every text)."""
    diffs: list[str] = []
    a, b = found.spec, expected.spec
    if found.n_vocab != expected.n_vocab:
        diffs.append(f"vocabulary size: checkpoint has n_vocab={found.n_vocab}, expected {expected.n_vocab}")
    if found.special_ids != expected.special_ids:
        changed = [
            f"{t} {found.special_ids.get(t)} vs {expected.special_ids.get(t)}"
            for t in sorted(set(found.special_ids) | set(expected.special_ids))
            if found.special_ids.get(t) != expected.special_ids.get(t)
        ]
        more = f", ... ({len(changed) - 3} more)" if len(changed) > 3 else ""
        diffs.append("special-token ids (checkpoint vs expected): " + ", ".join(changed[:3]) + more)
    if found.enc._pat_str != expected.enc._pat_str:
        diffs.append("pre-tokenisation pattern differs")
    if found.enc._mergeable_ranks != expected.enc._mergeable_ranks:
        diffs.append(
            f"BPE ranks differ (checkpoint encoding {a.encoding!r} vocab_size={a.vocab_size}, "
            f"expected {b.encoding!r} vocab_size={b.vocab_size})"
        )
    return diffs


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory, ``<run>/checkpoints/{best,latest}`` or a run directory (-> its best).

    ``best`` and ``latest`` are names in ``checkpoints/index.json``, not directories; this maps them to the
    ``step_XXXXXX`` directory so ``rlchat serve runs/x/checkpoints/best`` works after copying the run anywhere.
    """
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    if not p.exists() and p.name in ("best", "latest") and p.parent.is_dir():
        mgr = _ReadOnlyIndex(p.parent)
        found = mgr.best() if p.name == "best" else mgr.latest()
        if found is None:
            raise CheckpointError(f"{p}: {p.parent} holds no complete checkpoint; train first or pass a step_* dir")
        return found
    if p.is_dir() and ((p / "checkpoints").is_dir() or any(STEP_DIR_RE.match(c.name) for c in p.iterdir())):
        best = find_best_checkpoint(p)
        logger.info("%s is a run directory; using its best checkpoint %s", p, best)
        return best
    return p


def read_checkpoint(
    directory: str | Path,
    expect_tokenizer: ChatTokenizer | None = None,
    expect_stage: str | Sequence[str] | None = None,
) -> Checkpoint:
    """Read and check a checkpoint's meta.json, files, config and tokenizer (weights are not loaded).

    Args:
        directory: a checkpoint dir, ``<run>/checkpoints/best|latest`` or a run dir (see
            :func:`resolve_checkpoint_dir`).
        expect_tokenizer: when given, the checkpoint's tokenizer must give the same ids.
        expect_stage: a stage or several (e.g. ``("sft", "ppo")`` for a policy).

    Raises:
        CheckpointError: missing directory or meta.json, corrupt meta.json, newer format, missing or truncated
            files, unreadable config or tokenizer, tokenizer or stage mismatch. The message says what and the fix.
    """
    raw = Path(directory)
    path = resolve_checkpoint_dir(raw)
    if not path.exists():
        raise CheckpointError(
            f"{raw}: no such checkpoint directory; pass a directory written by rlchat (it holds {META_FILE}), "
            "e.g. runs/<run>/checkpoints/step_000100, runs/<run>/checkpoints/best or a run directory"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint directory holding {META_FILE}")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        partial = " (a partial save: rlchat never renames one into place)" if _TEMP_RE.match(path.name) else ""
        raise CheckpointError(
            f"{path}: no {META_FILE}, so this is not a complete rlchat checkpoint{partial}; pass a step_* directory "
            "from a run's checkpoints/ (an HF-only model directory can be used via model.name_or_path)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{meta_path}:{e.lineno}:{e.colno}: corrupt meta.json ({e.msg}); restore it from a copy or use "
            "another checkpoint of the run"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e}); use another checkpoint of the run") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: corrupt meta.json: expected a JSON object, found {type(meta).__name__}")
    missing = [k for k in ("format_version", "stage", "step", "config", "tokenizer") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: corrupt meta.json: missing keys {', '.join(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format {meta['format_version']!r} is newer than this rlchat reads "
            f"({FORMAT_VERSION}); upgrade rlchat (written by rlchat {meta.get('versions', {}).get('rlchat')})"
        )

    # stage
    stage = meta["stage"]
    if expect_stage is not None:
        wanted = (expect_stage,) if isinstance(expect_stage, str) else tuple(expect_stage)
        if stage not in wanted:
            kind = {"rm": "reward-model", "sft": "SFT policy", "ppo": "PPO policy"}.get(stage, repr(stage))
            raise CheckpointError(
                f"{path}: a {kind} checkpoint (stage {stage!r}); expected stage {' or '.join(map(repr, wanted))}; "
                "pass a checkpoint from the right stage's run"
            )

    # files: every file recorded at save time must be there with its size (catches truncated copies)
    files: dict[str, int] = meta.get("files") or {"config.json": -1, "model.safetensors": -1}
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(
                f"{path}: missing {name} (recorded in meta.json); the checkpoint is incomplete, probably a partial "
                "copy; copy the whole directory again or use another checkpoint"
            )
        if size >= 0 and f.stat().st_size != size:
            raise CheckpointError(
                f"{f}: {f.stat().st_size} bytes, expected {size} (recorded at save); the file is truncated or was "
                "modified; copy it again or use another checkpoint"
            )

    # config
    try:
        config = from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(
            f"{meta_path}: its config is incompatible with this rlchat version ({e}); use the rlchat version that "
            f"wrote it ({meta.get('versions', {}).get('rlchat')}) or edit meta.json"
        ) from None

    # tokenizer
    try:
        tokenizer = ChatTokenizer.load(path)
    except RLChatError as e:
        raise CheckpointError(f"{path}: cannot rebuild the checkpoint's tokenizer: {e}") from None
    if expect_tokenizer is not None:
        diffs = tokenizer_differences(tokenizer, expect_tokenizer)
        if diffs:
            raise CheckpointError(
                f"{path}: tokenizer differs from the expected one: {'; '.join(diffs)}. A model only works with the "
                "tokenizer it was trained with: set tokenizer.* to the checkpoint's values "
                f"(encoding={tokenizer.spec.encoding!r}, vocab_size={tokenizer.spec.vocab_size}) or use a "
                "checkpoint trained with this tokenizer"
            )
    return Checkpoint(path=path, meta=meta, config=config, tokenizer=tokenizer)


def _check_vocab(model: Any, tok: ChatTokenizer, path: Path) -> None:
    lm = getattr(model, "lm", model)
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if emb is not None and emb.num_embeddings < tok.n_vocab:
        raise CheckpointError(
            f"{path}: the model has {emb.num_embeddings} embedding rows but its tokenizer needs {tok.n_vocab}; "
            "the weights and tokenizer files come from different runs; use a checkpoint saved by rlchat as a whole"
        )


def load_policy(
    directory: str | Path, device: str | torch.device = "cpu", expect_tokenizer: ChatTokenizer | None = None
) -> tuple[PolicyValueModel, ChatTokenizer, Checkpoint]:
    """Load an SFT or PPO checkpoint's policy (with value head) and tokenizer.

    Returns:
        (model on ``device``, tokenizer, checkpoint info).

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also a reward-model checkpoint or unreadable weights.
    """
    from rlchat.core.model import PolicyValueModel

    ckpt = read_checkpoint(directory, expect_tokenizer=expect_tokenizer, expect_stage=POLICY_STAGES)
    try:
        model = PolicyValueModel.from_pretrained(ckpt.path, cfg=ckpt.config)
    except RLChatError:
        raise
    except Exception as e:
        raise CheckpointError(f"{ckpt.path}: cannot load the policy weights ({e.__class__.__name__}: {e})") from e
    _check_vocab(model, ckpt.tokenizer, ckpt.path)
    return model.to(device), ckpt.tokenizer, ckpt


def load_reward_model(
    directory: str | Path, device: str | torch.device = "cpu", expect_tokenizer: ChatTokenizer | None = None
) -> tuple[RewardModel | ImplicitRewardModel, ChatTokenizer, Checkpoint]:
    """Load a reward-model checkpoint (``rlchat rm``, either ``rm.kind``) and its tokenizer.

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also a policy checkpoint or unreadable weights.
    """
    from rlchat.core.model import reward_model_from_pretrained

    ckpt = read_checkpoint(directory, expect_tokenizer=expect_tokenizer, expect_stage="rm")
    try:
        model = reward_model_from_pretrained(ckpt.path, ckpt.config)
    except RLChatError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{ckpt.path}: cannot load the reward-model weights ({e.__class__.__name__}: {e})"
        ) from e
    _check_vocab(model, ckpt.tokenizer, ckpt.path)
    return model.to(device), ckpt.tokenizer, ckpt


# --------------------------------------------------------------------------------------------------------------
# Run-directory checkpoints: keep the last M plus the best
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    path: Path
    step: int
    value: float | None  # best_metric at save time (None when absent or non-finite)
    mtime: float


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class _ReadOnlyIndex:
    """Reads a checkpoints/ directory: complete ``step_*`` dirs and index.json. Never writes."""

    def __init__(self, ckpt_dir: Path, best_metric: str | None = None, best_mode: str | None = None) -> None:
        self.dir = Path(ckpt_dir)
        index = self._read_index()
        self.best_metric = best_metric if best_metric is not None else str(index.get("best_metric") or "")
        self.best_mode = best_mode if best_mode is not None else str(index.get("best_mode") or "max")

    def _read_index(self) -> dict[str, Any]:
        f = self.dir / INDEX_FILE
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def entries(self) -> list[_Entry]:
        """Complete checkpoints (final name + meta.json), oldest step first."""
        out: list[_Entry] = []
        if not self.dir.is_dir():
            return out
        for p in self.dir.iterdir():
            m = STEP_DIR_RE.match(p.name)
            meta_path = p / META_FILE
            if not m or not meta_path.is_file():
                continue
            value = None
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                v = (meta.get("metrics") or {}).get(self.best_metric) if self.best_metric else None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    value = float(v)
                step = int(meta.get("step", m.group(1)))
            except (OSError, ValueError, AttributeError):
                continue  # corrupt meta: never offered as latest/best
            out.append(_Entry(p, step, value, meta_path.stat().st_mtime))
        return sorted(out, key=lambda e: (e.step, e.mtime))

    def _best_entry(self, entries: list[_Entry]) -> _Entry | None:
        scored = [e for e in entries if e.value is not None]
        if not scored:
            return None
        sign = 1.0 if self.best_mode == "max" else -1.0
        # earliest wins ties: a later checkpoint must be strictly better to take over
        return max(scored, key=lambda e: (sign * e.value, -e.step))  # type: ignore[operator]

    def latest(self) -> Path | None:
        entries = self.entries()
        return entries[-1].path if entries else None

    def best(self) -> Path | None:
        entries = self.entries()
        best = self._best_entry(entries)
        if best is not None:
            return best.path
        return entries[-1].path if entries else None


class CheckpointManager:
    """Saves ``run_dir/checkpoints/step_XXXXXX`` and keeps the last ``keep_last`` plus the best.

    The directory is the source of truth: a checkpoint exists when its final-named directory holds a meta.json,
    and the best is recomputed from the metrics stored in each meta.json, so a resumed run (a new manager) picks
    up exactly where the old one stopped. ``index.json`` mirrors latest/best for tools and other machines.
    The newest checkpoint is never pruned (a resume needs it), even with ``keep_last=0``.

    Args:
        run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
        keep_last: checkpoints kept besides the best (>= 0).
        best_metric: metrics key that ranks checkpoints; checkpoints saved without it are never "best". When no
            checkpoint has it, best() is the latest.
        best_mode: "max" or "min".
    """

    def __init__(self, run_dir: str | Path, keep_last: int, best_metric: str, best_mode: str = "max") -> None:
        if keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last={keep_last}: expected >= 0; use e.g. 2")
        if best_mode not in ("max", "min"):
            raise ConfigError(f"checkpoint.best_mode={best_mode!r}: expected 'max' or 'min'")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._index = _ReadOnlyIndex(self.dir, best_metric, best_mode)
        self._warned_missing_metric = False
        self.cleanup_partial()

    @classmethod
    def from_config(cls, run_dir: str | Path, config: Config, stage: str) -> CheckpointManager:
        """From ``config.checkpoint``; an empty best_metric takes the stage's default metric and mode."""
        c = config.checkpoint
        mode: str
        if c.best_metric:
            metric, mode = c.best_metric, c.best_mode
        else:
            metric, mode = STAGE_BEST_METRIC[stage]
        return cls(run_dir, keep_last=c.keep_last, best_metric=metric, best_mode=mode)

    def cleanup_partial(self) -> list[Path]:
        """Remove leftovers of crashed saves (``.step_*.partial-*``/``.trash-*`` of dead processes).

        A ``.old-*`` directory whose final name is missing (a crash between the two renames of an overwrite) is
        renamed back rather than deleted, since it is the only complete copy of that step.
        """
        removed: list[Path] = []
        for p in self.dir.iterdir():
            m = _TEMP_RE.match(p.name)
            if not m or _pid_alive(int(m.group("pid"))):
                continue
            final = self.dir / m.group("name")
            if m.group("kind") == "old" and not final.exists() and (p / META_FILE).is_file():
                os.rename(p, final)
                logger.warning("restored %s from an interrupted overwrite", final)
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
        if removed:
            logger.info("removed %d partial checkpoint(s) left by a crashed save in %s", len(removed), self.dir)
        return removed

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{int(step):06d}"

    def save(self, step: int, **save_checkpoint_kwargs: Any) -> Path:
        """:func:`save_checkpoint` to ``checkpoints/step_XXXXXX``, then update index.json and prune.

        Args:
            step: the step number (directory name and meta.json).
            **save_checkpoint_kwargs: model, tokenizer, config, stage, weights_version, metrics, train_state.

        Returns:
            The saved checkpoint directory.
        """
        path = save_checkpoint(self.path_for(step), step=step, **save_checkpoint_kwargs)
        metrics = save_checkpoint_kwargs.get("metrics") or {}
        if self.best_metric and self.best_metric not in metrics and not self._warned_missing_metric:
            self._warned_missing_metric = True
            logger.warning(
                "checkpoint.best_metric=%r is not among the metrics saved with step %d (have: %s); such checkpoints "
                "are never 'best' and, while none has it, best is the latest; set checkpoint.best_metric to one of "
                "the keys above to silence this",
                self.best_metric,
                step,
                ", ".join(sorted(metrics)) or "none",
            )
        self._prune_and_index(newest=path)
        return path

    def _prune_and_index(self, newest: Path | None = None) -> None:
        entries = self._index.entries()
        if not entries:
            return
        best = self._index._best_entry(entries)
        keep = {e.path for e in entries[-self.keep_last :]} if self.keep_last else set()
        keep.add(entries[-1].path)
        if newest is not None:
            keep.add(newest)
        if best is not None:
            keep.add(best.path)
        for e in entries:
            if e.path not in keep:
                # rename first so a crash mid-delete never leaves a half directory under a final name
                trash = self.dir / f".{e.path.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(e.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
        kept = [e for e in entries if e.path in keep]
        latest = kept[-1]
        atomic_write_json(
            self.dir / INDEX_FILE,
            {
                "latest": latest.path.name,
                "latest_step": latest.step,
                "best": (best or latest).path.name,
                "best_step": (best or latest).step,
                "best_metric": self.best_metric,
                "best_mode": self.best_mode,
                "best_value": best.value if best is not None else None,
                "checkpoints": [{"name": e.path.name, "step": e.step, "value": e.value} for e in kept],
            },
            indent=2,
            allow_nan=False,
        )

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step (what ``--resume`` continues from), or None."""
        return self._index.latest()

    def best(self) -> Path | None:
        """The best checkpoint by ``best_metric`` (the latest when none has the metric), or None."""
        return self._index.best()


def find_best_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint of a run (used by ``rlchat serve --from-run``), by the metric the run recorded.

    Args:
        run_dir: a run directory or its ``checkpoints/`` directory.

    Raises:
        CheckpointError: no complete checkpoint there.
    """
    p = Path(run_dir)
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such run directory; pass a directory made by rlchat sft/rm/train")
    best = _ReadOnlyIndex(ckpt_dir).best()
    if best is None:
        raise CheckpointError(
            f"{p}: no complete checkpoint under {ckpt_dir}; the run saved none yet (checkpoint.every) or crashed "
            "before its first save"
        )
    return best
