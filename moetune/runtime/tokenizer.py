"""Mixtral's sentencepiece tokenizer: the checkpoint's tokenizer.model, else the identical copy in mistral-common."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moetune.errors import MoetuneError


def find_tokenizer_model(checkpoint: str | None) -> Path:
    if checkpoint and (Path(checkpoint) / "tokenizer.model").is_file():
        return Path(checkpoint) / "tokenizer.model"
    try:
        path = Path(str(resources.files("mistral_common").joinpath("data/tokenizer.model.v1")))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        where = f"{checkpoint}/tokenizer.model does not exist and " if checkpoint else ""
        raise MoetuneError(
            f"no Mixtral tokenizer: {where}mistral-common (which ships tokenizer.model.v1) is not installed; "
            "`pip install mistral-common` or put tokenizer.model in the checkpoint folder"
        )
    return path


class Tokenizer:
    def __init__(self, model_file: str | Path):
        try:
            import sentencepiece as spm
        except ImportError:
            raise MoetuneError("the tokenizer needs sentencepiece: `pip install sentencepiece`") from None
        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise MoetuneError(
                f"{self.path}: not a valid sentencepiece tokenizer model ({str(e).strip() or type(e).__name__}); "
                "it is corrupt or truncated, re-download it"
            ) from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()

    def __reduce__(self) -> tuple:
        return Tokenizer, (self.path,)  # the HTTP process reloads it from the file

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))
