"""The side-by-side proof: one loaded model, one fixed workload, default MoE configs then tuned tables.

Both runs share the process, the weights and the KV cache, so the only difference between them is
the MoE config table. Results go to JSON and CSV for notebooks; the table is printed for people.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moetune.errors import MoetuneError
from moetune.runtime.sampling import SamplingParams
from moetune.tables import atomic_write_json, atomic_write_text, device_name

log = logging.getLogger("moetune.serve")

# How far logits may move between the two tables before the check says MISMATCH, relative to the largest
# |logit| (at least 1). Tuned tables change BLOCK_SIZE_K, so each MoE GEMM sums in another order and
# rounds its output differently: about one ulp per layer (2^-8 in bf16, 2^-11 in fp16; fp8 runs keep
# bf16 activations), compounded over the layers and the residual stream. 2e-2 allows a few ulps of drift
# and still catches a wrong config, which moves logits by O(1). fp32 rounds at 2^-24.
LOGIT_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2, "fp8": 2e-2}


@dataclass
class Workload:
    batch_sizes: list[int]
    context_len: int  # tokens already in each sequence's KV cache when decode is timed
    prompt_len: int  # prompt length for time to first token
    steps: int = 20  # decode steps per timing
    ttft_reps: int = 3  # timed prefills after one warm-up
    check_prompts: int = 3  # parity prompts
    check_tokens: int = 32  # teacher-forced decode steps (and greedy tokens) per parity prompt
    check_prompt_len: int = 64


def fixed_prompt(n: int, vocab_size: int, seed: int) -> list[int]:
    """Seeded random ids above the special tokens (0-2): never zeros, the same in every run."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()


def check_workload(w: Workload, cfg: Any) -> None:
    """Fail early with the flag that fixes it, not halfway through a long run."""
    if max(w.batch_sizes) > cfg.max_num_seqs:
        raise MoetuneError(f"batch size {max(w.batch_sizes)} exceeds max_num_seqs={cfg.max_num_seqs}")
    if w.context_len + w.steps + 1 > cfg.max_model_len:
        raise MoetuneError(f"--context-len {w.context_len} does not fit --max-model-len {cfg.max_model_len}")
    if w.prompt_len + 1 > cfg.max_model_len:
        raise MoetuneError(f"--prompt-len {w.prompt_len} does not fit --max-model-len {cfg.max_model_len}")


def time_ttft_ms(engine: Any, prompt: list[int], reps: int) -> float:
    """Median wall time from add_request to the first token; token ids arrive as Python ints, so the
    GPU has finished by then. The first prefill is a warm-up (allocations, autotuned kernels)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    samples = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        rid = engine.add_request(prompt, params)
        for _ in range(len(prompt) + 8):  # bounded even if the engine chunks the prefill
            if any(o.request_id == rid and o.new_token_ids for o in engine.step()):
                break
        else:
            raise MoetuneError("the engine produced no token for the TTFT prompt")
        samples.append(time.perf_counter() - t0)
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(samples[1:]) * 1e3


def run_mode(engine: Any, tuned: bool, w: Workload, prompts: list[list[int]], forced: list[list[int]]) -> dict:
    engine.use_tuned_tables(tuned)
    label = "tuned" if tuned else "default"
    decode_us = {}
    for b in w.batch_sizes:
        log.info("%s: timing decode at batch %d", label, b)
        decode_us[b] = engine.decode_step_time_us(b, w.context_len, w.steps)
    log.info("%s: time to first token, %d-token prompt", label, w.prompt_len)
    ttft = time_ttft_ms(engine, fixed_prompt(w.prompt_len, engine.spec.vocab_size, seed=1), w.ttft_reps)
    log.info("%s: teacher-forced decode logits and greedy tokens", label)
    logits = [engine.teacher_forced_logits(p, f) for p, f in zip(prompts, forced)]  # [steps, V] each
    greedy = SamplingParams(temperature=0.0, max_tokens=w.check_tokens, ignore_eos=True)
    tokens = [list(t) for t in engine.generate(prompts, greedy)]
    return {"table": str(engine.moe_table_path) if engine.moe_table_path else None, "decode_us": decode_us,
            "ttft_ms": ttft, "tokens": tokens, "logits": logits}


@dataclass
class Parity:
    """Both tables on the same tokens: teacher-forced decode steps, logits compared step by step."""

    prompt: int
    steps: int
    max_abs_logit_diff: float  # over every step and vocabulary entry
    worst_step: int
    tolerance: float
    verdict: str  # "MATCH" (within tolerance) | "MISMATCH"
    greedy_identical: bool  # information only: near-tied random logits flip on rounding noise
    first_divergence: int | None = None
    default_token: int | None = None
    tuned_token: int | None = None


def parity(runs: dict, dtype: str) -> list[Parity]:
    out, rtol = [], LOGIT_RTOL.get(dtype, 2e-2)
    d, t = runs["default"], runs["tuned"]
    for i, (ld, lt, td, tt) in enumerate(zip(d["logits"], t["logits"], d["tokens"], t["tokens"])):
        step_diff = (ld - lt).abs().amax(dim=-1)  # [steps]
        drift, tol = step_diff.max().item(), rtol * max(1.0, ld.abs().max().item())
        k = next((j for j, (x, y) in enumerate(zip(td, tt)) if x != y), None)
        verdict = "MATCH" if drift <= tol else "MISMATCH"
        a, b = (td[k], tt[k]) if k is not None else (None, None)
        out.append(Parity(i, ld.shape[0], drift, int(step_diff.argmax()), tol, verdict, k is None, k, a, b))
    return out


def compare(engine: Any, w: Workload) -> dict:
    """Run the workload under both tables; returns the results as plain JSON-ready data."""
    check_workload(w, engine.config)
    v = engine.spec.vocab_size
    prompts = [fixed_prompt(w.check_prompt_len, v, seed=100 + i) for i in range(w.check_prompts)]
    forced = [fixed_prompt(w.check_tokens, v, seed=200 + i) for i in range(w.check_prompts)]  # the same for both
    runs = {"default": run_mode(engine, False, w, prompts, forced), "tuned": run_mode(engine, True, w, prompts, forced)}
    table = runs["tuned"]["table"]
    on_cpu = str(getattr(engine.config, "device", "")) == "cpu" or not torch.cuda.is_available()

    def speedup(d: float, t: float) -> float | None:  # no table: both runs used defaults, claim nothing
        return d / t if table else None

    rows = []
    for b in w.batch_sizes:
        d, t = runs["default"]["decode_us"][b], runs["tuned"]["decode_us"][b]
        rows.append({"batch": b, "default_tok_s": b * 1e6 / d, "tuned_tok_s": b * 1e6 / t,
                     "default_ms_per_token": d / 1e3, "tuned_ms_per_token": t / 1e3, "speedup": speedup(d, t)})
    d, t = runs["default"]["ttft_ms"], runs["tuned"]["ttft_ms"]
    import triton

    return {
        "model": engine.spec.name, "dtype": engine.config.dtype, "device": device_name(),
        "timings_meaningful": not on_cpu, "table": table, "tuned_table_found": table is not None,
        "workload": asdict(w), "decode": rows,
        "ttft": {"prompt_len": w.prompt_len, "default_ms": d, "tuned_ms": t, "speedup": speedup(d, t)},
        "parity": [asdict(p) for p in parity(runs, engine.config.dtype)],
        "torch": torch.__version__, "triton": triton.__version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def report(r: dict) -> str:
    """The side-by-side table, with the caveats in the same place as the numbers."""
    w = r["workload"]
    lines = [f"model {r['model']}, dtype {r['dtype']}, device {r['device']}, decode context {w['context_len']} tokens"]
    if not r["timings_meaningful"]:
        lines.append("CPU run (Triton interpreter): timings are MEANINGLESS; they only show the pipeline runs.")
    if r["table"]:
        lines.append(f"tuned table: {r['table']}")
    else:
        lines += ["!" * 100, "!! NO TUNED TABLE for this model/GPU/dtype: both runs used vLLM's default configs.",
                  "!! This is default vs default; no speedup is claimed. Run `moetune run` to make a table.", "!" * 100]
    lines.append(f"{'batch':>6} {'default tok/s':>14} {'tuned tok/s':>12} {'default ms/tok':>15} "
                 f"{'tuned ms/tok':>13} {'speedup':>8}")
    for x in r["decode"]:
        lines.append(f"{x['batch']:>6} {x['default_tok_s']:>14.1f} {x['tuned_tok_s']:>12.1f} "
                     f"{x['default_ms_per_token']:>15.3f} {x['tuned_ms_per_token']:>13.3f} "
                     f"{_f(x['speedup'], '.2f'):>8}")
    t = r["ttft"]
    lines.append(f"{'TTFT':>6} prompt {t['prompt_len']} tokens: default {t['default_ms']:.1f} ms, "
                 f"tuned {t['tuned_ms']:.1f} ms, speedup {_f(t['speedup'], '.2f')}")
    for p in r["parity"]:
        greedy = ("greedy tokens identical" if p["greedy_identical"] else
                  f"greedy tokens first differ at {p['first_divergence']} ({p['default_token']} vs {p['tuned_token']})")
        lines.append(f"parity prompt {p['prompt']}: {p['verdict']}: max |Δlogit| {p['max_abs_logit_diff']:.3g} "
                     f"(tol {p['tolerance']:.3g}, worst at step {p['worst_step']}) over {p['steps']} teacher-forced "
                     f"decode steps; {greedy} (information only)")  # fmt: skip
    return "\n".join(lines)


def save(r: dict, results_dir: Path) -> tuple[Path, Path]:
    """serve_<model>_<dtype>_<device>.json/.csv: a stable name per setup, so notebooks find the latest."""
    stem = f"serve_{r['model']}_{r['dtype']}_{r['device']}"
    jpath, cpath = results_dir / f"{stem}.json", results_dir / f"{stem}.csv"
    atomic_write_json(jpath, r)
    cols = ["kind", "batch", "prompt_len", "context_len", "default_tok_s", "tuned_tok_s", "default_ms", "tuned_ms",
            "speedup", "table", "timings_meaningful"]
    common = {"table": r["table"] or "", "timings_meaningful": r["timings_meaningful"]}
    buf = io.StringIO()
    out = csv.DictWriter(buf, cols)
    out.writeheader()
    for x in r["decode"]:
        out.writerow({"kind": "decode", "batch": x["batch"], "context_len": r["workload"]["context_len"],
                      "default_tok_s": x["default_tok_s"], "tuned_tok_s": x["tuned_tok_s"],
                      "default_ms": x["default_ms_per_token"], "tuned_ms": x["tuned_ms_per_token"],
                      "speedup": x["speedup"], **common})
    t = r["ttft"]
    out.writerow({"kind": "ttft", "batch": 1, "prompt_len": t["prompt_len"], "default_ms": t["default_ms"],
                  "tuned_ms": t["tuned_ms"], "speedup": t["speedup"], **common})
    atomic_write_text(cpath, buf.getvalue())
    return jpath, cpath

