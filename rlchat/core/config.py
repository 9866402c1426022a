"""The one configuration schema of rlchat.

Nested frozen dataclasses, one per concern. YAML files in ``configs/``, dotted ``key=value`` CLI overrides,
Ray Tune ``param_space`` keys and checkpoint ``meta.json`` all use the same dotted names (``ppo.clip_coef``).
Every field is documented by the docstring right under it; :func:`field_docs` reads those docstrings from this
file's source so that ``rlchat config show --help``-style listings and error messages never drift from the code.

Hyperparameter names follow cleanrl / TRL (see ``docs/config.md`` for the mapping to TRL, RLlib and SB3).

Usage::

    cfg = load_config("configs/demo.yaml", ["ppo.clip_coef=0.1"])
    cfg.ppo.clip_coef  # 0.1
    save_config(cfg, "run/config.yaml")
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlchat.core.errors import ConfigError
from rlchat.core.files import load_yaml_mapping, yaml_key_lines

# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where conversations come from and how they are cleaned (``rlchat data prepare`` and every stage)."""

    sft: str = "builtin:chat"
    """Conversations for SFT: a prepared dir, a .jsonl/.jsonl.gz/.parquet file, or builtin:{chat,task,prefs}."""
    preferences: str = "builtin:prefs"
    """Preference pairs for reward-model training (same path forms as data.sft)."""
    prompts: str = "builtin:task"
    """Prompts (with optional reference answers) that PPO rollouts start from (same path forms as data.sft)."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "pair", "preference"] = "auto"
    """Input record format; auto detects it per file (from its first record)."""
    on_error: Literal["fail", "skip"] = "fail"
    """fail: the first bad record stops with file:line; skip: bad records are skipped and each one reported."""
    val_fraction: float = 0.1
    """Fraction of records held out for validation (seeded split)."""
    min_turn_tokens: int = 0
    """Drop conversations with a turn shorter than this many tokens (0 = no limit)."""
    max_turn_tokens: int = 0
    """Drop conversations with a turn longer than this many tokens (0 = no limit)."""
    min_conversation_tokens: int = 0
    """Drop conversations shorter than this many tokens in total (0 = no limit)."""
    max_conversation_tokens: int = 0
    """Drop conversations longer than this many tokens in total (0 = no limit)."""
    min_quality: float = float("-inf")
    """Drop records whose quality score is below this (records without a score are kept)."""
    dedup: bool = True
    """Remove exact duplicates (after normalisation)."""
    near_dedup_threshold: float = 0.0
    """Jaccard threshold for MinHash near-duplicate removal (0 = off, e.g. 0.85)."""
    blocklist: tuple[str, ...] = ()
    """Case-insensitive phrases; a record containing one is dropped."""
    max_line_bytes: int = 1 << 20
    """Longest accepted JSONL line in bytes (1 MiB); longer lines are bad records, reported without being loaded."""


@dataclass(frozen=True)
class TokenizerConfig:
    """The tiktoken encoding and the chat special tokens (see rlchat/tokenizer.py)."""

    encoding: str = "cl100k_base"
    """A tiktoken encoding name (cl100k_base, o200k_base, r50k_base, gpt2, p50k_base) or a path to a .tiktoken file."""
    vocab_size: int = 0
    """If > 0, keep only the first (vocab_size - specials) BPE ranks: a small, valid BPE for tiny CPU models."""
    pattern: str = ""
    """Pre-tokenisation regex for .tiktoken files (empty = cl100k's pattern, also used by Llama 3)."""


@dataclass(frozen=True)
class ModelConfig:
    """The policy: any HF causal LM, or a tiny one built from these sizes."""

    name_or_path: str = ""
    """HF model id or local path for AutoModelForCausalLM.from_pretrained; empty = build a tiny model from arch."""
    arch: Literal["gpt2", "llama", "qwen2"] = "gpt2"
    """Architecture family of the tiny model built when name_or_path is empty."""
    n_layer: int = 2
    """Transformer layers of the tiny model."""
    n_embd: int = 64
    """Hidden width of the tiny model."""
    n_head: int = 4
    """Attention heads of the tiny model."""
    n_positions: int = 512
    """Context length (positions) of the tiny model."""
    critic: Literal["shared", "separate"] = "shared"
    """shared: value head on the policy trunk; separate: a second model of the same config is the critic."""
    reinit_embeddings: bool = False
    """Allow a pretrained model whose vocabulary does not match the tokenizer by re-initialising its embeddings."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on GPU and on CPUs with bf16 matrix units (AMX/AVX512-BF16); fp32 master weights."""
    dropout: float = 0.0
    """Dropout of the tiny model (SFT / RM only: PPO refuses dropout > 0, which would make its ratios noisy)."""


@dataclass(frozen=True)
class EnvConfig:
    """The Gymnasium chat environment rlchat/Chat-v0."""

    max_turn_tokens: int = 64
    """Token budget of one assistant turn; reaching it truncates the episode."""
    max_context: int = 512
    """Context limit in tokens (observation buffer size); reaching it truncates the episode."""
    multi_turn: bool = False
    """Continue after the assistant's turn with the next user message."""
    max_turns: int = 3
    """Assistant turns per episode in multi-turn mode."""
    user: Literal["replay", "scripted"] = "replay"
    """Simulated user for multi-turn: replay the dataset's next user message, or a scripted user with goals."""


@dataclass(frozen=True)
class RewardConfig:
    """Reward components and their weights (rlchat/rewards.py). A weight of 0 disables a component."""

    verifiable: float = 1.0
    """Weight of the exact checked answer of the demo task (1 if the answer is right, else 0)."""
    reference_f1: float = 0.0
    """Weight of token F1 against the record's reference answer."""
    rouge_l: float = 0.0
    """Weight of ROUGE-L F against the record's reference answer."""
    length: float = 0.0
    """Weight of the length-target penalty (0 inside [length_min, length_max], negative outside)."""
    length_min: int = 1
    """Lower end of the target response length in tokens."""
    length_max: int = 64
    """Upper end of the target response length in tokens."""
    diversity: float = 0.0
    """Weight of distinct-n within the response."""
    repetition: float = 0.0
    """Weight of the repeated-n-gram penalty."""
    ngram: int = 2
    """n of the diversity and repetition components."""
    coherence: float = 0.0
    """Weight of embedding similarity between prompt and response (needs coherence_model)."""
    coherence_model: str = ""
    """Path or id of a Hugging Face sentence encoder for the coherence component."""
    safety: float = 0.0
    """Weight of the safety penalty (-1 when the blocklist/regex or classifier flags the response)."""
    safety_patterns: tuple[str, ...] = ()
    """Regexes (case-insensitive) that flag a response as unsafe."""
    safety_classifier: str = ""
    """Optional path of a sequence-classification model whose label 1 means unsafe."""
    model: float = 0.0
    """Weight of the learned reward-model score."""
    model_path: str = ""
    """Checkpoint directory of a reward model trained by `rlchat rm`."""
    plugins: dict[str, float] = field(default_factory=dict)
    """User reward functions by import path with their weights, e.g. {"mypkg.rewards:score": 0.5}."""
    truncation_penalty: float = 0.0
    """Added (<= 0) to the reward of a turn cut at env.max_turn_tokens or the context limit; scored on its cut text."""
    monitor: tuple[str, ...] = ("verifiable",)
    """Components scored and logged (rollout/ and eval/reward/<name>) when weighted 0, never added to the reward."""


@dataclass(frozen=True)
class RolloutConfig:
    """Rollout workers: Ray actors that step envs with the generation engine."""

    num_workers: int = 1
    """Number of rollout worker actors (0 = sample inside the driver process, no actors: small sweeps and tests)."""
    envs_per_worker: int = 32
    """Environments each worker steps in lock-step (the generation batch size)."""
    samples_per_prompt: int = 1
    """Replies sampled per prompt (a group of consecutive envs shares its prompt); >= 2 for ppo.advantage grpo/rloo."""
    num_cpus_per_worker: float = 1.0
    """CPUs reserved per rollout worker."""
    num_gpus_per_worker: float = 0.0
    """GPUs reserved per rollout worker."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per worker, e.g. {"rollout": 1} to pin workers to rollout nodes."""
    torch_threads: int = 0
    """Torch intra-op threads per worker; 0 = auto: the node's cores while rollouts and updates alternate."""
    temperature: float = 1.0
    """Sampling temperature during rollouts."""
    top_k: int = 0
    """Top-k filter during rollouts; must stay 0 (off): PPO's learner cannot reproduce a truncated distribution."""
    top_p: float = 1.0
    """Top-p filter during rollouts; must stay 1 (off), for the same reason as rollout.top_k."""
    max_staleness: int = 1
    """Largest accepted gap between the learner's weights version and a batch's version."""
    overlap: bool = False
    """Sample the next batch while the learner updates (one-step off-policy)."""
    max_restarts: int = 3
    """Times a dead rollout worker is restarted before the run fails."""


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (cleanrl / TRL names)."""

    iterations: int = 40
    """PPO iterations (sample -> update -> sync)."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    gamma: float = 1.0
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float = 0.2
    """Surrogate clipping coefficient epsilon."""
    clip_vloss: bool = True
    """Clip the value loss around the old values."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    update_epochs: int = 4
    """Epochs over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per epoch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step within a minibatch."""
    norm_adv: bool = True
    """Whiten advantages over the action tokens of the batch."""
    target_kl: float = 0.0
    """Stop the epoch loop when approx KL > 1.5 * target_kl (0 = off)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty to the frozen reference."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator of the penalty (http://joschu.net/blog/kl-approx.html): k1 in the reward, k3 in the loss."""
    kl_in_loss: bool = False
    """KL to the reference as a differentiable k3 loss term (GRPO) instead of a per-token k1 penalty in the reward."""
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    """gae: critic + GAE (PPO); grpo / rloo: critic-free group baselines over rollout.samples_per_prompt replies."""
    dr_grpo: bool = False
    """Dr. GRPO (Liu et al. 2025): no std scaling of group advantages, loss over a constant token count."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards adaptive_kl_target (Ziegler et al. 2019)."""
    adaptive_kl_target: float = 6.0
    """Target sequence-level KL of the adaptive controller (was ppo.kl_target; not the early stop target_kl)."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    eval_every: int = 10
    """Held-out evaluation every this many iterations (0 = off)."""
    eval_prompts: int = 64
    """Held-out prompts per evaluation."""
    max_ref_kl: float = 0.0
    """Guardrail: ref-KL above this trips (0 = off)."""
    min_entropy: float = 0.0
    """Guardrail: mean entropy below this trips (0 = off)."""
    max_length_drift: float = 0.0
    """Guardrail: relative change of mean response length vs the first iteration above this trips (0 = off)."""
    max_repetition: float = 0.0
    """Guardrail: fraction of repeated n-grams above this trips (0 = off)."""
    max_gold_drop: float = 0.0
    """Guardrail: eval gold reward this far below its best of the last gold_window evals while proxy rose (0 = off)."""
    gold_window: int = 3
    """Held-out evaluations the gold-drop guardrail (ppo.max_gold_drop) looks back over (>= 2)."""
    guardrail_action: Literal["warn", "rollback", "stop"] = "warn"
    """What a tripped guardrail does: warn; roll back to the last good checkpoint and halve the LR; or stop."""


@dataclass(frozen=True)
class SupervisedStageConfig:
    """The optimisation fields every supervised stage has (``sft.*`` and ``rm.*``; the dotted keys are per stage)."""

    epochs: int = 3
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 16
    """Examples per optimizer step (global, across workers): conversations for sft, preference pairs for rm."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 1e-3
    """AdamW learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    max_seq_len: int = 256
    """Examples (a conversation, or each side of a pair) are truncated to this many tokens."""


@dataclass(frozen=True)
class SFTConfig(SupervisedStageConfig):
    """Supervised fine-tuning (rlchat sft)."""


@dataclass(frozen=True)
class RMConfig(SupervisedStageConfig):
    """Reward-model training on preference pairs (rlchat rm)."""

    name_or_path: str = ""
    """HF encoder or causal LM for the reward model; empty = a tiny model of model.arch."""
    init_from: str = ""
    """Policy checkpoint (e.g. the SFT run's best) whose trunk starts the reward model (the InstructGPT recipe)."""
    feedback: tuple[str, ...] = ()
    """Extra preference data: files, or feedback store URLs (postgresql://..., sqlite:///feedback.db)."""
    feedback_client_text: bool = False
    """Also train on store pairs whose text a client sent and no served reply confirms (preferences by text, ratings
    of unknown or edited replies): anyone with the API key can write those."""
    policy_samples: int = 0
    """Replies per data.prompts train prompt sampled from rm.init_from, checked, paired as extra data (0 = off)."""
    policy_pairs_per_prompt: int = 1
    """Pairs per prompt from those samples: 1 = best vs worst; more = each distinct wrong reply once."""
    kind: Literal["scalar", "implicit"] = "scalar"
    """scalar: a score head on a trunk; implicit: a causal LM scored by beta * log(pi_rm / pi_start) (DPO's reward)."""
    beta: float = 0.1
    """rm.kind=implicit: scale of the log-ratio score (DPO's beta)."""


@dataclass(frozen=True)
class RayConfig:
    """Where and with what the distributed parts run."""

    address: str = ""
    """Ray cluster address; empty = RAY_ADDRESS or a local Ray instance started on demand."""
    num_cpus: int = 0
    """CPUs of the local Ray instance (0 = all)."""
    learner_workers: int = 1
    """Ray Train workers of the learner / SFT / RM stages (DDP when > 1; 0 = each learns inside the driver process)."""
    learner_use_gpu: bool = False
    """Give each learner worker a GPU."""
    learner_cpus: float = 1.0
    """CPUs per learner worker."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources per learner worker, e.g. {"learner": 1}."""
    learner_threads: int = 0
    """Torch threads per learner worker; 0 = auto: the node's cores (split among its ranks) while updates run."""
    learner_max_failures: int = 3
    """Ray Train restarts of the learner workers after one dies; they resume from the last checkpoint (-1 = always)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint cadence and retention."""

    every: int = 10
    """Save every this many iterations / epochs (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    best_metric: str = ""
    """Metric key that picks the best checkpoint (empty = the stage's default)."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller best_metric is better."""
    init_from: str = ""
    """Start the policy from this checkpoint directory (PPO starts from the SFT checkpoint)."""


@dataclass(frozen=True)
class ServeConfig:
    """The Ray Serve chat endpoint."""

    host: str = "127.0.0.1"
    """HTTP host."""
    port: int = 8000
    """HTTP port."""
    replicas: int = 1
    """Minimum replicas."""
    max_replicas: int = 1
    """Maximum replicas (autoscaling when > replicas)."""
    target_ongoing_requests: float = 16.0
    """Autoscaling target of ongoing requests per replica."""
    max_batch_size: int = 16
    """Largest dynamic batch of concurrent requests (1 = no batching)."""
    batch_wait_timeout_s: float = 0.0
    """Idle batch only: how long the first arrival waits so a burst is prefilled together (0 = start at once)."""
    prefill_first: bool = False
    """Latency over throughput: new requests get a step of their own (off = they join the running rows' step)."""
    stream_interval_s: float = 0.02
    """Least seconds between a stream's SSE chunks (the first text at once); longer under load: stream_chunks_per_s."""
    stream_chunks_per_s: float = 160.0
    """SSE chunks/s a replica's streams share: each waits max(stream_interval_s, streams/this, <=0.25 s); 0 = off."""
    ingress: Literal["proxy", "haproxy"] = "proxy"
    """When rlchat serve starts Ray: proxy = Serve's Python proxy; haproxy = HAProxy to each replica (faster)."""
    engine_process: bool = True
    """Run each replica's decode loop in a process of its own (its own GIL; off = a thread of the replica)."""
    max_queued_requests: int = 64
    """Requests a replica lets wait to join the batch; beyond that new ones get 503 + Retry-After; 0 = no limit."""
    request_timeout_s: float = 60.0
    """Per-request deadline: still queued then -> 503 queue_timeout; still generating -> ends 'length'; 0 = none."""
    body_timeout_s: float = 10.0
    """A request's body must arrive within this (else 408); it holds no queue place meanwhile; 0 = no limit."""
    api_key: str = ""
    """If set, requests need Authorization: Bearer <api_key>; empty = api_key_file, else RLCHAT_API_KEY, else none."""
    api_key_file: str = ""
    """File whose first line is the API key (keeps it out of ps and YAML); used when api_key is empty."""
    strict_requests: bool = False
    """Refuse request keys OpenAI does not define with a 400 (default: ignore them, named in a response header)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API cross-origin (e.g. [https://app.example.com]; * = any); empty = off."""
    feedback_rate_limit: float = 60.0
    """Most POST /v1/feedback requests per minute per client address and replica (429 beyond); 0 = no limit."""
    max_messages: int = 64
    """Most messages per request."""
    max_chars: int = 32000
    """Most characters over all messages of a request."""
    max_tokens: int = 512
    """Largest max_tokens a request may ask for."""
    safety_filter: bool = False
    """Withhold replies that the reward library's safety component flags."""
    feedback_path: str = "feedback.jsonl"
    """Deprecated (feedback goes to feedback_store): only its directory is used, for the default feedback.db."""
    feedback_store: str = ""
    """Feedback database: postgresql://user:pw@host/db (clusters) or sqlite:///path.db; empty = feedback.db here."""
    transcripts: bool = False
    """Store conversation transcripts (messages and replies) in feedback_store; off by default for privacy."""
    transcript_retention_days: float = 30.0
    """Stored transcripts older than this many days are deleted."""
    request_retention_days: float = 30.0
    """Per-request rows (analytics, reply digests) older than this many days are deleted; stats keep their counts."""
    scrub_pii: bool = False
    """Replace e-mail addresses and phone numbers with [email] / [phone] in stored transcripts and feedback."""
    model_version: str = ""
    """Label stored with requests and feedback (rlchat feedback stats groups by it); empty = the checkpoint's dir."""
    log_bodies: bool = False
    """Log message bodies (off by default for privacy)."""
    versions: tuple[dict[str, str], ...] = ()
    """Checkpoints served side by side: [{name, checkpoint, weight}]; the app's model name splits by weight."""
    follow: bool = False
    """With --from-run: swap to each new best checkpoint of the run while it trains (rlchat serve --follow)."""
    follow_interval_s: float = 5.0
    """How often a following replica looks for a new best checkpoint."""
    num_gpus: float = 0.0
    """GPUs per replica: 0 (CPU), 1, or a fraction such as 0.5 to share one (the model then runs on CUDA)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {serve: 1} to place replicas on nodes that have it."""
    ship_checkpoint: Literal["auto", "always", "never"] = "auto"
    """Ship local checkpoints to replicas through Ray's object store: auto = when the cluster has several nodes."""
    checkpoint_cache: str = ""
    """Node-local directory for checkpoints copied from URIs or shipped; empty = <tmp>/rlchat-checkpoints."""
    checkpoint_cache_keep: int = 4
    """Checkpoint copies kept per node: the most recently used and any used in the last 10 min; 0 = all."""


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of one run."""

    seed: int = 0
    """Global seed (data split, init, sampling)."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def rollout_batch_size(self) -> int:
        """Episodes sampled per PPO iteration over all workers."""
        return max(1, self.rollout.num_workers) * self.rollout.envs_per_worker

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists instead of tuples), ready for YAML / JSON."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the form Tune param spaces and metrics use."""
        return flatten(self.to_dict())

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted keys replaced: ``cfg.replace(**{"ppo.clip_coef": 0.1})``."""
        return from_dict(self.to_dict(), dotted)


# --------------------------------------------------------------------------------------------------------------
# Validation (what / value / why / fix)
# --------------------------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, expected: str, fix: str, why: str = "") -> None:
    """Raise ``key=value: expected ... (why); fix`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}{f' ({why})' if why else ''}; {fix}", key)


FEEDBACK_STORE_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgres://")
"""URL forms ``serve.feedback_store`` accepts (checked here without importing the database layer)."""


def _validate(cfg: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    _check_finite(cfg)
    p, r = cfg.ppo, cfg.rollout
    for key in ("ppo.learning_rate", "sft.learning_rate", "rm.learning_rate"):
        v = _get(cfg, key)
        _check(v > 0, key, v, "a positive learning rate", "use e.g. 1e-4")
    _check(0 < p.clip_coef < 1, "ppo.clip_coef", p.clip_coef, "a value in (0, 1)", "use 0.1-0.3")
    _check(0 <= p.gamma <= 1, "ppo.gamma", p.gamma, "a value in [0, 1]", "use 1.0 for episodic chat")
    _check(0 <= p.gae_lambda <= 1, "ppo.gae_lambda", p.gae_lambda, "a value in [0, 1]", "use 0.95")
    _validate_ppo_coefficients(cfg)
    _check(p.update_epochs >= 1, "ppo.update_epochs", p.update_epochs, "at least 1", "use 1-4")
    _check(p.num_minibatches >= 1, "ppo.num_minibatches", p.num_minibatches, "at least 1", "use 1-8")
    _check(p.iterations >= 1, "ppo.iterations", p.iterations, "at least 1", "set a positive number of iterations")
    _check(
        r.envs_per_worker % p.num_minibatches == 0 or cfg.rollout_batch_size % p.num_minibatches == 0,
        "ppo.num_minibatches",
        p.num_minibatches,
        f"a divisor of the rollout batch size ({cfg.rollout_batch_size} = num_workers x envs_per_worker)",
        "change ppo.num_minibatches or rollout.envs_per_worker",
    )
    _check(r.num_workers >= 0, "rollout.num_workers", r.num_workers, ">= 0", "use 1 on a laptop (0 = in-process)")
    _check(cfg.ray.learner_workers >= 0, "ray.learner_workers", cfg.ray.learner_workers, ">= 0", "use 1 on a laptop")
    _check(
        cfg.ray.learner_max_failures >= -1,
        "ray.learner_max_failures",
        cfg.ray.learner_max_failures,
        ">= -1 (-1 = restart without limit)",
        "use 3, or 0 to fail the run on the first learner worker death",
    )
    _check(r.envs_per_worker >= 1, "rollout.envs_per_worker", r.envs_per_worker, "at least 1", "use 8-64")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "a positive temperature", "use 1.0 for PPO")
    _validate_rollout_sampling(r)
    rm = cfg.rm
    _check(
        rm.policy_samples == 0 or rm.policy_samples >= 2,
        "rm.policy_samples",
        rm.policy_samples,
        "0 (off) or at least 2 replies per prompt to compare",
        "use 4",
    )
    _check(rm.beta > 0, "rm.beta", rm.beta, "a positive scale of the implicit reward", "use 0.1")
    _check(
        rm.policy_pairs_per_prompt >= 1,
        "rm.policy_pairs_per_prompt",
        rm.policy_pairs_per_prompt,
        "at least 1",
        "use 1 (best vs worst) or 2-4",
    )
    _check(0 <= cfg.data.val_fraction < 1, "data.val_fraction", cfg.data.val_fraction, "a value in [0, 1)", "use 0.1")
    _check(
        cfg.data.max_line_bytes >= 1,
        "data.max_line_bytes",
        cfg.data.max_line_bytes,
        "a positive number of bytes",
        "use 1048576 (1 MiB, the default) or more for very long conversations",
    )
    _check(
        0 <= cfg.data.near_dedup_threshold <= 1,
        "data.near_dedup_threshold",
        cfg.data.near_dedup_threshold,
        "a Jaccard threshold in [0, 1]",
        "use 0 to disable or e.g. 0.85",
    )
    m = cfg.model
    if not m.name_or_path:
        _check(
            m.n_embd % m.n_head == 0,
            "model.n_embd",
            m.n_embd,
            f"a multiple of model.n_head ({m.n_head})",
            "change model.n_embd or model.n_head",
        )
    _check(
        cfg.env.max_turn_tokens < cfg.env.max_context,
        "env.max_turn_tokens",
        cfg.env.max_turn_tokens,
        f"fewer tokens than env.max_context ({cfg.env.max_context})",
        "raise env.max_context or lower env.max_turn_tokens",
    )
    _check(cfg.tokenizer.vocab_size >= 0, "tokenizer.vocab_size", cfg.tokenizer.vocab_size, ">= 0", "use 0 or 4096")
    if 0 < cfg.tokenizer.vocab_size < 300:
        _check(False, "tokenizer.vocab_size", cfg.tokenizer.vocab_size, ">= 300 (256 bytes + specials)", "use 4096")
    _check(
        cfg.reward.truncation_penalty <= 0,
        "reward.truncation_penalty",
        cfg.reward.truncation_penalty,
        "a penalty <= 0 (added to the reward of a turn cut by a limit)",
        "use e.g. -1.0, or 0 for none",
        "a positive value would reward replies that run into the token budget",
    )
    _check(
        cfg.reward.length_min <= cfg.reward.length_max,
        "reward.length_min",
        cfg.reward.length_min,
        f"<= reward.length_max ({cfg.reward.length_max})",
        "swap the two values",
    )
    s = cfg.serve
    _check(
        s.transcript_retention_days > 0,
        "serve.transcript_retention_days",
        s.transcript_retention_days,
        "a positive number of days",
        "use e.g. 30 (transcripts older than that are deleted)",
    )
    _check(
        s.request_retention_days > 0,
        "serve.request_retention_days",
        s.request_retention_days,
        "a positive number of days",
        "use e.g. 30 (a row per served completion older than that is deleted; its count is kept)",
    )
    _check(
        not s.feedback_store or s.feedback_store.startswith(FEEDBACK_STORE_SCHEMES),
        "serve.feedback_store",
        s.feedback_store,
        f"a database URL starting with one of {', '.join(FEEDBACK_STORE_SCHEMES)}, or empty",
        "use postgresql://USER:PASSWORD@HOST:5432/DB on a cluster, or sqlite:///feedback.db on one machine",
    )


def model_positions(model_dir: str | Path) -> int | None:
    """The context length (``max_position_embeddings`` / ``n_positions``) in a model directory's ``config.json``
    (also a multimodal model's ``text_config``); None when there is no such file or field (e.g. a hub id)."""
    import json

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(section.get(key), int) and section[key] > 0:
                return int(section[key])
    return None


def check_context_limits(cfg: Config, model_dir: str | Path | None = None) -> None:
    """``env.max_context`` must fit the policy's positions; checked when PPO starts (``check_ppo_config``).

    Why: the env grows a conversation (the prompt, kept to its last ``env.max_context - 1`` tokens, plus replies of
    up to ``env.max_turn_tokens`` each) to ``env.max_context`` tokens, and the rollout engine and the learner forward
    all of it. With more context than positions the first long prompt fails the run mid-way. (``_validate`` already
    keeps ``env.max_turn_tokens < env.max_context``.) Not part of ``_validate``: only PPO steps the env, and an SFT,
    RM or serving config may well pair a short model with the default ``env.max_context``.

    Args:
        cfg: the run config.
        model_dir: the directory of the weights PPO starts from (``checkpoint.init_from``); its config.json wins.

    Raises:
        ConfigError: what, the values of all three keys, why, and the fix.
    """
    e, m = cfg.env, cfg.model
    if model_dir is not None:
        limit, source = model_positions(model_dir), f"the positions of {model_dir}"
    elif m.name_or_path:
        limit, source = model_positions(m.name_or_path), f"the positions of {m.name_or_path}"
    else:
        limit, source = m.n_positions, "model.n_positions"
    if limit is None:  # a hub id or a config without the field: generation still ends rows at the model's limit
        return
    _check(
        e.max_context <= limit,
        "env.max_context",
        e.max_context,
        f"at most {source} ({limit})",
        f"lower env.max_context to {limit} (keeping env.max_turn_tokens below it) or use a model with more positions"
        + (" (raise model.n_positions)" if source == "model.n_positions" else ""),
        f"the env grows a conversation of prompt + replies of up to env.max_turn_tokens={e.max_turn_tokens} tokens to "
        "env.max_context tokens and the policy must hold them all, or the first long prompt fails the run",
    )


def _validate_ppo_coefficients(cfg: Config) -> None:
    """Signs and ranges of the PPO loss coefficients, KL control and guardrails.

    Why each bound matters: these values multiply or clip gradients, so a wrong sign does not fail loudly, it
    quietly optimises the opposite objective (a negative ``vf_coef`` maximises the value error) or disables a
    safety rule without saying so (``should_early_stop`` treats any ``target_kl <= 0`` as off).
    """
    p = cfg.ppo
    _check(
        p.vf_coef >= 0,
        "ppo.vf_coef",
        p.vf_coef,
        "a non-negative coefficient",
        "use 0.5 (cleanrl's default); 0 leaves the value head untrained",
        "a negative one would push the critic away from the returns",
    )
    _check(
        p.ent_coef >= 0,
        "ppo.ent_coef",
        p.ent_coef,
        "a non-negative coefficient",
        "use 0.0 (off) or a small bonus such as 0.01",
        "a negative one penalises entropy and drives the policy to collapse",
    )
    for key in ("ppo.max_grad_norm", "sft.max_grad_norm", "rm.max_grad_norm"):
        v = _get(cfg, key)
        _check(
            v > 0,
            key,
            v,
            "a positive gradient-norm bound",
            "use 0.5-1.0 (a very large value such as 1e9 effectively turns clipping off)",
            "gradients are rescaled to at most this norm, so 0 zeroes every update and a negative value flips it",
        )
    _check(
        p.target_kl >= 0,
        "ppo.target_kl",
        p.target_kl,
        "a non-negative target, 0 = off",
        "use 0 to disable early stopping or e.g. 0.02",
        "the epoch loop stops at approx_kl > 1.5 * target_kl; a negative value would silently disable it",
    )
    _check(
        p.kl_coef >= 0,
        "ppo.kl_coef",
        p.kl_coef,
        "a non-negative coefficient",
        "use 0 to disable the KL penalty or e.g. 0.05",
        "a negative one would reward moving away from the reference model",
    )
    if p.adaptive_kl:
        _check(
            p.adaptive_kl_target > 0,
            "ppo.adaptive_kl_target",
            p.adaptive_kl_target,
            "a positive target KL for ppo.adaptive_kl=true",
            "use e.g. 6.0 (Ziegler et al. 2019), or set ppo.adaptive_kl=false to keep kl_coef fixed",
            "the controller's error is KL / adaptive_kl_target - 1",
        )
        _check(
            p.kl_horizon >= 1,
            "ppo.kl_horizon",
            p.kl_horizon,
            "a positive horizon for ppo.adaptive_kl=true",
            "use e.g. 10000",
            "each iteration multiplies kl_coef by 1 + error * episodes / kl_horizon",
        )
        _check(
            p.kl_coef > 0,
            "ppo.kl_coef",
            p.kl_coef,
            "a positive initial coefficient for ppo.adaptive_kl=true",
            "use e.g. 0.05, or set ppo.adaptive_kl=false for no KL penalty",
            "the adaptive controller multiplies kl_coef, so from 0 it can never move",
        )
    # The KL estimator must suit where the penalty acts (Shah et al. 2025, "A Comedy of Estimators"; joschu's note).
    _check(
        p.kl_in_loss or p.kl_estimator == "k1",
        "ppo.kl_estimator",
        p.kl_estimator,
        "k1 for the KL penalty in the reward",
        "set ppo.kl_estimator=k1 to keep the penalty in the reward, or ppo.kl_in_loss=true to use k3 as a "
        "differentiable loss term (GRPO)",
        "k3 as a detached per-token reward has a biased gradient: its score-function gradient is not the KL's and "
        "is ~0 near the reference, so the penalty barely holds the policy; k1's is the KL's gradient",
    )
    _check(
        not p.kl_in_loss or p.kl_estimator == "k3",
        "ppo.kl_in_loss",
        p.kl_in_loss,
        "ppo.kl_estimator=k3 with a KL loss term",
        "set ppo.kl_estimator=k3, or ppo.kl_in_loss=false for a k1 penalty in the reward",
        "a k1 loss term has zero expected gradient (E[grad log pi] = 0), so it would not regularise at all",
    )
    _check(p.weight_decay >= 0, "ppo.weight_decay", p.weight_decay, "a non-negative decay", "use 0.0 or e.g. 0.01")
    g = cfg.rollout.samples_per_prompt
    _check(g >= 1, "rollout.samples_per_prompt", g, "at least 1", "use 1 (one reply per prompt) or e.g. 4")
    _check(
        cfg.rollout.envs_per_worker % g == 0,
        "rollout.samples_per_prompt",
        g,
        f"a divisor of rollout.envs_per_worker={cfg.rollout.envs_per_worker}",
        "pick envs_per_worker as a multiple of samples_per_prompt",
        "each worker samples whole groups, so every group's replies share one batch",
    )
    _check(
        p.advantage == "gae" or g >= 2,
        "ppo.advantage",
        p.advantage,
        "rollout.samples_per_prompt >= 2 for a group baseline",
        "set rollout.samples_per_prompt=4 (or more), or ppo.advantage=gae",
        "grpo / rloo compare each reply with the other replies to the same prompt; one reply has no baseline",
    )
    _check(
        not p.dr_grpo or p.advantage == "grpo",
        "ppo.dr_grpo",
        p.dr_grpo,
        "ppo.advantage=grpo",
        "set ppo.advantage=grpo, or drop ppo.dr_grpo",
    )
    guard_keys: tuple[str, ...] = ("ppo.max_ref_kl", "ppo.min_entropy", "ppo.max_length_drift", "ppo.max_repetition")
    guard_keys += ("ppo.max_gold_drop",)
    for key in guard_keys:
        v = _get(cfg, key)
        _check(
            v >= 0,
            key,
            v,
            "a non-negative guardrail bound, 0 = off",
            "use 0 to turn this guardrail off",
            "guardrails ignore bounds <= 0, so a negative value would silently disable it",
        )
    _check(
        p.gold_window >= 2,
        "ppo.gold_window",
        p.gold_window,
        "at least 2 held-out evaluations",
        "use 3 (the default)",
        "a fall from the best needs a best and a later evaluation",
    )
    _check(
        p.max_repetition <= 1,
        "ppo.max_repetition",
        p.max_repetition,
        "a fraction in [0, 1]",
        "use e.g. 0.5, or 0 to turn this guardrail off",
    )


def _validate_rollout_sampling(r: RolloutConfig) -> None:
    """Rollout sampling must be the plain temperature-scaled softmax: no top-k / top-p filtering.

    The ``rollout`` section configures only PPO's rollout workers (chat, eval, batch generation and serving take
    their own decoding parameters), so this is the check of the PPO train config. Why: the learner recomputes the
    log-probs of the sampled tokens under the full (temperature-scaled) softmax; a top-k / top-p sampler draws from
    a renormalised, truncated distribution instead, so ``exp(logp_new - logp_old)`` would not be the importance
    ratio of the policy that acted, and the PPO update and KL estimates would be biased.
    """
    why = (
        "PPO's learner recomputes log-probs under the full softmax and cannot reproduce a truncated sampling "
        "distribution, so the PPO ratio and KL would be biased"
    )
    fix = (
        "set rollout.top_k=0 and rollout.top_p=1.0 (rollout.temperature is fine to change: the learner applies it "
        "too; filtering belongs to the chat / serving decoding settings)"
    )
    _check(r.top_k == 0, "rollout.top_k", r.top_k, "0 (no top-k filtering) for PPO rollouts", fix, why)
    _check(r.top_p == 1.0, "rollout.top_p", r.top_p, "1.0 (no nucleus filtering) for PPO rollouts", fix, why)


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float field (and float mapping value) of ``cfg`` is finite, or the infinite default of its field.

    The parser already refuses ``.nan`` / ``inf`` from YAML and overrides; this also covers sections constructed
    directly in Python (``PPOConfig(vf_coef=float("nan"))``), where no parser runs.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float):
            _require_finite(key, value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, float):
                    _require_finite(f"{key}.{k}", v)


def _field_default(dotted: str) -> Any:
    """The schema default of a leaf key (``data.min_quality`` -> ``-inf``), or None when it is not a field."""
    parent, _, name = dotted.rpartition(".")
    cls = _section_of(parent) if parent else Config
    if cls is None:
        return None
    for f in dataclasses.fields(cls):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    return None


def _require_finite(key: str, value: float, given: Any = None) -> float:
    """``value`` if finite (or the field's own infinite default, e.g. ``data.min_quality=-inf`` = no threshold).

    Why: NaN compares false with everything, so ``nan > 0`` checks pass it silently downstream and it turns
    every loss it touches into NaN; infinities make thresholds that always or never trip.
    """
    if math.isfinite(value):
        return value
    default = _field_default(key)
    if isinstance(default, float) and value == default:
        return value
    found = "NaN" if math.isnan(value) else "an infinity"
    infinite_default = isinstance(default, float) and math.isinf(default)
    allowed = f" (the only infinite value {key} accepts is its default {default!r}, = off)" if infinite_default else ""
    shown = value if given is None else given
    raise ConfigError(
        f"{key}={shown!r}: expected a finite number, found {found}{allowed}; non-finite values turn losses and "
        "thresholds into NaN or make them never trip, so set a finite number",
        key,
    )


# --------------------------------------------------------------------------------------------------------------
# Field docs, typing and coercion
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written right under each field of a config dataclass (inherited fields: the base's)."""
    docs: dict[str, str] = {}
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value.strip()
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + _describe(typing.get_args(tp)[0]) + "s"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_describe(k)} to {_describe(v)}"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML-parsed value to the field's type, or raise a ConfigError naming key, value and type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}={value!r}: expected {_describe(tp)}; fix the value in the YAML file or override", key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_coerce(key, k, kt): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise bad  # no unions in the schema
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    number = float(value)  # YAML 1.1 reads "1e-4" as a string
                except ValueError:
                    raise bad from None
                return _require_finite(key, number, value)
            raise bad
        return _require_finite(key, float(value), value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _show_given(key: str, value: Any, limit: int = 80) -> str:
    """``key=value`` as the user wrote it, shortened so a whole mistyped section does not flood the message."""
    text = repr(value)
    return f"{key}={text if len(text) <= limit else text[: limit - 3] + '...'}"


def _unknown(key: str, cls: type, given: str) -> ConfigError:
    """Unknown ``key`` (a section or a leaf) inside ``cls``; ``given`` is the ``key=value`` the user wrote."""
    names = [f.name for f in dataclasses.fields(cls)]
    import difflib

    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=1)
    hint = f"did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown config key '{key}' (given {given}); valid keys here: {', '.join(names)}. {hint}".strip(), key
    )


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}={data!r}: expected a mapping of keys to values",
            prefix.rstrip(".") or None,
        )
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown(prefix + str(key), cls, _show_given(prefix + str(key), value))
        tp = hints[key]
        if _is_section(tp):
            kwargs[key] = _build(tp, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(prefix + key, value, tp)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Dotted keys, YAML
# --------------------------------------------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys. Dict-valued fields (e.g. reward.plugins) stay values, not sections."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict) and _section_of(key) is not None:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _section_of(dotted: str) -> type | None:
    cls: Any = Config
    for part in dotted.split("."):
        hints = _hints(cls)
        if part not in hints or not _is_section(hints[part]):
            return None
        cls = hints[part]
    return cls


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"ppo.clip_coef=0.1"`` -> ``("ppo.clip_coef", 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. ppo.clip_coef=0.1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e.__class__.__name__})") from None
    return key.strip(), value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cls: Any = Config
    node = d
    for i, part in enumerate(parts[:-1]):
        hints = _hints(cls)
        if part not in hints or not _is_section(hints[part]):
            raise _unknown(".".join(parts[: i + 1]), cls, _show_given(key, value))
        cls = hints[part]
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a section; expected a mapping")
    if parts[-1] not in _hints(cls):
        raise _unknown(key, cls, _show_given(key, value))
    node[parts[-1]] = value


def from_dict(data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build and validate a Config from a nested dict plus dotted-key overrides."""
    import copy

    merged = _renamed(copy.deepcopy(data or {}))
    for key, value in (overrides or {}).items():
        _set_dotted(merged, RENAMED_KEYS.get(key, key) if _warn_renamed(key) else key, value)
    return _build(Config, merged)


RENAMED_KEYS: dict[str, str] = {"ppo.kl_target": "ppo.adaptive_kl_target"}
"""Old dotted key -> its new name. An old key is still accepted, with a one-line FutureWarning, for one release
(0.2 removes them): ``ppo.kl_target`` read one letter away from ``ppo.target_kl``, the early-stop threshold."""


def _warn_renamed(key: str) -> bool:
    """Warn (once per key and call site) when ``key`` is a renamed one; returns whether it is."""
    new = RENAMED_KEYS.get(key)
    if new is not None:
        warnings.warn(f"{key} is renamed {new}; the old name stops working in rlchat 0.2", FutureWarning, stacklevel=3)
    return new is not None


def _renamed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested config dict) with renamed keys moved to their new names.

    Raises:
        ConfigError: both the old and the new name are given.
    """
    for old, new in RENAMED_KEYS.items():
        (section, old_name), (_, new_name) = old.split(".", 1), new.split(".", 1)
        block = data.get(section)
        if not isinstance(block, dict) or old_name not in block:
            continue
        if new_name in block:
            raise ConfigError(f"{old} and {new} are both set; {old} is the old name of {new}: keep only {new}")
        _warn_renamed(old)
        block[new_name] = block.pop(old_name)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, bad value, unreadable or invalid YAML (with file and line).
    """
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        data, text = load_yaml_mapping(path, "config file", "config sections", "configs/demo.yaml")
    given: dict[str, str] = {}  # dotted key -> the override as the user wrote it
    if isinstance(overrides, list):
        parsed = [(o, parse_override(o)) for o in overrides]
        given = {kv[0]: o for o, kv in parsed}
        overrides = dict(kv for _, kv in parsed)
    elif overrides:
        given = {k: f"{k}={v}" for k, v in overrides.items()}
    try:
        return resolve_paths(from_dict(data, overrides))
    except ConfigError as e:
        raise _blamed(e, path, text, given) from None


def _blamed(e: ConfigError, path: str | Path | None, text: str, given: dict[str, str]) -> ConfigError:
    """``e`` prefixed with where its key was set: the command-line override that set it (it wins over the file),
    else ``file:line`` of the key in the YAML file (``file`` alone when the key is not written there)."""
    key = e.key
    if path is None:
        return e  # overrides alone: the message names the key=value already
    if key is not None:
        for k, text_given in given.items():
            k = RENAMED_KEYS.get(k, k)  # the error names the new key
            # the key itself, a sub-key of a mapping field (reward.plugins.x), or a section an override misnamed
            if key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + "."):
                return ConfigError(f"override {text_given}: {e}", key)
    line = None
    if key is not None:
        lines = yaml_key_lines(text)
        for old, new in RENAMED_KEYS.items():  # written under its old name
            if old in lines and new not in lines:
                lines[new] = lines[old]
        parts = key.split("[", 1)[0].split(".")
        for n in range(len(parts), 0, -1):  # the key, else the closest enclosing key written in the file
            line = lines.get(".".join(parts[:n]))
            if line is not None:
                break
    return ConfigError(f"{path}{f':{line}' if line else ''}: {e}", key)


# --------------------------------------------------------------------------------------------------------------
# Paths: resolved once, at the boundary
# --------------------------------------------------------------------------------------------------------------

PATH_KEYS: tuple[str, ...] = (
    "data.sft",
    "data.preferences",
    "data.prompts",
    "rm.feedback",
    "checkpoint.init_from",
    "reward.model_path",
    "rm.init_from",
)
"""Config keys that always name a local file or directory (unless a ``builtin:`` set or a URI).

(``serve.feedback_path`` and a relative ``sqlite:///`` ``serve.feedback_store`` are resolved by ``rlchat serve``
itself, on the driver, where the server starts.)"""

PATH_OR_ID_KEYS: tuple[str, ...] = (
    "model.name_or_path",
    "rm.name_or_path",
    "reward.coherence_model",
    "reward.safety_classifier",
    "tokenizer.encoding",
)
"""Config keys that name either a local path or a hub id / encoding name: resolved only when they are a path."""


def resolve_path(value: str, base: str | Path | None = None, maybe_id: bool = False) -> str:
    """``value`` as an absolute path string, or unchanged when it is empty, ``builtin:...``, a URI or a hub id.

    Why here: a relative path means "relative to where the user typed the command". Ray tasks, actors and Ray
    Train workers run in other working directories (Ray Train's workers chdir into their own session folder), so
    a relative path that reaches them silently names a different file. Resolving once, where the user's input
    enters (config load and CLI arguments), keeps every call site path-agnostic.

    Args:
        value: what the user wrote.
        base: directory relative paths are taken from (default: the current working directory).
        maybe_id: the value may also be a hub id (``org/model``) or an encoding name: it is resolved only when it
            exists locally or is written as a path (``./x``, ``../x``, ``~/x``, absolute).
    """
    if not value or value.startswith("builtin:") or "://" in value:
        return value
    path = Path(value).expanduser()
    if maybe_id and not (
        path.is_absolute() or value.startswith(("./", "../", "~", ".\\")) or (Path(base or ".") / path).exists()
    ):
        return value
    if path.is_absolute():
        return str(path)
    return str((Path(base) if base is not None else Path.cwd()).joinpath(path).resolve())


def resolve_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """A copy of ``cfg`` whose path-valued keys (:data:`PATH_KEYS`, :data:`PATH_OR_ID_KEYS`) are absolute."""
    flat = cfg.flat()
    changes: dict[str, Any] = {}
    for key in PATH_KEYS + PATH_OR_ID_KEYS:
        value = flat[key]
        maybe_id = key in PATH_OR_ID_KEYS
        if isinstance(value, (list, tuple)):
            new: Any = [resolve_path(v, base, maybe_id) for v in value]
            if list(new) != list(value):
                changes[key] = new
        elif isinstance(value, str) and (new := resolve_path(value, base, maybe_id)) != value:
            changes[key] = new
    return cfg.replace(**changes) if changes else cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `rlchat config show` prints and run dirs store)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg), encoding="utf-8")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field: the reference table in docs and `--help` listings."""
    rows: list[tuple[str, str, str]] = []
    defaults = Config().flat()

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            if _is_section(tp):
                walk(tp, prefix + f.name + ".")
            else:
                rows.append((prefix + f.name, repr(defaults[prefix + f.name]), docs.get(f.name, "")))

    walk(Config, "")
    return rows
