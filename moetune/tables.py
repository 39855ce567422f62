"""Config tables in vLLM's format: file naming, schema checks, atomic writes, nearest-M lookup.

A table maps a token count M (before top-k) to the six launch knobs of the fused-MoE kernel.
vLLM and SGLang load our files unchanged; anything richer lives in a sidecar beside the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

import jsonschema

from moetune.errors import MoetuneError, TableError
from moetune.kernels.knobs import FUSE_SILU_MIN_BLOCK_N, VLLM_KNOBS, check_config
from moetune.models import DTYPES, MoeShape

log = logging.getLogger("moetune")

KNOBS = tuple(VLLM_KNOBS)  # the six knobs a vLLM-format table holds
# The token counts vLLM's tuner covers; ours covers the same so tables line up key for key.
TOKEN_COUNTS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
# The interpreter runs a tiny layer in about a second: CPU runs and benches default to these few M.
CPU_TOKEN_COUNTS = (1, 16, 64)
SIDECAR_SUFFIX = ".moetune.json"
CPU_DEVICE_NAME = "CPU_triton_interpreter"
# Where interpreter tables go by default: a run folder, never the repo's tuned_configs/ (which ships).
CPU_TABLES_DIR = Path("runs") / "tuned_configs"
# A token-count key: no sign, no leading zero, at most 7 digits (the schemas say the same; M above
# 9,999,999 tokens in one step is not a batch any engine runs, and int() of a huge key is a typo).
M_KEY_RE = re.compile(r"[1-9][0-9]{0,6}")

Config = dict[str, Any]  # vLLM's six int knobs, plus our extra knobs (kernels/knobs.py) in a sidecar

_FILE_RE = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+)"
    r"(?:,dtype=(?P<dtype>[^,]+))?(?:,block_shape=\[(?P<bn>\d+),(?P<bk>\d+)\])?\.json$"
)


def parse_token_counts(text: str) -> list[int]:
    """'1,16,256' -> [1, 16, 256]: the token counts M given on a command line, sorted and unique."""
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise MoetuneError(f"--batch-sizes {text!r} is malformed; give positive integers separated by commas, "
                           f"e.g. 1,16,256")  # fmt: skip
    return sorted(set(counts))


def device_name() -> str:
    """The GPU's name as vLLM writes it in file names (spaces become underscores)."""
    import torch

    if not torch.cuda.is_available():
        return CPU_DEVICE_NAME
    return torch.cuda.get_device_name().replace(" ", "_")


def table_filename(E: int, N: int, device: str, dtype: str) -> str:
    """vLLM's rule; N is the per-rank intermediate size. bf16/fp16 carry no dtype part."""
    suffix = DTYPES[dtype][2]
    return f"E={E},N={N},device_name={device}" + (f",dtype={suffix}" if suffix else "") + ".json"


def parse_table_filename(name: str) -> dict[str, Any] | None:
    """The parts of a vLLM table file name, or None for any other file."""
    m = _FILE_RE.match(name)
    if not m:
        return None
    parts: dict[str, Any] = {"E": int(m["E"]), "N": int(m["N"]), "device": m["device"], "dtype": m["dtype"]}
    if m["bn"]:
        parts["block_shape"] = [int(m["bn"]), int(m["bk"])]
    return parts


def sidecar_path(table_path: Path) -> Path:
    return table_path.with_name(table_path.name.removesuffix(".json") + SIDECAR_SUFFIX)


def default_config(M: int, E: int) -> Config:
    """vLLM's long-standing untuned default; Triton's own 4 warps and 3 stages made explicit."""
    if M <= E:
        return dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=32, GROUP_SIZE_M=8, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------------------------- schema


def perturb_rounding(config: Config) -> Config:
    """The same computation rounded another way, as a tuned config rounds differently from the default:
    BLOCK_SIZE_M moves between 16 and 64 (on Hopper, mma.sync tiles against wgmma tiles, which
    accumulate fp8 products differently) and BLOCK_SIZE_K is halved (doubled at 32). Neither changes
    what is computed, so the measured drift between a config and this one is the noise floor of two
    correct configs. (BLOCK_SIZE_K alone measured a floor of exactly 0 on an H100: with the same
    instruction the K tiles are summed in the same order.) On the tiled path fuse_silu flips too: SiLU on
    GEMM1's float32 output instead of its rounded copy is the rounding change a tuned table's fused entries
    bring, and in bf16 the tile changes alone measured a floor of exactly 0 where fused entries moved
    logits (2x H200, TP2, 2026-11-26), which made the check cry wolf."""
    k, m = config["BLOCK_SIZE_K"], config["BLOCK_SIZE_M"]
    out = {**config, "BLOCK_SIZE_K": k * 2 if k <= 32 else k // 2, "BLOCK_SIZE_M": 64 if m < 64 else 16}
    if config.get("kernel") != "gemv" and config["BLOCK_SIZE_N"] >= FUSE_SILU_MIN_BLOCK_N:
        out["fuse_silu"] = 0 if config.get("fuse_silu") else 1
    return out


def data_dir(name: str) -> Path:
    """schemas/ or tuned_configs/: inside an installed wheel they are moetune.<name>; in a source
    checkout (on PYTHONPATH as on the GPU machine, or a git worktree beside an editable install that
    points elsewhere) they sit beside the package, and the checkout's own copy wins."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / name).is_dir():
        return root / name
    try:
        return Path(str(resources.files(f"moetune.{name}")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / name


@functools.cache
def _schema(name: str) -> dict:
    return json.loads((data_dir("schemas") / name).read_text())


def _describe(error: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into 'where: what is wrong' a person can act on."""
    path = list(error.absolute_path)
    where = f"M={path[0]}" if path and str(path[0]).isdigit() else (f"key {path[0]!r}" if path else "top level")
    field = f" {path[1]}" if len(path) > 1 else ""
    v = error.validator
    if v == "additionalProperties" and (not path or path[-1] == "entries"):
        bad = sorted(k for k in error.instance if k != "triton_version" and not M_KEY_RE.fullmatch(k))
        key = bad[0] if bad else "?"
        return (f"{'entries: ' if path else ''}key {key!r} is not a token count (a positive integer of at most "
                f"7 digits, no leading zero, written as a string)")
    if v == "additionalProperties":
        extra = sorted(set(error.instance) - set(KNOBS))
        return f"{where}: unknown knob(s) {extra}; a table holds only {', '.join(KNOBS)} (extras go in the sidecar)"
    if v == "required":
        return f"{where}: {error.message.replace('is a required property', 'is missing')}"
    if v == "enum" and field.strip().startswith("BLOCK_SIZE"):
        return f"{where}:{field}={error.instance!r} must be a power of two from 16 to 512"
    if v == "enum" and field.strip() == "num_warps":
        return f"{where}: num_warps={error.instance!r} must be one of 1, 2, 4, 8, 16"
    if v in ("type", "minimum", "maximum"):
        return f"{where}:{field} {error.message}"
    if v == "minProperties":
        return "the table is empty; it needs at least one token count"
    return f"{where}{field}: {error.message}"


def _validate(obj: Any, schema_name: str, path: Path) -> None:
    validator = jsonschema.Draft202012Validator(_schema(schema_name))
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise TableError(f"{path}: {_describe(errors[0])}")


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except OSError as e:
        raise TableError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8 text (byte {e.start}); a table is a JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TableError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def load_table(path: str | os.PathLike) -> dict[int, Config]:
    """Read and check a table; keys become ints, 'triton_version' is dropped (as vLLM does)."""
    path = Path(path)
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise TableError(f"{path}: top level must be a JSON object mapping token counts to configs")
    _validate(obj, "config_table.schema.json", path)
    configs = {int(k): dict(v) for k, v in obj.items() if k != "triton_version"}
    for M, config in configs.items():
        _integers_only(config, f"{path}: M={M}")
    return configs


def _integers_only(config: Mapping[str, Any], where: str) -> None:
    """JSON Schema calls 16.0 an integer; vLLM would pass it to Triton as a float. Refuse it."""
    for knob, value in config.items():
        if knob in VLLM_KNOBS and type(value) is not int:
            raise TableError(f"{where}: {knob}={value!r} must be an integer (write {int(value)})")


def load_sidecar(table_path: str | os.PathLike) -> dict | None:
    """The sidecar beside a table, checked: schema, a possible shape, and every config (extra knobs
    included) against kernels/knobs.py, so a bad knob is refused at load rather than at launch."""
    path = sidecar_path(Path(table_path))
    if not path.exists():
        return None
    obj = _read_json(path)
    _validate(obj, "sidecar.schema.json", path)
    s = obj["shape"]
    if s["top_k"] > s["E"]:
        raise TableError(f"{path}: shape top_k={s['top_k']} exceeds E={s['E']}: top-k picks distinct experts")
    for M, entry in obj["entries"].items():
        for key in ("config", "vllm_config"):
            if key in entry:
                try:
                    check_config(entry[key], f"{path}: M={M}: {key}")
                except MoetuneError as e:
                    raise TableError(str(e)) from None
    return obj


def _file_mode() -> int:
    """0644 under the usual umask: what open() would give. mkstemp's 0600 would hide a table from a
    vLLM server running as another user."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write: Callable[[IO[str]], object]) -> None:
    """Write, fsync, then rename: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: (json.dump(obj, f, indent=2), f.write("\n")))


def atomic_write_text(path: Path, text: str) -> None:
    """For the CSVs the tools write (trials, bench rows, serve results)."""
    _atomic_write(path, lambda f: f.write(text))


def save_table(path: Path, configs: Mapping[int, Config], sidecar: dict | None = None) -> None:
    """Write a table vLLM can load (only the six knobs per M) and, optionally, its sidecar."""
    import triton

    obj: dict[str, Any] = {str(m): {k: int(configs[m][k]) for k in KNOBS} for m in sorted(configs)}
    obj["triton_version"] = triton.__version__
    _validate(obj, "config_table.schema.json", path)
    if sidecar is not None:
        _validate(sidecar, "sidecar.schema.json", sidecar_path(path))
        atomic_write_json(sidecar_path(path), sidecar)
    atomic_write_json(path, obj)


# ----------------------------------------------------------------------------------------------- lookup


def nearest(keys: Iterable[int], M: int) -> int:
    """vLLM's rule: the closest tuned M; a tie goes to the smaller key."""
    return min(sorted(keys), key=lambda k: abs(k - M))


def packaged_tables_dir() -> Path:
    return data_dir("tuned_configs")


def search_folders(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Where tables are looked for, first match wins: given folders, then env vars, then the package."""
    folders = [Path(p) for p in extra]
    for var in ("MOETUNE_TUNED_CONFIGS", "VLLM_TUNED_CONFIG_FOLDER"):
        if os.environ.get(var):
            folders.append(Path(os.environ[var]))
    folders.append(packaged_tables_dir())
    return folders


@dataclass
class ConfigTable:
    """The configs one MoE layer uses: a tuned table, or vLLM's default when none exists.

    `ours` holds, per M, a sidecar config with knobs vLLM lacks (e.g. {"kernel": "gemv"}); our
    kernel runs it, while the table keeps a six-knob config for vLLM and SGLang at that M.
    """

    E: int
    configs: dict[int, Config]
    path: Path | None = None
    ours: dict[int, dict[str, Any]] = field(default_factory=dict)
    perturb: bool = False  # every pick with BLOCK_SIZE_M/K and fuse_silu changed (perturb_rounding): a correct twin

    def pick(self, M: int) -> dict[str, Any]:
        if not self.configs:
            config = default_config(M, self.E)
        else:
            m = nearest(self.configs, M)
            config = self.ours.get(m, self.configs[m])
        return perturb_rounding(config) if self.perturb else config

    def perturbed(self) -> ConfigTable:
        """This table with BLOCK_SIZE_M/K and fuse_silu changed in every config: equivalent, rounds otherwise."""
        return dataclasses.replace(self, perturb=True)

    @classmethod
    def load(cls, path: Path, E: int) -> ConfigTable:
        """A table file plus the extra-knob configs of its sidecar, if it has one."""
        sidecar = load_sidecar(path) or {"entries": {}}
        ours = {int(m): e["config"] for m, e in sidecar["entries"].items() if set(e["config"]) - set(KNOBS)}
        return cls(E=E, configs=load_table(path), path=path, ours=ours)

    @classmethod
    def untuned(cls, E: int) -> ConfigTable:
        return cls(E=E, configs={})


_warned: set[str] = set()


def find_table(
    shape: MoeShape, dtype: str, device: str | None = None, folders: Iterable[str | os.PathLike] = ()
) -> ConfigTable:
    """Load the table for (E, N, device, dtype); fall back to the default with one warning."""
    name = table_filename(shape.E, shape.N, device or device_name(), dtype)
    searched = search_folders(folders)
    for folder in searched:
        if (folder / name).is_file():
            log.info("using tuned MoE configs from %s", folder / name)
            return ConfigTable.load(folder / name, shape.E)
    if name not in _warned:
        _warned.add(name)
        others = [f"{d} ({folder / n})" for d in DTYPES if d != dtype
                  for n in [table_filename(shape.E, shape.N, device or device_name(), d)] if n != name
                  for folder in searched if (folder / n).is_file()]  # fmt: skip
        hint = f"; there is one for another dtype: {others[0]}, pass --dtype to use it" if others else ""
        log.warning(
            "no tuned MoE config table %s for %s in %s; using the default config (run `moetune run` to make one)%s",
            name, dtype, ", ".join(str(f) for f in searched), hint,
        )
    return ConfigTable.untuned(shape.E)
