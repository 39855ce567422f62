"""`moetune show FILE` and `moetune validate [DIR]`: read tables and sidecars, never write them."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from moetune.errors import MoetuneError, TableError
from moetune.models import DTYPES, PRESETS, MoeShape
from moetune.tables import (
    CPU_DEVICE_NAME,
    KNOBS,
    SIDECAR_SUFFIX,
    ConfigTable,
    load_sidecar,
    load_table,
    packaged_tables_dir,
    parse_table_filename,
    sidecar_path,
)

SHORT = {"BLOCK_SIZE_M": "BLOCK_M", "BLOCK_SIZE_N": "BLOCK_N", "BLOCK_SIZE_K": "BLOCK_K", "GROUP_SIZE_M": "GROUP_M",
         "num_warps": "warps", "num_stages": "stages"}  # fmt: skip
# vLLM's dtype part of a table name -> our dtype name (bf16 and fp16 carry none)
DTYPE_OF_SUFFIX = {suffix: name for name, (_, _, suffix) in DTYPES.items() if suffix}


# ---------------------------------------------------------------------------------------------- show


def add_show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a config table (its sidecar <name>.moetune.json is read when present)")


def show_main(args: argparse.Namespace) -> int:
    print(format_table(_table_path(Path(args.file))))
    return 0


def _table_path(path: Path) -> Path:
    """Accept the sidecar's name too: show the table it describes."""
    if path.name.endswith(SIDECAR_SUFFIX):
        return path.with_name(path.name.removesuffix(SIDECAR_SUFFIX) + ".json")
    return path


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _ours(config: dict, table_config: dict) -> str:
    """Our config at M, as short as it can be: '=' when it is the table's, else its knobs."""
    if config == table_config:
        return "="
    six = "/".join(str(config[k]) for k in KNOBS)
    return ",".join([six, *(f"{k}={v}" for k, v in config.items() if k not in KNOBS)])


def format_table(path: Path) -> str:
    """The table as text, one row per M: the vLLM-format config (its six knobs, table_us) and, from
    the sidecar, our fastest config with its extra knobs ('=' when it is the same), tuned_us, speedup."""
    configs = load_table(path)
    sidecar = load_sidecar(path)
    entries = (sidecar or {}).get("entries", {})
    rows = []
    for M in sorted(configs):
        e = entries.get(str(M), {})
        ours = e.get("config", configs[M])
        table_us = e.get("vllm_us", e.get("tuned_us") if ours == configs[M] else None)
        rows.append({
            "M": M, **{SHORT[k]: configs[M][k] for k in KNOBS}, "table_us": _num(table_us, ".1f"),
            "ours": _ours(ours, configs[M]), "tuned_us": _num(e.get("tuned_us"), ".1f"),
            "default_us": _num(e.get("default_us"), ".1f"),
            "speedup": _num(e.get("speedup"), ".2f") + ("x" if e.get("speedup") else ""),
            "trials": e.get("trials", "-"), "rel_err": _num(e.get("rel_err"), ".1e"),
            "status": "incomplete" if e.get("incomplete") else ("tuned" if e.get("trials") else "-"),
        })  # fmt: skip
    lines = [str(path)]
    if sidecar is None:
        lines.append("  no sidecar: timings unknown")
    else:
        s, v = sidecar["shape"], sidecar["versions"]
        lines.append(
            f"  {sidecar.get('model', '?')} tp={s.get('tp', '?')} E={s['E']} N={s['N']} K={s['K']} "
            f"top_k={s['top_k']} {sidecar['dtype']} on {sidecar['device']}; torch {v['torch']}, "
            f"triton {v['triton']}, moetune {v['moetune']}; tuning took {sidecar.get('wall_time_s', 0):.0f} s"
        )
        if sidecar.get("space"):
            from moetune.tuning.space import describe_space

            lines.append(f"  searched part of the space (--space, sampler {sidecar.get('sampler', '?')}): "
                         f"{describe_space(sidecar['space'])}")  # fmt: skip
        if not sidecar.get("timings_meaningful", True):
            lines.append("  timings come from Triton's CPU interpreter: meaningless, they only prove the pipeline ran")
        lines.append("  BLOCK_M..stages, table_us: the vLLM-format table's config; ours, tuned_us: our fastest config "
                     "(sidecar, extra knobs included; '=' when the same), which moetune's runtime runs")  # fmt: skip
        incomplete = [m for m, e in entries.items() if e.get("incomplete")]
        if incomplete:
            lines.append(f"  incomplete (the time budget ran out; `moetune run --resume` continues): "
                         f"M={','.join(incomplete)}")
    lines.append(pd.DataFrame(rows).to_string(index=False))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ validate


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", help="folder of tables (default: the tables shipped with moetune)")


def validate_main(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else packaged_tables_dir()
    if not folder.is_dir():
        raise MoetuneError(f"{folder} is not a folder; pass the folder that holds the tables")
    tables, problems, verified = validate_folder(folder)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"moetune validate: {len(problems)} problem(s) in {folder}", file=sys.stderr)
        return 1
    kernel = f"; {verified} configs ran right on this device" if verified else "; none is for this device"
    print(f"ok: {tables} table(s) in {folder}{kernel}")
    return 0


def validate_folder(folder: Path) -> tuple[int, list[str], int]:
    """(tables seen, every problem found, M whose config ran right on this device)."""
    problems: list[str] = []
    tables = sorted(p for p in folder.glob("*.json") if not p.name.endswith(SIDECAR_SUFFIX))
    for sidecar in sorted(folder.glob(f"*{SIDECAR_SUFFIX}")):
        if not _table_path(sidecar).exists():
            problems.append(f"{sidecar}: sidecar without its table {_table_path(sidecar).name}")
    verified = 0
    shipped = folder.resolve() == packaged_tables_dir().resolve() or folder.resolve().name == "tuned_configs"
    for path in tables:
        try:
            file_problems = _check_file(path)
            if shipped and (parse_table_filename(path.name) or {}).get("device") == CPU_DEVICE_NAME:
                file_problems.append(f"{path}: a CPU-interpreter table in {folder.name}/, which ships in the wheel; "
                                     f"move it under runs/ (its timings mean nothing)")  # fmt: skip
            problems += file_problems
            if not file_problems:
                more, n = _check_on_device(path)
                problems += more
                verified += n
        except Exception as e:  # one bad file is reported; the rest are still checked
            problems.append(f"{path}: cannot be checked: {type(e).__name__}: {e}")
    return len(tables), problems, verified


def _check_file(path: Path) -> list[str]:
    """Name, schema and sidecar consistency of one table; every problem, not just the first."""
    problems = []
    parts = parse_table_filename(path.name)
    if parts is None:
        problems.append(f"{path}: name does not follow vLLM's E=<E>,N=<N>,device_name=<GPU>[,dtype=<dtype>].json")
    elif parts["dtype"] not in (None, *DTYPE_OF_SUFFIX, "int8_w8a16", "int4_w4a16"):
        problems.append(f"{path}: unknown dtype part {parts['dtype']!r} in the name")
    try:
        configs = load_table(path)
    except TableError as e:
        return problems + [str(e)]
    try:
        sidecar = load_sidecar(path)
    except TableError as e:
        return problems + [str(e)]
    if sidecar is None or parts is None:
        return problems
    where = str(sidecar_path(path))
    expect = {
        "table": path.name,
        "device": parts["device"],
        "shape E": parts["E"],
        "shape N": parts["N"],
        "dtype part": parts["dtype"],
    }
    found = {
        "table": sidecar["table"],
        "device": sidecar["device"],
        "shape E": sidecar["shape"]["E"],
        "shape N": sidecar["shape"]["N"],
        "dtype part": DTYPES[sidecar["dtype"]][2],
    }
    for key in expect:
        if expect[key] != found[key]:
            problems.append(f"{where}: {key} is {found[key]!r} but the table's name says {expect[key]!r}")
    entries = {int(m): e for m, e in sidecar["entries"].items()}
    if set(entries) != set(configs):
        missing, extra = sorted(set(configs) - set(entries)), sorted(set(entries) - set(configs))
        problems.append(f"{where}: entries do not match the table's M (missing {missing}, extra {extra})")
    for M in sorted(set(entries) & set(configs)):
        e = entries[M]
        ours = set(e["config"]) - set(KNOBS)  # knobs vLLM lacks: our kernel's own config for this M
        table_config = e.get("vllm_config") or (None if ours else e["config"])
        if table_config is not None and any(table_config.get(k) != configs[M][k] for k in KNOBS):
            key = "vllm_config" if "vllm_config" in e else "config"
            problems.append(f"{where}: M={M}: {key} differs from the table's")
        tuned, default, speedup = e.get("tuned_us"), e.get("default_us"), e.get("speedup")
        if tuned and default and speedup and abs(default / tuned - speedup) > 0.01 * speedup:
            problems.append(f"{where}: M={M}: speedup {speedup} is not default_us/tuned_us = {default / tuned:.3f}")
    return problems


def _shape_for(path: Path) -> tuple[MoeShape, str] | None:
    """The layer a table is for: from its sidecar, else from a known model whose E and N match."""
    parts = parse_table_filename(path.name)
    sidecar = load_sidecar(path)
    dtype = DTYPE_OF_SUFFIX.get(parts["dtype"], "bf16") if parts["dtype"] else "bf16"
    if sidecar:
        s = sidecar["shape"]
        return MoeShape(E=s["E"], N=s["N"], K=s["K"], top_k=s["top_k"]), sidecar["dtype"]
    for model in PRESETS.values():
        if model.num_experts == parts["E"] and model.intermediate_size % parts["N"] == 0:
            return MoeShape(E=parts["E"], N=parts["N"], K=model.hidden_size, top_k=model.top_k), dtype
    return None


def _check_on_device(path: Path) -> tuple[list[str], int]:
    """On the device the table is named for, run each M's config and check it against the reference.
    (A CPU_triton_interpreter table counts as this CPU's: its kernel runs through the interpreter.)"""
    from moetune.tables import device_name

    parts = parse_table_filename(path.name)
    if parts["dtype"] not in (None, *DTYPE_OF_SUFFIX):
        return [], 0  # int8/int4 tables: not a kernel moetune runs
    if device_name() != parts["device"]:
        return [], 0
    found = _shape_for(path)
    if found is None:
        why = f"no sidecar and no known model with E={parts['E']}, N={parts['N']}"
        return [f"{path}: cannot run its configs: {why}"], 0
    from moetune.tuning.bench import Infeasible, KernelBench

    shape, dtype = found
    bench = KernelBench(shape, dtype)
    table = ConfigTable.load(path, shape.E)
    problems, passed = [], 0
    for M in sorted(table.configs):
        config = table.pick(M)  # what our kernel runs: the sidecar's config where it has extra knobs
        try:
            rel = bench.verify(config, M)
        except Infeasible as e:
            problems.append(f"{path}: M={M}: config does not run on {parts['device']}: {e}")
            continue
        if rel <= bench.tolerance:
            passed += 1
        else:
            problems.append(f"{path}: M={M}: wrong result, rel_err {rel:.3g} > {bench.tolerance:g}")
    bench.close()
    return problems, passed
