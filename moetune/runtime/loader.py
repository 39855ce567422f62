"""Load an HF Mixtral safetensors folder into the model, one tensor at a time.

Every name and shape is checked against the headers before any weight moves, so a wrong checkpoint
fails in a second with the tensor named. Tensors are then read lazily (safe_open memory-maps the
files), so host memory holds one tensor at a time, not the whole 8x7B checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from moetune.errors import MoetuneError
from moetune.runtime.model import MixtralForCausalLM

log = logging.getLogger("moetune")


def load_safetensors(model: MixtralForCausalLM, folder: str | Path) -> None:
    from safetensors import safe_open  # the `serve` extra; dummy weights need no safetensors

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MoetuneError(f"{folder}: no *.safetensors files (an HF Mixtral checkpoint folder is expected)")
    expected = MixtralForCausalLM.checkpoint_shapes(model.spec)
    params = dict(model.named_parameters())
    with contextlib.ExitStack() as stack:
        where, file_of = {}, {}
        for f in files:
            handle = stack.enter_context(_open(safe_open, f))
            where.update(dict.fromkeys(handle.keys(), handle))
            file_of.update(dict.fromkeys(handle.keys(), f))
        missing = [name for name in expected if name not in where]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MoetuneError(f"{folder}: checkpoint is missing tensor {missing[0]}{more} for model {model.spec.name}")
        for name, shape in expected.items():
            found = tuple(where[name].get_slice(name).get_shape())
            if found != shape:
                raise MoetuneError(
                    f"{folder}: tensor {name} has shape {list(found)}, expected {list(shape)} "
                    f"for model {model.spec.name}"
                )
        for name in expected:  # layer order: fp8 staging holds at most one expert's gate/up pair
            param_name, shard_id = MixtralForCausalLM.param_for(name)
            param = params[param_name]
            try:
                tensor = where[name].get_tensor(name)
            except Exception as e:  # safetensors' own errors carry no file name
                raise MoetuneError(f"{file_of[name]}: cannot read tensor {name} ({_why(e)})") from None
            param.weight_loader(param, tensor, shard_id)
    extra = len(where) - len(expected)
    log.info("loaded %d tensors from %s%s", len(expected), folder, f" ({extra} unused)" if extra else "")


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().rstrip(":")


def _open(safe_open, path: Path):
    """safe_open, with an empty, truncated or corrupt file reported by name (safetensors names none)."""
    size = path.stat().st_size
    if size == 0:
        raise MoetuneError(f"{path}: the file is empty (0 bytes); the download or copy did not finish")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise MoetuneError(
            f"{path}: not a valid safetensors file ({size} bytes; {_why(e)}); it is truncated or corrupt, "
            "re-download it"
        ) from None
