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

# The least drift the parity check allows, relative to the largest |logit| (at least 1): a floor for runs
# whose measured noise floor (below) is tiny or zero, e.g. fp32 or the torch MoE backend. It is not the
# tolerance of fp8: the fp8 path is w8a8, so every MoE GEMM re-quantises its activations to e4m3 (3 mantissa
# bits, per-token / per-slot scales). Two correct configs (another BLOCK_SIZE_K summation order, fused or
# unfused SiLU) round some activations to a neighbouring e4m3 value, and the layers amplify it: 32 layers of
# Mixtral-8x7B with random weights drift by 1.6-1.9 logits (about 17x this floor) between two correct tables.
# In bf16/fp16 a config change is about one ulp per layer (2^-8, 2^-11); fp32 rounds at 2^-24.
LOGIT_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2, "fp8": 2e-2}
# The measured noise floor: the drift between the default table and the default with BLOCK_SIZE_M/K and fuse_silu
# changed ("default-perturbed": certainly correct, rounds otherwise), for this model, dtype and weights. Tuned vs
# default may drift up to NOISE_FACTOR times that; a wrong config (wrong expert) moves logits by O(their scale).
NOISE_FACTOR = 3.0
# Above this fraction of the logit scale, the tolerance is too wide to tell a wrong config from rounding.
RESOLUTION_WARN = 0.5


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


def forced_logits(engine: Any, prompts: list[list[int]], forced: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt [2 x steps, V]: its teacher-forced decode alone (batch 1: the table's M=1 entry), then all
    prompts decoded together (the batch graph's entry). Batch 1 alone missed the entries greedy generation
    runs: a bf16 TP2 check on 2x H200 read max |Δlogit| 0 while greedy tokens differed (2026-11-26)."""
    together = engine.teacher_forced_logits_batch(prompts, forced)  # [B, steps, V]
    alone = [engine.teacher_forced_logits(p, f) for p, f in zip(prompts, forced)]  # [steps, V] each
    return [torch.cat([a, together[i]]) for i, a in enumerate(alone)]


def run_mode(engine: Any, label: str, w: Workload, prompts: list[list[int]], forced: list[list[int]]) -> dict:
    engine.use_tables(label)
    decode_us = {}
    for b in w.batch_sizes:
        log.info("%s: timing decode at batch %d", label, b)
        decode_us[b] = engine.decode_step_time_us(b, w.context_len, w.steps)
    log.info("%s: time to first token, %d-token prompt", label, w.prompt_len)
    ttft = time_ttft_ms(engine, fixed_prompt(w.prompt_len, engine.spec.vocab_size, seed=1), w.ttft_reps)
    log.info("%s: teacher-forced decode logits and greedy tokens", label)
    logits = forced_logits(engine, prompts, forced)
    greedy = SamplingParams(temperature=0.0, max_tokens=w.check_tokens, ignore_eos=True)
    tokens = [list(t) for t in engine.generate(prompts, greedy)]
    return {"table": str(engine.moe_table_path) if engine.moe_table_path else None, "decode_us": decode_us,
            "ttft_ms": ttft, "tokens": tokens, "logits": logits}


@dataclass
class Parity:
    """Both tables on the same tokens: teacher-forced decode steps, logits compared step by step."""

    prompt: int
    steps: int
    max_abs_logit_diff: float  # tuned vs default, over every step and vocabulary entry
    worst_step: int
    noise_floor: float  # default vs default-perturbed: the drift of two correct configs, same measure
    rtol_floor: float  # LOGIT_RTOL[dtype] * max(1, max |logit|)
    tolerance: float  # max(rtol_floor, NOISE_FACTOR * noise_floor)
    max_abs_logit: float  # the logit scale (default table)
    verdict: str  # "MATCH" (within tolerance) | "MISMATCH"
    greedy_identical: bool  # information only: near-tied random logits flip on rounding noise
    first_divergence: int | None = None
    default_token: int | None = None
    tuned_token: int | None = None


def parity(runs: dict, dtype: str) -> list[Parity]:
    """Tuned vs default per prompt, judged against the drift between default and default-perturbed."""
    out, rtol = [], LOGIT_RTOL.get(dtype, 2e-2)
    d, t, n = runs["default"], runs["tuned"], runs["default-perturbed"]
    for i, (ld, lt, ln, td, tt) in enumerate(zip(d["logits"], t["logits"], n["logits"], d["tokens"], t["tokens"])):
        step_diff = (ld - lt).abs().amax(dim=-1)  # [2 x steps]: batch 1, then all prompts together
        drift, noise = step_diff.max().item(), (ld - ln).abs().max().item()
        scale = ld.abs().max().item()
        floor = rtol * max(1.0, scale)
        tol = max(floor, NOISE_FACTOR * noise)
        k = next((j for j, (x, y) in enumerate(zip(td, tt)) if x != y), None)
        a, b = (td[k], tt[k]) if k is not None else (None, None)
        out.append(Parity(prompt=i, steps=ld.shape[0], max_abs_logit_diff=drift, worst_step=int(step_diff.argmax()),
                          noise_floor=noise, rtol_floor=floor, tolerance=tol, max_abs_logit=scale,
                          verdict="MATCH" if drift <= tol else "MISMATCH", greedy_identical=k is None,
                          first_divergence=k, default_token=a, tuned_token=b))  # fmt: skip
    return out


def compare(engine: Any, w: Workload) -> dict:
    """Run the workload under both tables; returns the results as plain JSON-ready data."""
    check_workload(w, engine.config)
    v = engine.spec.vocab_size
    prompts = [fixed_prompt(w.check_prompt_len, v, seed=100 + i) for i in range(w.check_prompts)]
    forced = [fixed_prompt(w.check_tokens, v, seed=200 + i) for i in range(w.check_prompts)]  # the same for both
    runs = {"default": run_mode(engine, "default", w, prompts, forced)}
    log.info("default-perturbed (BLOCK_SIZE_M/K and fuse_silu changed): teacher-forced decode logits, noise floor")
    engine.use_tables("default-perturbed")
    runs["default-perturbed"] = {"logits": forced_logits(engine, prompts, forced)}
    runs["tuned"] = run_mode(engine, "tuned", w, prompts, forced)  # last: serve goes on with the tuned table
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
        "parity_rule": {"rtol": LOGIT_RTOL.get(engine.config.dtype, 2e-2), "noise_factor": NOISE_FACTOR,
                        "noise_run": "default configs with BLOCK_SIZE_M 16<->64, BLOCK_SIZE_K halved (doubled at 32), "
                                     "fuse_silu flipped"},
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
    if r["parity"]:
        rule = r.get("parity_rule", {})
        lines.append(f"parity: teacher-forced logits, tuned vs default; noise floor = default vs default with "
                     f"BLOCK_SIZE_M/K and fuse_silu changed (two correct configs); each prompt decoded alone "
                     f"(steps 0..n/2-1) and with the others in one batch (the rest); "
                     f"tol = max({rule.get('rtol', 2e-2):g} x max(1, max|logit|), "
                     f"{rule.get('noise_factor', NOISE_FACTOR):g} x noise floor)")  # fmt: skip
    for p in r["parity"]:
        greedy = ("greedy tokens identical" if p["greedy_identical"] else
                  f"greedy tokens first differ at {p['first_divergence']} ({p['default_token']} vs {p['tuned_token']})")
        lines.append(f"parity prompt {p['prompt']}: {p['verdict']}: max |Δlogit| {p['max_abs_logit_diff']:.3g} "
                     f"(tol {p['tolerance']:.3g}, noise floor {p['noise_floor']:.3g}, max |logit| "
                     f"{p['max_abs_logit']:.3g}, worst at step {p['worst_step']}) over {p['steps']} teacher-forced "
                     f"decode rows; {greedy} (information only)")  # fmt: skip
    blind = [p["prompt"] for p in r["parity"] if p["tolerance"] > RESOLUTION_WARN * max(1.0, p["max_abs_logit"])]
    if blind:
        lines.append(f"!! parity prompt(s) {blind}: the noise floor of two correct configs is a large part of the "
                     f"logit scale, so the check cannot tell a wrong config from rounding there (MATCH proves little)")
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

