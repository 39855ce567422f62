"""Is the serve parity check blind under tensor parallelism, or is the tuned table numerically the default there?

    python benchmarks/tp_parity_check.py --tp 2                  # 2 GPUs: Mixtral-8x7B widths, 4 layers, bf16
    python benchmarks/tp_parity_check.py --tp 2 --dtype fp8      # the same in fp8 (w8a8 experts)
    python benchmarks/tp_parity_check.py --tp 2 --device cpu     # CPU smoke run: tiny model, fp16, interpreter

Why: `python -m moetune.serve --dtype bf16 --tp 2` (2x H200) printed max |Δlogit| exactly 0 for tuned vs default
AND a noise floor of exactly 0, while greedy tokens differed from step 1. This script separates the explanations:

  * the logits do not depend on the MoE at all  -> "swapped expert" (layer 0's experts 0 and 1 exchanged in the
    checkpoint) would move them by ~0: it must be O(the logit scale);
  * the table switch does not reach the decode CUDA graphs on some rank -> tuned-vs-default through the graphs
    would be 0 where the same comparison on the eager path (graphs dropped on every rank) is not;
  * genuine (the hypothesis, from a CPU run of this script in bf16): the configs the check exercises round
    exactly as the default. The parity check decodes ONE sequence at a time, so it only meets the table's M=1
    entry (and the prefill entry at the prompt length); serving at batch B replays bucket B's graph with the
    entry for M=B. Tile sizes need not change a bit (an H100 fp8 run measured exactly 0 for BLOCK_SIZE_K
    alone, d7a6f93; the H200 bf16 run above also for BLOCK_SIZE_M 16 <-> 64); a kernel variant does:
    fuse_silu applies SiLU to GEMM1's unrounded fp32 output. The shipped bf16 TP2 table (N=7168) has fuse_silu at
    M=4..48 and 128+, but not at M=1 or M=64, while greedy generation of 3 prompts prefills 192 tokens
    (M=128's entry) and decodes in bucket 4 (M=4's entry).

So it measures teacher-forced logits (the serving graphs, as compare.py) at batch 1 and at batch B (all prompts
decoded together), for the default table, the perturbed default and the tuned table, on the graphs and on the
eager path; the swapped-expert checkpoint; TP=1 on the same weights (a random safetensors checkpoint of the
model with --layers layers at full width, so that every rank loads its shard of the same tensors; dummy
weights are drawn per shard and differ between TP sizes); and greedy tokens at batch B. Prints one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from moetune import tables  # noqa: E402
from moetune.errors import MoetuneError  # noqa: E402
from moetune.models import get_model, moe_shape  # noqa: E402
from moetune.runtime import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from moetune.runtime.model import MixtralForCausalLM  # noqa: E402
from moetune.runtime.tokenizer import find_tokenizer_model  # noqa: E402
from moetune.serve.compare import fixed_prompt  # noqa: E402

TABLES = ("default", "default-perturbed", "tuned")
SWAP = "zz-swap.safetensors"  # sorts after the model's files: the loader takes a tensor from the last file holding it


def hf_config(spec) -> dict:
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "vocab_size": spec.vocab_size, "num_local_experts": spec.num_experts,
            "num_experts_per_tok": spec.top_k, "max_position_embeddings": spec.max_position_embeddings,
            "rope_theta": spec.rope_theta, "rms_norm_eps": spec.rms_norm_eps, "tie_word_embeddings": False,
            "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id}  # fmt: skip


def write_checkpoint(folder: Path, spec, seed: int) -> None:
    """Random HF-layout safetensors (init_dummy's scales: N(0, 1/fan_in), embeddings N(0, 1), norms 1), one file
    per layer so host memory holds one layer; plus the swapped-expert variant beside it (a link to every file
    and one more file with layer 0's experts 0 and 1 exchanged). Reused when config.json matches."""
    from safetensors.torch import save_file

    cfg = hf_config(spec)
    done = folder / "config.json"
    if done.is_file() and json.loads(done.read_text()) == cfg and (folder / "swapped" / SWAP).is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in MixtralForCausalLM.checkpoint_shapes(spec).items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, {})[name] = shape
    t0 = time.perf_counter()
    swap: dict[str, torch.Tensor] = {}
    prefix = "model.layers.0.block_sparse_moe.experts."
    for part, shapes in groups.items():
        out = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = torch.ones(shape, device=dev)
            else:
                std = 1.0 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5
                t = torch.randn(shape, device=dev, generator=gen) * std
            out[name] = t.to(torch.bfloat16).cpu().contiguous()
        for w in ("w1", "w2", "w3"):
            a, b = f"{prefix}0.{w}.weight", f"{prefix}1.{w}.weight"
            if a in out:
                swap[a], swap[b] = out[b], out[a]
        save_file(out, folder / f"model-{part}.safetensors", metadata={"format": "pt"})
    swapped = folder / "swapped"
    swapped.mkdir(exist_ok=True)
    for f in folder.glob("model-*.safetensors"):
        link = swapped / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    save_file(swap, swapped / SWAP, metadata={"format": "pt"})
    for where in (folder, swapped):
        (where / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer_into(where)
    print(f"wrote a random {spec.num_layers}-layer checkpoint to {folder} in {time.perf_counter() - t0:.0f} s",
          flush=True)  # fmt: skip


def tokenizer_into(folder: Path) -> None:
    """The engine needs a tokenizer: Mixtral's if mistral-common is installed, else a tiny sentencepiece model
    (token ids here are random and never decoded)."""
    try:
        find_tokenizer_model(None)
        return
    except MoetuneError:
        pass
    import sentencepiece as spm

    text = folder / "spm.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=64,
                                   hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0)  # fmt: skip


def demo_tables(folder: Path, spec, tp_sizes: list[int], dtype: str) -> None:
    """CPU only (no table ships for the tiny model): like the shipped bf16 TP2 table, tiles other than the
    default's, plain at M=1 and at prefill sizes, fuse_silu at M=2 and 4 (decode batches 2-4)."""
    import triton

    plain = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=2, num_stages=2)
    configs = {m: plain for m in (1, 2, 4, 8, 64)}
    for tp in tp_sizes:
        shape = moe_shape(spec, tp)
        path = folder / tables.table_filename(shape.E, shape.N, tables.CPU_DEVICE_NAME, dtype)
        sidecar = {
            "table": path.name,
            "device": tables.CPU_DEVICE_NAME,
            "dtype": dtype,
            "timings_meaningful": False,
            "shape": {"E": shape.E, "N": shape.N, "K": shape.K, "top_k": shape.top_k, "tp": tp},
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "moetune": "demo"},
            "entries": {str(m): {"config": {**plain, "fuse_silu": 1} if m in (2, 4) else plain} for m in configs},
        }
        tables.save_table(path, configs, sidecar)  # fmt: skip


def set_graphs(eng: LLMEngine, on: bool) -> None:
    """Off: drop the decode CUDA graphs on every rank, so each decode runs eagerly with its config picked live.
    On: graphs again from the next use_tables (which re-captures them)."""
    eng._call("__setattr__", "use_graphs", on and eng.runner.device.type == "cuda")
    if not on:
        eng._call("__setattr__", "graphs", {})


def check_ranks(eng: LLMEngine, which: str) -> None:
    """Every rank reads the table just selected, for the same shard, and (GPU) its graphs were captured with it."""
    state = eng._call("table_state")
    bad = [r for r in state if r["which"] != which or r["path"] != state[0]["path"]
           or (eng.runner.use_graphs and (not r["graphs"] or r["graphs_table"] != which))]  # fmt: skip
    if bad:
        print(f"BUG: after use_tables({which!r}) the ranks report {state}", flush=True)
    else:
        brief = [(r["rank"], r["which"], r["graphs_table"]) for r in state]
        print(f"(rank, table, graphs captured with) after use_tables({which!r}): {brief}", flush=True)


def measure(eng: LLMEngine, prompts: list[list[int]], forced: list[list[int]], greedy_tokens: int,
            eager: bool) -> dict:  # fmt: skip
    """Per table: teacher-forced logits [B, steps, V] at batch 1 (one prompt at a time, as compare.py) and at
    batch B (all together), through the graphs and (eager) without them; greedy tokens at batch B."""
    out = {}
    for which in TABLES:
        eng.use_tables(which)  # re-captures the graphs on every rank
        check_ranks(eng, which)
        r = {"one": torch.cat([eng.teacher_forced_logits_batch([p], [f]) for p, f in zip(prompts, forced)]),
             "batch": eng.teacher_forced_logits_batch(prompts, forced)}  # fmt: skip
        if greedy_tokens:
            params = SamplingParams(temperature=0.0, max_tokens=greedy_tokens, ignore_eos=True)
            r["greedy"] = [list(t) for t in eng.generate(prompts, params)]
        if eager:
            set_graphs(eng, False)
            r["one_eager"] = torch.cat([eng.teacher_forced_logits_batch([p], [f]) for p, f in zip(prompts, forced)])
            r["batch_eager"] = eng.teacher_forced_logits_batch(prompts, forced)
            set_graphs(eng, True)
        out[which] = r
    return out


def engine(args, folder: Path, tp: int, tuned_configs: str | None) -> LLMEngine:
    cfg = EngineConfig(model=args.model, checkpoint=str(folder), load_format="safetensors", dtype=args.dtype,
                       device=args.device, tensor_parallel_size=tp, tuned_configs=tuned_configs,
                       max_num_seqs=args.batch, max_model_len=args.prompt_len + args.steps + args.greedy + 16,
                       max_num_batched_tokens=max(4096, args.prompt_len * args.batch),
                       gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
    return LLMEngine(cfg)


def dmax(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    return [next((j for j, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(a, b)]


def describe(config: dict) -> str:
    c = config
    extra = "".join(f" {k}={c[k]}" for k in ("fuse_silu", "kernel") if k in c)
    return f"M{c['BLOCK_SIZE_M']} N{c['BLOCK_SIZE_N']} K{c['BLOCK_SIZE_K']} w{c['num_warps']} s{c['num_stages']}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ref-tp", type=int, default=1, help="TP size to compare against on the same weights; 0: skip")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="preset (default: mixtral-8x7b on a GPU, tiny on a CPU)")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp8 (default: bf16 on a GPU, fp16 on a CPU)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the random checkpoint (full widths)")
    ap.add_argument("--batch", type=int, default=4, help="prompts decoded together (a graph bucket: power of 2)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="teacher-forced decode steps")
    ap.add_argument("--greedy", type=int, default=16, help="greedy tokens at batch B; 0: skip")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager-path comparison")
    ap.add_argument("--tuned-configs", default=None, help="extra folder of tables (CPU: a demo table is written)")
    ap.add_argument("--workdir", default="/tmp/tp_parity_check")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="JSON of the numbers")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    args.device = "cuda" if on_gpu else "cpu"
    args.model = args.model or ("mixtral-8x7b" if on_gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp16")
    t_start = time.perf_counter()

    spec = dataclasses.replace(get_model(args.model), num_layers=args.layers)
    work = Path(args.workdir) / f"{args.model}-{args.layers}l"
    write_checkpoint(work, spec, seed=0)
    tp_sizes = [args.tp] + ([args.ref_tp] if args.ref_tp and args.ref_tp != args.tp else [])
    tuned_configs = args.tuned_configs
    if not on_gpu and not tuned_configs:
        tuned_configs = str(work / "demo-tables")
        demo_tables(Path(tuned_configs), spec, tp_sizes, "bf16" if args.dtype == "fp32" else args.dtype)
    v = spec.vocab_size
    prompts = [fixed_prompt(args.prompt_len, v, seed=100 + i) for i in range(args.batch)]
    forced = [fixed_prompt(args.steps, v, seed=200 + i) for i in range(args.batch)]

    runs, picked = {}, {}
    for tp in tp_sizes:
        t0 = time.perf_counter()
        eng = engine(args, work, tp, tuned_configs)
        try:
            t = eng.runner.tables
            ms = {"decode batch 1": 1, f"decode batch {args.batch}": args.batch, "prefill": args.prompt_len}
            choices = {"default": t.untuned, "default-perturbed": t.untuned.perturbed(), "tuned": t.tuned}
            configs = {label: {k: describe(c.pick(m)) for k, c in choices.items()} for label, m in ms.items()}
            picked[tp] = {"table": str(t.tuned.path) if t.tuned.path else None, "configs": configs}
            runs[tp] = measure(eng, prompts, forced, args.greedy, eager=not args.no_eager and tp == args.tp)
        finally:
            eng.close()
        if tp == args.tp:
            eng = engine(args, work / "swapped", tp, tuned_configs)
            try:
                eng.use_tables("default")
                runs["swapped"] = {"one": torch.cat([eng.teacher_forced_logits_batch([p], [f])
                                                     for p, f in zip(prompts, forced)]),
                                   "batch": eng.teacher_forced_logits_batch(prompts, forced)}  # fmt: skip
            finally:
                eng.close()
        print(f"TP{tp}: measured in {time.perf_counter() - t0:.0f} s", flush=True)

    report(args, runs, picked, tp_sizes, time.perf_counter() - t_start)


def report(args, runs: dict, picked: dict, tp_sizes: list[int], wall_s: float) -> None:
    tp, B = args.tp, args.batch
    main_run = runs[tp]
    d = main_run["default"]
    scale = d["one"].abs().max().item()
    rows: list[tuple[str, float | None, float | None]] = []

    def row(label: str, a: dict, b: dict, key: str = "") -> None:
        one, batch = f"one{key}", f"batch{key}"
        if one in a and one in b:
            rows.append((label, dmax(a[one], b[one]), dmax(a[batch], b[batch])))

    row(f"TP{tp} served: tuned vs default", main_run["tuned"], d)
    row(f"TP{tp} served: perturbed vs default (noise floor)", main_run["default-perturbed"], d)
    row(f"TP{tp} eager:  tuned vs default", main_run["tuned"], d, "_eager")
    row(f"TP{tp} eager:  perturbed vs default", main_run["default-perturbed"], d, "_eager")
    for which in ("default", "tuned"):
        r = main_run[which]
        if "one_eager" in r:
            rows.append((f"TP{tp} served vs eager ({which})", dmax(r["one"], r["one_eager"]),
                         dmax(r["batch"], r["batch_eager"])))  # fmt: skip
    row(f"TP{tp} swapped expert (layer 0: 0<->1) vs default", runs["swapped"], d)
    for ref in tp_sizes[1:]:
        for which in TABLES:
            row(f"TP{tp} vs TP{ref} ({which})", main_run[which], runs[ref][which])
        row(f"TP{ref} served: tuned vs default", runs[ref]["tuned"], runs[ref]["default"])
        row(f"TP{ref} served: perturbed vs default", runs[ref]["default-perturbed"], runs[ref]["default"])

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device == "cuda" else "CPU (interpreter)"
    n = torch.cuda.device_count() if args.device == "cuda" else 0
    print()
    print(
        f"{dev} x{n or tp}, {args.model} widths with {args.layers} layers (random safetensors), {args.dtype}, "
        f"{B} prompts x {args.prompt_len} tokens, {args.steps} teacher-forced steps; {wall_s:.0f} s in all"
    )
    for t, p in picked.items():
        print(f"TP{t} tuned table: {p['table'] or 'NONE (tuned = default)'}")
        for label, cs in p["configs"].items():
            print(f"  {label:>16}: " + " | ".join(f"{k} {c}" for k, c in cs.items()))
    path = "the decode CUDA graphs" if args.device == "cuda" else "eager: no graphs on a CPU"
    print(f"served = the serving decode path ({path}); eager = graphs dropped on every rank")
    print(f"max |logit| {scale:.3g}; max |Δlogit| over every step and vocabulary entry:")
    print(f"{'':52} {'batch 1':>10} {f'batch {B}':>10}")
    for label, a, b in rows:
        print(f"{label:52} {a:>10.4g} {b:>10.4g}")
    if "greedy" in d:
        div = first_divergence(d["greedy"], main_run["tuned"]["greedy"])
        print(f"TP{tp} greedy tokens at batch {B}, tuned vs default: first differ at {div} (None: identical)")
    verdicts(args, runs, rows, scale)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "picked": {str(k): v for k, v in picked.items()},
                                              "max_abs_logit": scale, "rows": rows}, indent=2))  # fmt: skip


def verdicts(args, runs: dict, rows: list, scale: float) -> None:
    get = {label: (a, b) for label, a, b in rows}
    tp = args.tp
    swapped = get[f"TP{tp} swapped expert (layer 0: 0<->1) vs default"][0]
    print("reading:")
    if swapped < 0.05 * max(1.0, scale):
        print(f"  BUG: a swapped expert moves the TP{tp} teacher-forced logits by only {swapped:.3g}: they do not "
              "depend on the MoE weights")  # fmt: skip
    else:
        print(f"  the TP{tp} teacher-forced logits depend on the experts (swapped: {swapped:.3g}, ~the logit scale)")
    g = get[f"TP{tp} served: tuned vs default"]
    e = get.get(f"TP{tp} eager:  tuned vs default")
    if e is not None:
        stale = [i for i in (0, 1) if g[i] == 0 and e[i] > 0]
        if stale:
            print(f"  BUG: tuned vs default is 0 through the graphs but {max(e):.3g} eagerly: the graphs were not "
                  "re-captured for the table on every rank")  # fmt: skip
        else:
            print("  graphs and eager path agree on what the table changes: the graphs follow the table switch")
    if g[0] == 0 and g[1] > 0:
        print(f"  genuine: at batch 1 the tuned configs round exactly as the default; at batch {args.batch} they do "
              f"not ({g[1]:.3g}). compare.py's check decodes one sequence at a time, so it never meets the entries "
              "that differ (see the configs above: fuse_silu)")  # fmt: skip
    elif g == (0, 0):
        print("  tuned == default bit for bit at both batch sizes (plain tiles only, or no table)")
    if get[f"TP{tp} served: perturbed vs default (noise floor)"] == (0, 0):
        print("  noise floor 0: moving BLOCK_SIZE_M/K and flipping fuse_silu change no bit here, so compare.py's "
              "tolerance is its rtol floor alone")  # fmt: skip
    for label, (a, b) in get.items():
        if " vs TP" in label and max(a, b) > 0.1 * max(1.0, scale):
            print(f"  CHECK: {label} differs by {max(a, b):.3g}, a large part of the logit scale")


if __name__ == "__main__":
    main()
