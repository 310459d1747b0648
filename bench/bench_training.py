"""Benchmark: training tokens/s of our step vs a naive reference step (issue #4), same pairs, CPU.

Model: SmolLM2-135M + LoRA + [EMB] + proj + tau exactly as ``configs/demo.yaml`` builds it
(``build_notellm(..., for_training=True)``), one process (W = 1), ``torch.set_num_threads(--threads)``.
Every variant runs in its own subprocess (``--worker``), so its peak RSS is its own; the workers
are warmed up one after the other, then timed round-robin (one step of each variant per round, one
process computing at a time), so every variant sees the same machine load.

Variants
--------
* ``ours``: ``notellm.training.train_step`` — bf16 autocast with the frozen base weights stored in
  bf16 (``base_weights_dtype``), LM head applied to the output tokens
  only (``csft_loss``), length-aware batches (``BatchPlan``) padded to the batch max.
* ``naive``: the REFERENCE, ``naive_step`` below — what a straightforward first attempt writes:
  fp32, ``causal_lm(...).logits`` over EVERY position then cross-entropy with the labels, random
  batches padded to the longest prompt of the training set. Same model, LoRA, GCL loss, loss
  weights, gradient clipping, AdamW and schedule (``build_optimizer``).
* ``--ablations``: the naive step with ONE of ours' three changes: ``naive+bf16``,
  ``naive+output-logits``, ``naive+length-aware``.

Same data: the pairs of ``BatchPlan``'s first ``warmup + steps`` global batches (epoch 0, seed
``training.seed``). Length-aware variants use those batches as they are; random variants regroup
the same pairs at random (warm-up and timed pairs separately), so every variant processes exactly
the same real tokens in its timed steps. tokens/s = real (non-pad) prompt tokens of the timed steps
/ their summed seconds (notes/s and steps/s likewise); the median step time is printed too. The
ratio is ours' tokens/s over naive's. The first warm-up step runs under
``torch.utils.flop_counter.FlopCounterMode`` (a cross-check of the FLOP formula below, untimed).

FLOPs of one step (matmuls only; norms, activations, softmax, the optimizer are left out)
-----------------------------------------------------------------------------------------
Per token position processed (``P_base``: frozen 2-D weights of the decoder layers, q/k/v/o/gate/
up/down; ``P_lora``: their LoRA A and B): forward ``2 (P_base + P_lora)``; backward ``2 (P_base +
P_lora)`` for the activation gradients (they must reach the first layer's LoRA) plus ``2 P_lora``
for the LoRA weight gradients; frozen weights get no weight gradient. So ``4 P_base + 6 P_lora``
(the ``6N`` rule is for full fine-tuning; LoRA training is ~``4N``).
Attention scores and values, per sequence of length T: forward ``4 n_layers d_attn T^2`` (QK^T and
AV over the full T x T, no causal halving, the PaLM convention), backward twice that: ``12 n_layers
d_attn T^2``.
LM head, per position whose logits are computed: ``6 V H`` (forward, input gradient, and the
weight gradient: the tied head's ``[EMB]`` row is trainable, so autograd forms the full [V, H]
gradient of the merged weight).  ``proj``: ``6 H d_emb`` per note.

* executed FLOPs (what the variant computes): positions = rows x padded length T, attention on
  T^2 per row, logits at the output positions (ours) or at every position (naive);
* useful FLOPs (the same for every variant: the same pairs): real tokens, attention on len^2 per
  note, logits at the output positions.
Achieved FLOP/s = FLOPs of the timed steps / their seconds; the fraction of peak divides by the
machine's measured matmul peak: the best of timed 2048x2048 @ 2048x2048 matmuls in bf16 and fp32 on
the same number of threads, measured before and after the variants (the two show drift). Other
processes may share the CPU: read per-step times in the JSON for noise.

    .venv/bin/python -m bench.bench_training [--steps 8] [--warmup 1] [--pairs-per-batch 8] [--ablations]

Output: a table on stdout and ``bench/out/training.json``. Inputs: ``work/demo/{pairs,prompts}``
(``make demo``, or ``python -m pipelines.ingest``, ``pipelines.mine_pairs`` then
``pipelines.build_prompts`` with ``--config configs/demo.yaml``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from notellm.config import REPO_ROOT, PipelineConfig, load_config
from notellm.io_utils import atomic_write_text
from notellm.losses import csft_loss, gathered_gcl_loss, total_loss
from notellm.modeling import NoteLLM, attention_mask_from_lengths, base_weights_dtype, build_notellm
from notellm.prompts import IGNORE_INDEX
from notellm.training import (BatchPlan, TrainingData, TrainingDataError, build_optimizer,
                              check_training_inputs, collate, load_training_data, seed_everything,
                              train_step)

CONFIG = REPO_ROOT / "configs" / "demo.yaml"
"""The model, LoRA, loss and optimizer settings, and the data (``data.work_dir``) benchmarked."""
OUT = REPO_ROOT / "bench" / "out"
PEAK_MATMUL_SIZE = 2048
"""Square matmul (n x n @ n x n) timed for the machine's peak FLOP/s."""
PEAK_MATMUL_REPEATS = 20
RESULT_PREFIX = "RESULT "
"""A worker's last stdout line: this prefix + its JSON result."""


@dataclass(frozen=True)
class Variant:
    """One training step implementation: the library's ``train_step`` or ``naive_step`` with flags."""

    name: str
    library_step: bool
    bf16: bool
    output_logits_only: bool
    length_aware: bool


VARIANTS = {v.name: v for v in [
    Variant("ours", library_step=True, bf16=True, output_logits_only=True, length_aware=True),
    Variant("naive", library_step=False, bf16=False, output_logits_only=False, length_aware=False),
    Variant("naive+bf16", library_step=False, bf16=True, output_logits_only=False, length_aware=False),
    Variant("naive+output-logits", library_step=False, bf16=False, output_logits_only=True,
            length_aware=False),
    Variant("naive+length-aware", library_step=False, bf16=False, output_logits_only=False,
            length_aware=True),
]}
MAIN_VARIANTS = ["ours", "naive"]
ABLATION_VARIANTS = ["naive+bf16", "naive+output-logits", "naive+length-aware"]


# ---------------------------------------------------------------------------------------------
# The naive REFERENCE step
# ---------------------------------------------------------------------------------------------


def naive_step(model: NoteLLM, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: PipelineConfig, *,
               bf16: bool = False, output_logits_only: bool = False) -> float:
    """REFERENCE training step, as a first attempt writes it (defaults: fp32, all logits).

    ``batch``: ``collate`` output (``input_ids`` [2b, T], ``lengths``, ``emb_pos``, ``labels``
    [2b, T], ``note_ids``). All logits: the HF causal LM returns [2b, T, V] logits for every
    position; cross-entropy against the shifted labels (IGNORE_INDEX everywhere but the output
    tokens). Same GCL and total loss as ``train_step``. Returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if output_logits_only:
            emb, hidden = model(batch)
            l_gen = csft_loss(hidden, batch["labels"], model.lm_logits)
        else:
            mask = attention_mask_from_lengths(batch["lengths"], batch["input_ids"].shape[1])
            out = model.causal_lm(input_ids=batch["input_ids"], attention_mask=mask,
                                  output_hidden_states=True)
            logits = out.logits.float()  # [2b, T, V]
            l_gen = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
            emb = model.pool(out.hidden_states[-1], batch["emb_pos"])
        l_cl = gathered_gcl_loss(emb, batch["note_ids"], model.tau)
        loss = total_loss(l_cl, l_gen, cfg.training.alpha)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                   cfg.training.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def pad_to_length(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (``pad_id``) and ``labels`` (IGNORE_INDEX) [2b, T] to [2b, length]."""
    extra = length - batch["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"batch length {batch['input_ids'].shape[1]} exceeds the pad length {length}")
    out = dict(batch)
    out["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=pad_id)
    out["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    return out


def benchmark_batches(data: TrainingData, pairs_per_batch: int, seed: int, warmup: int, steps: int,
                      length_aware: bool, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """``warmup + steps`` local batches (W = 1) of the pairs of ``BatchPlan``'s first global steps.

    Length-aware: those batches as they are (padded to the batch max). Otherwise: the same pairs
    regrouped at random (warm-up and timed pairs apart) and padded to the longest training prompt."""
    plan = BatchPlan(data, pairs_per_batch, seed)
    groups = np.stack([plan.global_pairs(s) for s in range(warmup + steps)])  # [n, B]
    if length_aware:
        return [collate(data, g, pad_id) for g in groups]
    rng = np.random.default_rng(seed)
    regrouped = [rng.permutation(part.reshape(-1)).reshape(-1, pairs_per_batch)
                 for part in (groups[:warmup], groups[warmup:])]
    longest = max(len(ids) for ids in data.input_ids)
    return [pad_to_length(collate(data, g, pad_id), longest, pad_id) for g in np.concatenate(regrouped)]


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """What the FLOP formula needs (module docstring)."""

    n_layers: int
    hidden: int
    d_attn: int
    vocab: int
    emb_dim: int
    base_params: int
    lora_params: int


def model_dims(model: NoteLLM) -> ModelDims:
    """Read the dimensions and the decoder-layer 2-D weight counts (frozen base vs LoRA)."""
    decoder = model.decoder()
    config = decoder.config
    base = lora = 0
    for name, p in decoder.layers.named_parameters():
        if p.ndim == 2:
            if "lora_" in name:
                lora += p.numel()
            else:
                base += p.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    vocab, hidden = model.lm_head_weight().shape
    return ModelDims(n_layers=config.num_hidden_layers, hidden=hidden,
                     d_attn=config.num_attention_heads * head_dim, vocab=vocab,
                     emb_dim=model.emb_dim, base_params=base, lora_params=lora)


def step_flops(dims: ModelDims, seq_lens: list[int], logit_positions: int) -> dict[str, float]:
    """Training FLOPs (forward + backward) of rows of lengths ``seq_lens`` (module docstring)."""
    positions = sum(seq_lens)
    layers = positions * (4 * dims.base_params + 6 * dims.lora_params)
    attention = 12 * dims.n_layers * dims.d_attn * sum(t * t for t in seq_lens)
    head = logit_positions * 6 * dims.vocab * dims.hidden
    proj = len(seq_lens) * 6 * dims.hidden * dims.emb_dim
    return {"total": float(layers + attention + head + proj), "layers": float(layers),
            "attention": float(attention), "lm_head": float(head), "proj": float(proj)}


def batch_flops(dims: ModelDims, batch: dict[str, torch.Tensor], output_logits_only: bool
                ) -> dict[str, dict[str, float]]:
    """Executed and useful FLOPs of one batch (module docstring)."""
    rows, width = batch["input_ids"].shape
    n_out = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    executed = step_flops(dims, [width] * rows, n_out if output_logits_only else rows * width)
    useful = step_flops(dims, batch["lengths"].tolist(), n_out)
    return {"executed": executed, "useful": useful}


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int = PEAK_MATMUL_SIZE, repeats: int = PEAK_MATMUL_REPEATS
                ) -> dict[str, float]:
    """FLOP/s of an n x n @ n x n matmul in ``dtype``: best and median of ``repeats`` timings."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - started)
    flops = 2 * n**3
    return {"best_flops_per_s": flops / min(seconds),
            "median_flops_per_s": flops / statistics.median(seconds)}


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), between timed steps: idle
    workers then hold little more than their model, so several can wait side by side."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_worker(variant: Variant, steps: int, warmup: int, pairs_per_batch: int, threads: int
               ) -> dict[str, Any]:
    """Build the model, print ``BUILT``; on a ``warmup`` line from stdin run ``warmup`` untimed steps
    and print ``READY``; then run one timed step per ``step`` line (answering ``DONE <seconds>``)
    until stdin closes or ``steps`` steps ran."""
    torch.set_num_threads(threads)
    cfg = load_config(CONFIG, ["training.num_workers=1", f"training.pairs_per_batch={pairs_per_batch}",
                               f"training.bf16={str(variant.bf16).lower()}"])
    try:
        data = load_training_data(cfg)
    except TrainingDataError as err:
        raise SystemExit(f"{err}\n(with --config {CONFIG.relative_to(REPO_ROOT)}: `make demo`, or "
                         "pipelines.ingest, pipelines.mine_pairs then pipelines.build_prompts)") from err
    seed_everything(cfg.training.seed)
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=True,
                             dtype=base_weights_dtype(cfg.training.bf16, cfg.lora.enabled))
    check_training_inputs(data, cfg, model.emb_token_id)
    optimizer, scheduler = build_optimizer(model, cfg)
    dims = model_dims(model)
    batches = benchmark_batches(data, pairs_per_batch, cfg.training.seed, warmup, steps,
                                variant.length_aware, model.pad_token_id)
    rss_after_build = psutil.Process().memory_info().rss
    print("BUILT", flush=True)
    if sys.stdin.readline().strip() != "warmup":
        raise SystemExit(f"[{variant.name}] expected 'warmup' on stdin")

    def step(batch: dict[str, torch.Tensor]) -> None:
        if variant.library_step:
            train_step(model, batch, optimizer, scheduler, cfg)
        else:
            naive_step(model, batch, optimizer, scheduler, cfg, bf16=variant.bf16,
                       output_logits_only=variant.output_logits_only)

    # warm-up; the first step also checks the FLOP formula against torch's counter (matmuls only)
    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    first = batch_flops(dims, batches[0], variant.output_logits_only)["executed"]
    flop_check = {"counted_matmul_flops": float(counter.get_total_flops()),
                  "formula_matmul_flops": first["total"] - first["attention"]}
    for batch in batches[1:warmup]:
        step(batch)
    release_free_memory()
    print("READY", flush=True)
    seconds, tokens, notes, padded, executed, useful = [], 0, 0, 0, 0.0, 0.0
    for batch in batches[warmup:]:
        if sys.stdin.readline().strip() != "step":
            break
        started = time.perf_counter()
        step(batch)
        seconds.append(time.perf_counter() - started)
        print(f"DONE {seconds[-1]:.3f}", flush=True)
        tokens += int(batch["lengths"].sum())
        notes += int(batch["lengths"].numel())
        padded += int(batch["input_ids"].numel())
        flops = batch_flops(dims, batch, variant.output_logits_only)
        executed += flops["executed"]["total"]
        useful += flops["useful"]["total"]
        release_free_memory()
    total_s = sum(seconds)
    return {
        "variant": asdict(variant), "steps": len(seconds), "warmup": warmup,
        "pairs_per_batch": pairs_per_batch, "threads": threads, "step_seconds": seconds,
        "median_step_s": statistics.median(seconds), "total_s": total_s, "real_tokens": tokens,
        "padded_tokens": padded, "notes": notes, "tokens_per_s": tokens / total_s,
        "notes_per_s": notes / total_s, "steps_per_s": len(seconds) / total_s,
        "executed_flops": executed, "useful_flops": useful,
        "executed_flops_per_s": executed / total_s, "useful_flops_per_s": useful / total_s,
        "flop_check_first_warmup_step": flop_check, "model_dims": asdict(dims),
        "rss_after_build_gb": rss_after_build / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def run_interleaved(steps_of: dict[str, int], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Start one ``--worker`` subprocess per variant (progress on stderr), warm them up one after the
    other, then time round-robin: round r runs one step of each variant with more than r steps, one
    process at a time (one step's activations in memory at a time), so every variant sees the same
    machine load. Returns the parsed results."""
    workers: dict[str, subprocess.Popen] = {}
    for name, steps in steps_of.items():
        command = [sys.executable, "-m", "bench.bench_training", "--worker", name, "--steps", str(steps),
                   "--warmup", str(args.warmup), "--pairs-per-batch", str(args.pairs_per_batch),
                   "--threads", str(args.threads)]
        workers[name] = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)

    def expect(name: str, prefix: str) -> str:
        line = workers[name].stdout.readline()
        while line and not line.startswith(prefix):
            line = workers[name].stdout.readline()
        if not line:
            raise SystemExit(f"variant {name} exited (code {workers[name].wait()}) before {prefix!r}; "
                             "see its stderr above")
        return line[len(prefix):].strip()

    def command(name: str, line: str) -> None:
        workers[name].stdin.write(line + "\n")
        workers[name].stdin.flush()

    for name in workers:
        expect(name, "BUILT")
    for name in workers:
        started = time.perf_counter()
        command(name, "warmup")
        expect(name, "READY")
        print(f"[{name}] warm-up: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    for r in range(max(steps_of.values())):
        for name, steps in steps_of.items():
            if r < steps:
                command(name, "step")
                print(f"[{name}] step {r}: {float(expect(name, 'DONE ')):.2f}s", file=sys.stderr, flush=True)
    results = {}
    for name, worker in workers.items():
        worker.stdin.close()
        results[name] = json.loads(expect(name, RESULT_PREFIX))
        worker.wait()
    return results


def print_table(results: dict[str, dict[str, Any]], peaks: dict[str, float]) -> None:
    header = (f"{'variant':<20} {'median s':>9} {'steps/s':>8} {'tokens/s':>9} {'notes/s':>8} "
              f"{'pad %':>6} {'exec GF/s':>10} {'useful GF/s':>12} {'% bf16 pk':>10} {'% fp32 pk':>10} "
              f"{'peak RSS GB':>12}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        pad = 100 * (1 - r["real_tokens"] / r["padded_tokens"])
        print(f"{name:<20} {r['median_step_s']:>9.2f} {r['steps_per_s']:>8.3f} {r['tokens_per_s']:>9.1f} "
              f"{r['notes_per_s']:>8.2f} {pad:>6.1f} {r['executed_flops_per_s'] / 1e9:>10.1f} "
              f"{r['useful_flops_per_s'] / 1e9:>12.1f} "
              f"{100 * r['executed_flops_per_s'] / peaks['bf16']:>10.1f} "
              f"{100 * r['executed_flops_per_s'] / peaks['fp32']:>10.1f} {r['peak_rss_gb']:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    parser.add_argument("--pairs-per-batch", type=int, default=8, help="B pairs = 2B notes per step")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--ablations", action="store_true", help="also the naive step + one change each")
    parser.add_argument("--ablation-steps", type=int, default=None, help="timed steps of ablations (--steps)")
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")

    if args.worker:
        result = run_worker(VARIANTS[args.worker], args.steps, args.warmup, args.pairs_per_batch,
                            args.threads)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    torch.set_num_threads(args.threads)
    peaks_before = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"matmul peak ({PEAK_MATMUL_SIZE}^3, {args.threads} threads): "
          + ", ".join(f"{k} {v['best_flops_per_s'] / 1e9:.0f} GFLOP/s" for k, v in peaks_before.items()),
          flush=True)
    names = MAIN_VARIANTS + (ABLATION_VARIANTS if args.ablations else [])
    steps_of = {n: (args.ablation_steps or args.steps) if n in ABLATION_VARIANTS else args.steps
                for n in names}
    results = run_interleaved(steps_of, args)
    peaks_after = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    peaks = {k: max(peaks_before[k]["best_flops_per_s"], peaks_after[k]["best_flops_per_s"])
             for k in peaks_before}

    print(f"\nSmolLM2-135M + LoRA ({CONFIG.relative_to(REPO_ROOT)}), W = 1, B = {args.pairs_per_batch} pairs "
          f"({2 * args.pairs_per_batch} notes), {args.threads} threads, same pairs in every variant; "
          f"load average at the end {os.getloadavg()[0]:.1f} (other processes may share the CPU)")
    print(f"peak = best {PEAK_MATMUL_SIZE}^3 matmul: bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s (before/after: "
          + ", ".join(f"{k} {peaks_before[k]['best_flops_per_s'] / 1e9:.0f}/"
                      f"{peaks_after[k]['best_flops_per_s'] / 1e9:.0f}" for k in peaks) + ")")
    print_table(results, peaks)
    naive_rate = results["naive"]["tokens_per_s"]
    ratios = {name: r["tokens_per_s"] / naive_rate for name, r in results.items()}
    for name, ratio in ratios.items():
        if name != "naive":
            print(f"tokens/s {name} vs naive: {ratio:.2f}x" + (" (target >= 3x)" if name == "ours" else ""))
    if all(name in ratios for name in ABLATION_VARIANTS):
        product = float(np.prod([ratios[name] for name in ABLATION_VARIANTS]))
        print(f"product of the three single-change speed-ups: {product:.2f}x (ours measured "
              f"{ratios['ours']:.2f}x; equal if the three changes were independent)")
    for name, r in results.items():
        check = r["flop_check_first_warmup_step"]
        print(f"FLOP formula check, {name} (first warm-up step, matmuls without attention): torch "
              f"counted {check['counted_matmul_flops'] / 1e9:.1f} GFLOP, "
              f"formula {check['formula_matmul_flops'] / 1e9:.1f}")
    summary = {"config": str(CONFIG.relative_to(REPO_ROOT)),
               "args": {k: v for k, v in vars(args).items() if k != "worker"},
               "peak_flops_per_s": peaks, "peaks_before": peaks_before, "peaks_after": peaks_after,
               "load_average_end": os.getloadavg(), "ratio_tokens_per_s_vs_naive": ratios,
               "target_ratio": 3.0, "variants": results}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "training.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {OUT / 'training.json'}")


if __name__ == "__main__":
    main()
