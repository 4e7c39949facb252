"""Device and precision choices shared by pipelines, CLI and benchmark."""

import ctypes
import ctypes.util
import functools
import platform
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import OutOfMemory, UnsupportedOption

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# what a user may ask for: the float dtypes, int8 (int8 linears in the transformer, CPU only) and auto
PRECISIONS = (*DTYPES, "int8", "auto")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def native_bf16() -> bool:
    """The CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates it, slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: fp16 on CUDA/MPS, bf16 on a CPU with native bf16, fp32 elsewhere; other names are checked and kept."""
    if precision not in PRECISIONS:
        raise UnsupportedOption(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise UnsupportedOption(f"int8 runs on the CPU only (dynamic int8 linears); on {device.type} use fp16 or auto")
    if precision != "auto":
        return precision
    if device.type in ("cuda", "mps"):
        return "fp16"
    return "bf16" if native_bf16() else "fp32"


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def half_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision worth using here: fp16 on CUDA/MPS, bf16 on CPU."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def fallback_dtype(device: torch.device) -> torch.dtype:
    """What to retry in when fp16 overflows: bf16 where the device does it natively, else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def timed(timings: dict, stage: str, device: torch.device):
    """Add the seconds spent in the block to `timings[stage]`, waiting for queued GPU work at both ends."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def time_fn(fn, device, repeats: int, statistic=statistics.median) -> float:
    """`statistic` of `repeats` timed runs of `fn` after an untimed warm-up, queued GPU work included."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistic(times)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    """The process's C library when it is glibc with mallopt and mallinfo2 (2.33+), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not all(hasattr(libc, f) for f in ("mallopt", "mallinfo2")):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def reuse_freed_memory(keep_bytes: int = 256 * 2**20) -> bool:
    """Keep freed memory in the process (up to `keep_bytes` at the heap's top) instead of glibc's default, which
    hands every buffer over a few MB back to the OS and page-faults fresh zeroed pages in on the next call. A
    pipeline allocates the same large activations on every call: faulting them in took two thirds of the tiny
    VAE's CPU time (`python -m tinysr bench`: TinySR's VAE 3x faster, the demo pipeline 1.5x). Process-wide, so
    the entry points (CLI, app, trainer) call it and a library user may. False where the libc is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, keep_bytes))


def heap_free_bytes() -> int:
    """Freed memory glibc holds for reuse (not in use; in the RSS unless the kernel paged it out); 0 where unknown."""
    libc = _glibc()
    return libc.mallinfo2().fordblks if libc is not None else 0


def heap_used_bytes() -> int | None:
    """Bytes glibc's malloc has handed out and not had back (heap and mmapped blocks); None where unknown."""
    libc = _glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Peak memory of the block: allocator peak on CUDA; on CPU the peak above its start of glibc's bytes in use
    (else the process RSS), sampled every few milliseconds (torch keeps no CPU statistics). Not the RSS less glibc's
    free bytes: kept pages the kernel pages out under pressure leave the RSS, and reusing them counted twice. Blocks
    may nest (the tiler measures its first tile inside the app's measurement): CUDA has one peak counter, so an
    inner block hands the peak so far to the blocks around it before resetting it."""

    _open_cuda: list = []

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s = torch.device(device), interval_s
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" count as one
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.peak_bytes = 0

    @property
    def kind(self) -> str:
        return "CUDA allocator peak" if self.device.type == "cuda" else "process memory in use, increase"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak_so_far = torch.cuda.max_memory_allocated(self.device)
            for outer in PeakMemory._open_cuda:
                if outer.device == self.device:
                    outer._peak = max(outer._peak, peak_so_far)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = self._peak = torch.cuda.memory_allocated(self.device)
            PeakMemory._open_cuda.append(self)
            return self
        import threading

        import psutil

        process = psutil.Process()

        def in_use() -> int:
            used = heap_used_bytes()
            return used if used is not None else process.memory_info().rss

        self._base = self._peak = in_use()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.interval_s):
                self._peak = max(self._peak, in_use())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            PeakMemory._open_cuda.remove(self)
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self._peak, torch.cuda.max_memory_allocated(self.device)) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._peak - self._base
        return False


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: Python's MemoryError, CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def memory_limit_bytes(device: torch.device) -> int:
    """What this process may use: the GPU's memory, else the smaller of RAM and the address-space limit (ulimit -v)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    import psutil

    limit = psutil.virtual_memory().total
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, soft)
    except ImportError:  # Windows
        pass
    return limit


def container_free_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What a container's memory limit (cgroup v2, as on a hosted Space) still allows; None without one."""
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def free_memory_bytes(device: torch.device) -> int:
    """Memory a step could still take: on CUDA what the GPU has free plus what torch's allocator holds unused; elsewhere
    what the OS (or the container's limit, if lower) has available plus the freed memory glibc keeps for reuse."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    free = psutil.virtual_memory().available
    container = container_free_bytes()
    if container is not None:
        free = min(free, max(container, 0))
    return free + heap_free_bytes()


def out_of_memory_message(e: BaseException, device: torch.device | str, what: str = "this image") -> str:
    """A sentence for an allocation failure: how much one allocation asked for and what the limit is."""
    device = torch.device(device)
    text = str(e)
    asked = None
    if m := re.search(r"allocate ([\d.]+) bytes", text):
        asked = float(m.group(1))
    elif m := re.search(r"allocate ([\d.]+) ([KMGT])iB", text):
        asked = float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024
    need = f"one step alone asked for {asked / 2**30:.1f} GB" if asked else "it needs more than is free"
    where = "GPU memory" if device.type == "cuda" else "memory"
    return (f"Out of {where}: {what} does not fit ({need}; the limit here is {memory_limit_bytes(device) / 2**30:.1f} GB). "
            "Try a smaller image or smaller tiles.")


@contextmanager
def out_of_memory_as_error(device: torch.device, what: str = "this image"):
    """Re-raise an allocation failure inside the block as OutOfMemory with a sentence (the caller lives on)."""
    message = None
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        message = out_of_memory_message(e, device, what)
    if message is None:
        return
    # raised outside the handler, so the failed step's frames and the tensors they hold are already released
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise OutOfMemory(message)
