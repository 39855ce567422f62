"""`python -m moetune.serve`: load a model once, prove the tuned MoE tables side by side with vLLM's
defaults on a fixed workload, then (with --port) serve an OpenAI-compatible API.

With no arguments: Mixtral-8x7B with dummy weights, in the dtype that fits this GPU.
`--model tiny` runs the same pipeline on a CPU (Triton's interpreter) in seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from moetune.errors import MoetuneError
from moetune.models import PRESETS
from moetune.tables import parse_token_counts

# Per-target workloads: the GPU one is the proof; the CPU one only shows every path runs.
GPU_DEFAULTS = dict(batch_sizes=[1, 16, 64, 256], context_len=512, prompt_len=2048, max_model_len=4096)
CPU_DEFAULTS = dict(batch_sizes=[1, 2, 4], context_len=16, prompt_len=32, max_model_len=128)


def _ints(text: str) -> list[int]:
    try:
        return parse_token_counts(text)
    except MoetuneError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, all positive, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: any free one), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moetune.serve", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default="mixtral-8x7b", choices=sorted(PRESETS), help="model preset (default mixtral-8x7b)")
    a("--checkpoint", help="folder of HF safetensors; without it the weights are dummy (random)")
    a("--load-format", default="auto", help="auto, safetensors or dummy (default auto)")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp8", "fp32"],
      help="auto: the dtype that fits this GPU (bf16 on CPU)")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cpu for tiny, else cuda")
    a("--tuned-configs", help="folder searched first for tuned tables")
    a("--tp", type=_positive, default=1, help="tensor-parallel degree: GPUs (CPU processes) per model (default 1)")
    a("--batch-sizes", type=_ints, help="decode batch sizes, comma-separated (GPU default 1,16,64,256)")
    a("--context-len", type=_positive, help="KV length while timing decode (GPU default 512)")
    a("--prompt-len", type=_positive, help="prompt length for time to first token (GPU default 2048)")
    a("--max-model-len", type=_positive, help="longest prompt + completion (GPU default 4096)")
    a("--results-dir", type=Path, default=Path("runs/serve"), help="where JSON and CSV go (default runs/serve)")
    a("--no-compare", action="store_true", help="skip the default-vs-tuned comparison")
    a("--port", type=_port, help="serve the OpenAI API on this port after the comparison (0: any free port)")
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    a("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run(args: argparse.Namespace) -> int:
    device = args.device if args.device != "auto" else ("cpu" if args.model == "tiny" else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("moetune serve: no GPU found; use --model tiny for a CPU run", file=sys.stderr)
        return 2
    if device == "cpu" and args.model != "tiny":
        raise MoetuneError(f"{args.model} on a CPU would take hours per token; use --model tiny for a CPU run")
    if device == "cpu":  # Triton picks interpreter or compiler when a kernel is defined: set it before imports
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Imported only now: the no-GPU answer above should not wait for Triton to load.
    from moetune.runtime.config import EngineConfig
    from moetune.runtime.engine import LLMEngine
    from moetune.serve.compare import Workload
    from moetune.serve.health import check_moe_table

    d = CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS
    batches = args.batch_sizes or d["batch_sizes"]
    prompt_len = args.prompt_len or d["prompt_len"]
    w = Workload(batch_sizes=batches, context_len=args.context_len or d["context_len"], prompt_len=prompt_len)
    if device == "cpu":  # the interpreter runs about a step a second: keep the proof to seconds
        w.steps, w.ttft_reps, w.check_prompts, w.check_tokens, w.check_prompt_len = 2, 1, 2, 4, 8
    cfg = EngineConfig(
        model=args.model, checkpoint=args.checkpoint, load_format=args.load_format,
        # CPU auto is bf16, not the runtime's fp32: the fused-MoE kernel takes only 16-bit activations
        dtype="bf16" if device == "cpu" and args.dtype == "auto" else args.dtype, device=device,
        tuned_configs=args.tuned_configs, tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len or d["max_model_len"],
        max_num_seqs=max(8 if device == "cpu" else 256, max(batches)),
        max_num_batched_tokens=max(4096, prompt_len), enforce_eager=device == "cpu",
    )
    check_moe_table(cfg)  # a table the kernel cannot run fails here, in one line, before minutes of loading
    print(f"loading {args.model} on {device} ...", flush=True)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    print(f"loaded in {time.perf_counter() - t0:.1f} s (dtype {engine.config.dtype})", flush=True)
    try:
        return _compare_and_serve(engine, args, w)
    finally:
        engine.close()  # workers, process group, GPU memory: the process then exits by itself


def _compare_and_serve(engine: object, args: argparse.Namespace, w: object) -> int:
    from moetune.serve.compare import compare, report, save
    from moetune.serve.server import start_server

    if not args.no_compare:
        result = compare(engine, w)
        print(report(result))
        jpath, cpath = save(result, args.results_dir)
        print(f"results: {jpath} {cpath}", flush=True)
    if args.port is None:
        return 0

    table = engine.moe_table_path  # tuned: the config's default, and where compare() leaves it
    if engine.config.device == "cuda":  # the interpreter compiles nothing: only a GPU has kernels to warm
        t0 = time.perf_counter()
        engine.warm_up()
        print(f"warmed up the serving kernels in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        server = start_server(engine, args.host, args.port)  # from here on only its loop calls the engine
    except OSError as e:
        raise MoetuneError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
    try:  # before the "serving" line: a signal right after it must still reach the except below
        print(f"serving {args.model} at {server.url}/v1 with {table or 'default MoE configs (no tuned table)'}; "
              f"Ctrl-C stops", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print("server stopped", flush=True)
    return 0


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # stop like Ctrl-C, so the finally blocks run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_compare and args.port is None:
        parser.error("--no-compare without --port leaves nothing to do")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    # SIGTERM stops like Ctrl-C at any point (loading, comparing, serving), so the engine is closed
    old = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return run(args)
    except MoetuneError as e:
        print(f"moetune serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moetune serve: interrupted", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    code = main()
    from moetune.runtime.tp import exit_process  # after main(): it decides the interpreter before imports

    exit_process(code)
