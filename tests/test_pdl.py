"""Programmatic dependent launch (moetune/kernels/pdl.py): the switch, and the safety rule on every kernel.

The rule cannot be exercised on a CPU (the interpreter runs programs one after another), so it is checked on
the kernels' source: `wait_previous(USE_PDL)` is a top-level statement of every kernel, and
nothing before it returns, stores, runs an atomic or inline asm that touches memory (a prefetch may), or loads
through a pointer other than a declared weight (followed through the local variables it is computed from),
also inside the @triton.jit helpers it calls. The checker is shown to catch each kind of violation. That the
compiled sm_90 code waits before its first global access is tests/test_hopper_compile.py's part; on a Hopper
GPU, tests/test_pdl_gpu.py runs it (PDL on and off must give the same bits).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter  # not imported by triton itself when a GPU is there
from conftest import DEVICE

from moetune.kernels import (
    activation,
    attention,
    linear_fp8,
    moe_gemm,
    moe_gemm_silu,
    moe_gemv,
    norm,
    pdl,
    rope,
    route_decode,
    routing,
)
from moetune.kernels.pdl import wait_previous

KERNEL_MODULES = (activation, attention, linear_fp8, moe_gemm, moe_gemm_silu, moe_gemv, norm, rope, route_decode,
                  routing)  # fmt: skip
# pointers a kernel may load before its wait: nothing in a decode step writes them
WEIGHT_POINTERS = {"_add_rms_norm_kernel": {"w_ptr"}, "_route_decode_kernel": {"gate_ptr", "norm_w_ptr"},
                   "_w8a16_kernel": {"w_ptr", "scale_ptr"}}  # fmt: skip
MEMORY_ASM = re.compile(r"\b(ld|st|atom|red|cp|tensormap)\.")  # PTX that reads or writes memory; prefetch does not


def is_jit(obj) -> bool:
    return isinstance(obj, triton.runtime.JITFunction | triton.runtime.interpreter.InterpretedFunction)


def kernels() -> dict[str, object]:
    """Every launched kernel of the modules (by convention named _*_kernel), by name."""
    found = {name: obj for m in KERNEL_MODULES for name, obj in vars(m).items()
             if is_jit(obj) and name.endswith("_kernel") and obj.fn.__module__ == m.__name__}  # fmt: skip
    assert len(found) >= 16, sorted(found)  # the decode step's 16 kernels at least: discovery works
    return found


# --------------------------------------------------------------------------------------------- the switch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is on only on a machine without a GPU")
def test_off_on_the_cpu_and_under_the_interpreter():
    assert pdl.launch_kwargs(torch.device("cpu")) == {"launch_pdl": False, "USE_PDL": False}
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # the interpreter decides before the device is asked about: no CUDA call on a machine without one
    assert pdl.launch_kwargs(torch.device("cuda", 0)) == {"launch_pdl": False, "USE_PDL": False}


def test_on_for_sm90_cuda_unless_switched_off(monkeypatch):
    monkeypatch.setattr(pdl, "interpreting", lambda: False)
    capability = {0: True, 1: False}  # device 0 a Hopper, device 1 an older GPU
    monkeypatch.setattr(pdl, "_sm90_or_later", capability.__getitem__)
    monkeypatch.setattr(pdl, "_enabled", True)
    assert pdl.launch_kwargs(torch.device("cuda", 0)) == {"launch_pdl": True, "USE_PDL": True}
    assert pdl.launch_kwargs(torch.device("cuda", 1))["launch_pdl"] is False
    assert pdl.launch_kwargs(torch.device("cpu"))["launch_pdl"] is False
    pdl.set_enabled(False)
    assert not pdl.enabled() and pdl.launch_kwargs(torch.device("cuda", 0))["USE_PDL"] is False
    pdl.set_enabled(True)
    assert pdl.launch_kwargs(torch.device("cuda", 0))["USE_PDL"] is True


@pytest.mark.parametrize("env, expected", [(None, True), ("1", True), ("0", False)])
def test_env_var_sets_the_default(env, expected):
    environ = {k: v for k, v in os.environ.items() if k != "MOETUNE_PDL"} | ({"MOETUNE_PDL": env} if env else {})
    code = "from moetune.kernels import pdl; print(pdl.DEFAULT, pdl.enabled())"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(expected)] * 2


# ------------------------------------------------------------------------------------- every launch passes it


def launch_everything() -> None:
    """One launch of every decode-step kernel, through its public launcher, on tiny inputs on DEVICE."""
    from moetune.kernels.fused_moe import fused_moe, fused_moe_routed, quantize_fp8_per_expert

    g = torch.Generator().manual_seed(0)
    T, E, N, K = 2, 4, 32, 64
    randn = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    x, logits = randn(T, K).bfloat16(), randn(T, E)
    (w13, s13), (w2, s2) = quantize_fp8_per_expert(randn(E, 2 * N, K)), quantize_fp8_per_expert(randn(E, K, N))
    cfg = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=2)
    for extra in ({}, {"fuse_silu": 1}, {"kernel": "gemv"}):
        fused_moe(x, logits, w13, w2, 2, cfg | extra, s13, s2)
    routing.route_and_align(logits, 2, 16, parallel=True)
    fused_moe_routed(x, randn(E, K).bfloat16(), w13, w2, 2, cfg, s13, s2)
    activation.quantize_rows(x)
    activation.silu_mul(randn(T, 2 * N).bfloat16(), torch.empty(T, N, dtype=torch.bfloat16, device=DEVICE))
    linear_fp8.linear_w8a16(x, *linear_fp8.quantize_per_channel(randn(16, K)))
    q, cache = randn(1, 4, 16), randn(4, 16, 2, 16)  # [B, H, D], [blocks, block_size, Hkv, D]
    ints = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    attention.paged_decode_attention(q, cache, cache, ints([0, 1]), ints(20), partition_tokens=16)
    norm.add_rms_norm(x, torch.ones(K, dtype=torch.bfloat16, device=DEVICE), 1e-5, residual=x)
    qkv, cos = randn(1, 8 * 16).bfloat16(), randn(8, 8)  # 4 q heads + 2 k + 2 v heads of D=16
    longs = lambda *v: torch.tensor(v, device=DEVICE)  # noqa: E731
    rope.rope_and_cache(qkv, longs(3), cos, cos, 4, 2, cache.bfloat16(), cache.bfloat16(), longs(5))


def test_every_launch_passes_launch_pdl_and_use_pdl_together(monkeypatch):
    """Under the interpreter both are False; on a GPU both are what pdl.launch_kwargs says (True on sm_90+)."""
    launches: list[tuple[str, dict]] = []
    jit = triton.runtime.interpreter.InterpretedFunction if pdl.interpreting() else triton.runtime.jit.JITFunction
    real = jit.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, kwargs))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(jit, "run", record)
    launch_everything()
    assert {name for name, _ in launches} == set(kernels())  # every kernel launched, and no other
    expected = pdl.launch_kwargs(torch.device(DEVICE))["launch_pdl"]
    assert expected is (torch.cuda.is_available() and pdl.enabled() and torch.cuda.get_device_capability()[0] >= 9)
    for name, kw in launches:
        assert "launch_pdl" in kw and "USE_PDL" in kw and kw["launch_pdl"] is kw["USE_PDL"] is expected, name


# ----------------------------------------------------------------------------------- the rule, on the source


def fn_ast(jit_fn) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(jit_fn.fn))).body[0]


def is_wait(stmt: ast.stmt) -> bool:
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "wait_previous"
            and [ast.unparse(a) for a in call.args] == ["USE_PDL"])  # fmt: skip


def local_sources(stmts: list[ast.stmt]) -> dict[str, set[str]]:
    """name -> the names its assignments in stmts read (`x_ptrs = x_ptr + ...`, `x_ptrs += BLOCK_K`)."""
    found: dict[str, set[str]] = {}
    for n in (n for s in stmts for n in ast.walk(s)):
        if isinstance(n, ast.Assign | ast.AugAssign | ast.AnnAssign) and n.value is not None:
            read = {x.id for x in ast.walk(n.value) if isinstance(x, ast.Name)}
            for target in n.targets if isinstance(n, ast.Assign) else [n.target]:
                for name in (x.id for x in ast.walk(target) if isinstance(x, ast.Name)):
                    found.setdefault(name, set()).update(read)
    return found


def pointers(expr: ast.AST, sources: dict[str, set[str]]) -> set[str]:
    """The kernel's pointer parameters (named *_ptr) that expr is computed from, through local variables."""
    seen, todo = set(), [x.id for x in ast.walk(expr) if isinstance(x, ast.Name)]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sources.get(name, ())
    return {name for name in seen if name.endswith("_ptr")}


def accesses(node: ast.AST, scope: dict, weights: set[str], in_kernel: bool = True,
             sources: dict[str, set[str]] | None = None) -> list[str]:  # fmt: skip
    """What under node may not precede the wait: the kernel's returns, every store and atomic, inline asm that
    touches memory, loads except through `weights` (traced through `sources`, the locals' assignments), and
    any such access, loads all included, inside a @triton.jit helper called there."""
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.Return) and in_kernel:
            found.append("return")
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        if isinstance(f, ast.Attribute) and ast.unparse(f.value) == "tl" and f.attr in ("load", "store"):
            if f.attr == "store" or not in_kernel or not pointers(n.args[0], sources or {}) <= weights:
                found.append(ast.unparse(n)[:60])
        elif isinstance(f, ast.Attribute) and ast.unparse(f.value) == "tl" and f.attr.startswith("atomic_"):
            found.append(ast.unparse(n)[:60])
        elif isinstance(f, ast.Attribute) and ast.unparse(f.value) == "tl" and f.attr == "inline_asm_elementwise":
            asm = n.args[0] if n.args else next(k.value for k in n.keywords if k.arg == "asm")
            if not isinstance(asm, ast.Constant) or MEMORY_ASM.search(str(asm.value)):
                found.append(ast.unparse(n)[:60])
        elif isinstance(f, ast.Name) and is_jit(scope.get(f.id)) and scope[f.id] is not wait_previous:
            helper = scope[f.id]
            found += [f"{f.id}: {a}" for a in accesses(fn_ast(helper), helper.fn.__globals__, set(), False)]
    return found


def violations(kernel, weights: set[str] = frozenset()) -> list[str]:
    """Why `kernel` breaks the PDL rule; [] when it keeps it."""
    if "USE_PDL" not in kernel.arg_names:
        return ["no USE_PDL parameter"]
    if kernel.fn.__globals__.get("wait_previous") is not wait_previous:
        return ["wait_previous is not moetune.kernels.pdl's"]
    body = fn_ast(kernel).body
    waits = [i for i, stmt in enumerate(body) if is_wait(stmt)]
    if len(waits) != 1:
        return [f"{len(waits)} top-level wait_previous(USE_PDL) statements, not one"]
    before, scope = body[: waits[0]], kernel.fn.__globals__
    sources = local_sources(before)
    return [f"before the wait: {a}" for s in before for a in accesses(s, scope, weights, sources=sources)]


def test_wait_previous_waits_then_lets_the_next_grid_launch():
    (branch,) = fn_ast(wait_previous).body[1:]  # after the docstring
    assert isinstance(branch, ast.If) and ast.unparse(branch.test) == "USE_PDL" and not branch.orelse
    assert [ast.unparse(s) for s in branch.body] == ["tl.extra.cuda.gdc_wait()", "tl.extra.cuda.gdc_launch_dependents()"]


@pytest.mark.parametrize("name", sorted(kernels()))
def test_kernel_waits_before_touching_memory_another_kernel_writes(name):
    assert violations(kernels()[name], WEIGHT_POINTERS.get(name, set())) == []


# Kernels that break the rule, one way each: the checker must name every one.
@triton.jit
def _writes_first(x_ptr, USE_PDL: tl.constexpr):
    tl.store(x_ptr, 1.0)
    wait_previous(USE_PDL)


@triton.jit
def _loads_activation_first(x_ptr, w_ptr, USE_PDL: tl.constexpr):
    w = tl.load(w_ptr)
    x = tl.load(x_ptr + tl.arange(0, 16))
    wait_previous(USE_PDL)
    tl.store(x_ptr + tl.arange(0, 16), x * w)


@triton.jit
def _waits_in_some_programs(x_ptr, USE_PDL: tl.constexpr):
    if tl.program_id(0) == 0:
        wait_previous(USE_PDL)
    tl.store(x_ptr, 1.0)


@triton.jit
def _returns_before_waiting(x_ptr, n, USE_PDL: tl.constexpr):
    if tl.program_id(0) >= n:
        return
    wait_previous(USE_PDL)
    tl.store(x_ptr, 1.0)


@triton.jit
def _zero(x_ptr):
    tl.atomic_xchg(x_ptr, 0)


@triton.jit
def _helper_writes_first(x_ptr, USE_PDL: tl.constexpr):
    _zero(x_ptr)
    wait_previous(USE_PDL)


@triton.jit
def _loads_activation_through_a_local_first(x_ptr, w_ptr, USE_PDL: tl.constexpr):
    offs = tl.arange(0, 16)
    x_ptrs = x_ptr + offs
    x_ptrs += 16
    x = tl.load(x_ptrs)
    wait_previous(USE_PDL)
    tl.store(x_ptrs, x * tl.load(w_ptr + offs))


@triton.jit
def _load(p):
    return tl.load(p)


@triton.jit
def _loads_through_a_helper_first(x_ptr, w_ptr, USE_PDL: tl.constexpr):
    x = _load(x_ptr + tl.arange(0, 16))
    wait_previous(USE_PDL)
    tl.store(x_ptr + tl.arange(0, 16), x)


@triton.jit
def _asm_load(p):
    return tl.inline_asm_elementwise("ld.global.b32 $0, [$1];", "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _asm_loads_first(x_ptr, USE_PDL: tl.constexpr):
    x = _asm_load(x_ptr + tl.arange(0, 16))
    wait_previous(USE_PDL)
    tl.store(x_ptr + tl.arange(0, 16), x)


@triton.jit
def _prefetch(p):
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                                     is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _keeps_the_rule(x_ptr, w_ptr, USE_PDL: tl.constexpr):
    offs = tl.arange(0, 16)
    w_ptrs = w_ptr + offs
    w = tl.load(w_ptrs)
    _prefetch(x_ptr + offs)  # a prefetch touches no memory a program sees: allowed on anything
    wait_previous(USE_PDL)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * w)


@pytest.mark.parametrize("bad, why", [
    (_writes_first, "tl.store"), (_loads_activation_first, "tl.load(x_ptr"), (_waits_in_some_programs, "0 top-level"),
    (_returns_before_waiting, "return"), (_helper_writes_first, "_zero: tl.atomic_xchg"),
    (_loads_activation_through_a_local_first, "tl.load(x_ptrs)"), (_loads_through_a_helper_first, "_load: tl.load"),
    (_asm_loads_first, "_asm_load: tl.inline_asm"),
])  # fmt: skip
def test_checker_catches_each_kind_of_violation(bad, why):
    found = violations(bad, {"w_ptr"})
    assert found and any(why in v for v in found), found


def test_checker_passes_a_weight_load_before_the_wait_only_when_declared():
    assert violations(_keeps_the_rule, {"w_ptr"}) == []
    assert violations(_keeps_the_rule) != []
