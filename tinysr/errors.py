"""Errors a user can act on; the CLI and app print their message, never a traceback."""


class TinySRError(Exception):
    pass


class ImageError(TinySRError, ValueError):
    """An input that is not a usable image (unreadable, truncated, empty, too large)."""


class NumericalError(TinySRError, ArithmeticError):
    """The model produced NaN/inf or a flat image even in the fallback precision."""


class OutOfMemory(TinySRError, MemoryError):
    """The work did not fit in the memory this process may use (RAM limit, free RAM, GPU memory)."""


class UnsupportedOption(TinySRError, ValueError):
    """An option this device or backend cannot run (int8 on a GPU, fp16 on the ONNX backend)."""


class WrongModelError(TinySRError, ValueError):
    """A weight folder that holds something other than what was asked for."""


class MissingWeightsError(TinySRError, FileNotFoundError):
    """A weight file that is not where it should be; says which file, where we looked, how to get it."""

    def __init__(self, file: str, searched: list[str], hint: str):
        self.file, self.searched, self.hint = file, list(searched), hint
        places = "\n".join(f"  - {p}" for p in self.searched)
        super().__init__(f"missing weights: {file}\nsearched:\n{places}\n{hint}")
