"""A tokenizer for server tests: one token per character (id = code point + 3), so texts and ids map both
ways exactly. Its own module, so the HTTP process unpickles it without importing the tests' torch."""


class FakeTokenizer:
    """One token per character (id = code point + 3), so texts and ids map both ways exactly."""

    eos_id = 2

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([1] if bos else []) + [ord(c) + 3 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 3) for i in ids if i > 2)
