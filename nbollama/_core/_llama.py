"""Where the engine talks to llama.cpp (through llama-cpp-python's ctypes layer), with ``_sampler``.

Thin, typed wrappers over a model, a context and a batch. No policy lives
here: the engine's loop (``_loop``) decides what to decode.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as ll
import llguidance
import llguidance.llamacpp
import numpy as np
import numpy.typing as npt

from ..exceptions import ContextError, InvalidParamsError, ModelLoadError
from ._batch import Batch

__all__ = [
    "LlamaModel",
    "LlamaContext",
    "release_openmp_threads",
    "silence_llama_log",
    "supports_gpu_offload",
    "DECODE_OK",
    "DECODE_NO_KV_SLOT",
    "DECODE_ABORTED",
]

DECODE_OK = 0
DECODE_NO_KV_SLOT = 1
DECODE_ABORTED = 2

_MIB = 1024 * 1024
_LOG_DEBUG, _LOG_CONT = 1, 5  # ggml_log_level values
# KV cache type names (nbollama._api.kvcache.KV_TYPES) -> ggml's type ids
_GGML_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}  # fmt: skip


class _LlamaLog:
    """Keeps llama.cpp's recent log lines: they hold the reasons for failures and buffer sizes.

    llama.cpp reports a failed load only in its log; the engine quotes those
    lines in ``ModelLoadError``. ``NBOLLAMA_VERBOSE=1`` also echoes them.
    """

    def __init__(self) -> None:
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=400)
        self._lock = threading.Lock()
        self._partial = ""
        self._level = 0
        self._serial = 0
        self._callback = ll.llama_log_callback(self._on_log)
        ll.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes | None, user_data: object) -> None:
        chunk = (text or b"").decode("utf-8", errors="replace")
        if os.environ.get("NBOLLAMA_VERBOSE"):
            sys.stderr.write(chunk)
        if level == _LOG_CONT:
            level = self._level
        self._level = level
        if level == _LOG_DEBUG:
            return  # a graph build logs dozens of debug lines: they would push out the buffer sizes
        with self._lock:
            self._partial += chunk
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                self._serial += 1
                self._lines.append((self._serial, line))

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect the lines logged inside the block (from any thread)."""
        with self._lock:
            start = self._serial
        lines: list[str] = []
        try:
            yield lines
        finally:
            with self._lock:
                lines.extend(line for serial, line in self._lines if serial > start)


_backend_lock = threading.Lock()
_log: _LlamaLog | None = None


def _ensure_backend() -> _LlamaLog:
    global _log
    with _backend_lock:
        if _log is None:
            ll.llama_backend_init()
            _log = _LlamaLog()
        return _log


def silence_llama_log() -> None:
    """Detach the Python log callback (at exit: llama.cpp may log during C++ teardown)."""
    with _backend_lock:
        if _log is not None:
            ll.llama_log_set(ll.llama_log_callback(0), ctypes.c_void_p(0))


def supports_gpu_offload() -> bool:
    _ensure_backend()
    return bool(ll.llama_supports_gpu_offload())


def _failure_reason(lines: Sequence[str]) -> str:
    """The llama.cpp log lines that explain a failure, most telling first."""
    telling = [
        ln.strip()
        for ln in lines
        if re.search(r"error|failed|invalid|cannot|not within|unknown|unsupported", ln, re.I)
    ]
    return "; ".join(dict.fromkeys(telling[-4:])) or "llama.cpp gave no reason"


def _buffer_mib(lines: Sequence[str], kind: str) -> float:
    """Sum llama.cpp's '... <kind> buffer size = X MiB' lines."""
    total = 0.0
    for ln in lines:
        m = re.search(rf"{kind} buffer size\s*=\s*([\d.]+)\s*MiB", ln)
        if m:
            total += float(m.group(1))
    return total


@dataclass(frozen=True)
class KVGeometry:
    """What one cached token costs, from the model's hyper-parameters."""

    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_swa: int

    @property
    def bytes_per_token(self) -> int:
        # f16 K and V for every layer: an upper bound (sliding-window layers keep fewer cells)
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * 2


def _builtin_template_for(arch: str) -> str | None:
    """The longest built-in template name that the architecture's name starts with."""
    n = ll.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    ll.llama_chat_builtin_templates(names, n)
    matches = [name.decode() for name in names if name and arch.startswith(name.decode())]
    return max(matches, key=len, default=None)


class LlamaModel:
    """Weights and vocabulary, loaded once and shared by every context made from them.

    Every load in nbollama comes through here, so this is where the AMX guard
    (``nbollama.amx``) decides whether llama.cpp may repack the weights.
    """

    def __init__(self, path: Path, *, gpu_layers: int, use_extra_bufts: bool | None = None) -> None:
        """``use_extra_bufts``: None follows the AMX guard; True/False overrides it (measurements
        that compare the two paths, on a build the guard found safe)."""
        # imported here, not at the top: `python -m nbollama.amx` runs before it is imported
        from .. import amx

        log = _ensure_backend()
        self.amx = amx.decide()  # before llama.cpp reads a byte: a crash there cannot be caught
        params = ll.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.use_extra_bufts = self.amx.use_extra_bufts if use_extra_bufts is None else use_extra_bufts
        with log.capture() as lines:
            ptr = ll.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadError(
                str(path), f"llama.cpp could not load it: {_failure_reason(lines)}"
            )
        self.ptr = ptr
        self.path = path
        self.gpu_layers = gpu_layers
        self.vocab = ll.llama_model_get_vocab(ptr)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(ptr))
        self.n_embd = int(ll.llama_model_n_embd(ptr))
        self.n_params = int(ll.llama_model_n_params(ptr))
        self.size_bytes = int(ll.llama_model_size(ptr))
        self.is_recurrent = bool(ll.llama_model_is_recurrent(ptr))
        self.is_hybrid = bool(ll.llama_model_is_hybrid(ptr))
        self.arch = self.meta("general.architecture") or "unknown"
        self.name = self.meta("general.name") or path.stem
        n_head = int(ll.llama_model_n_head(ptr)) or 1
        default_head_dim = self.n_embd // n_head
        self.kv_geometry = KVGeometry(
            n_layer=int(ll.llama_model_n_layer(ptr)),
            n_head_kv=int(ll.llama_model_n_head_kv(ptr)),
            head_dim_k=int(self.meta(f"{self.arch}.attention.key_length") or default_head_dim),
            head_dim_v=int(self.meta(f"{self.arch}.attention.value_length") or default_head_dim),
            n_swa=int(ll.llama_model_n_swa(ptr)),
        )
        template = ll.llama_model_chat_template(ptr, None)
        self.chat_template: bytes | None = template or None
        self.chat_template_source = "GGUF metadata"
        if self.chat_template is None:
            # Base models often ship without a template; llama.cpp knows its family's format.
            family = _builtin_template_for(self.arch)
            if family is not None:
                self.chat_template = family.encode()
                self.chat_template_source = (
                    f"llama.cpp's built-in {family!r} template (none in the GGUF)"
                )
        self._pieces: dict[int, bytes] = {}
        self._pieces_lock = threading.Lock()
        self._guidance: llguidance.LLTokenizer | None = None
        self._guidance_lock = threading.Lock()
        self._closed = False

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, True)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (cached: the batch loop asks once per sampled token)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        data = buf.raw[:n]
        with self._pieces_lock:
            self._pieces[token] = data
        return data

    def guidance_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of this vocabulary, built once (seconds for 262k tokens) and shared."""
        with self._guidance_lock:
            if self._guidance is None:
                with warnings.catch_warnings():  # llguidance asks llama_cpp's deprecated per-token API
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._guidance = llguidance.llamacpp.lltokenizer_from_vocab(self.vocab)
            return self._guidance

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> str:
        """Render messages with the model's own template (llama.cpp's built-in renderers)."""
        if self.chat_template is None:
            raise InvalidParamsError(
                f"model {self.name!r} has no chat template in its GGUF metadata"
            )
        keep = [(r.encode(), c.encode()) for r, c in messages]
        array = (ll.llama_chat_message * len(keep))()
        for i, (role, content) in enumerate(keep):
            array[i].role = role
            array[i].content = content
        size = sum(len(c) for _, c in keep) * 2 + 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_chat_apply_template(self.chat_template, array, len(keep), True, buf, size)
            if n < 0:
                raise InvalidParamsError(
                    f"llama.cpp does not recognise the chat template of {self.name!r}; "
                    "send the prompt with chat=False and format it yourself"
                )
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            ll.llama_model_free(self.ptr)


class LlamaContext:
    """One llama.cpp context with a sequence (KV stream) per slot."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_seq: int,
        ctx_per_slot: int,
        n_batch: int,
        threads: int,
        flash_attn: bool | None = None,
        kv_unified: bool = False,
        type_k: str = "f16",
        type_v: str = "f16",
    ) -> None:
        log = _ensure_backend()
        params = ll.llama_context_default_params()
        params.n_ctx = ctx_per_slot * n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        # By default one KV stream per slot: each slot owns exactly ctx_per_slot
        # cells and attention never scans the other slots' tokens.
        params.kv_unified = kv_unified
        # Sliding-window layers (Gemma 3) keep every cell, not just the window: a cached
        # prefix can then be cut anywhere and reused (a window-sized cache recycles cells,
        # so a truncated sequence would have holes). Costs KV memory beyond 2 x window.
        params.swa_full = True
        params.flash_attn_type = {
            None: ll.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: ll.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        params.type_k = _GGML_TYPES[type_k]
        params.type_v = _GGML_TYPES[type_v]
        params.no_perf = True
        with log.capture() as lines:
            ptr = ll.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise ContextError(
                f"llama.cpp could not create a context of {n_seq} x {ctx_per_slot} tokens "
                f"(n_batch={n_batch}, KV K {type_k} / V {type_v}): {_failure_reason(lines)}"
            )
        self.ptr = ptr
        self.model = model
        self.memory = ll.llama_get_memory(ptr)
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.n_vocab = model.n_vocab
        self.kv_unified = kv_unified
        self.ctx_per_slot = min(ctx_per_slot, int(ll.llama_n_ctx_seq(ptr)))
        self.type_k, self.type_v = type_k, type_v
        self.kv_bytes = int(_buffer_mib(lines, "KV") * _MIB)
        # llama.cpp says what "auto" became: "flash_attn = auto -> enabled"
        resolved = [ln for ln in lines if "flash_attn" in ln or "Flash Attention" in ln]
        self.flash_attn = flash_attn if flash_attn is not None else not any(
            "disabled" in ln for ln in resolved
        )
        self.compute_bytes = int(
            (_buffer_mib(lines, "compute") + _buffer_mib(lines, "output")) * _MIB
        )
        self._closed = False

    def decode(self, batch: Batch) -> int:
        return int(ll.llama_decode(self.ptr, batch.raw))

    def logits_row(self, index: int) -> npt.NDArray[np.float32]:
        """The logits at batch index ``index`` of the last decode, read in place (no copy)."""
        ptr = ll.llama_get_logits_ith(self.ptr, index)
        if not ptr:
            raise ContextError(f"llama.cpp has no logits for batch index {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def clear_sequence(self, seq: int) -> None:
        ll.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def truncate_sequence(self, seq: int, keep: int) -> None:
        """Keep positions ``[0, keep)`` of a sequence (explicit positions: see ``swa_full``)."""
        ll.llama_memory_seq_rm(self.memory, seq, keep if keep > 0 else -1, -1)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold positions ``[0, n)`` of ``src``.

        In a unified KV buffer this only tags ``src``'s cells with ``dst``. With
        a stream per sequence llama.cpp copies whole streams (at the next
        decode), so ``dst`` gets all of ``src`` and its tail is then dropped.
        """
        ll.llama_memory_seq_rm(self.memory, dst, -1, -1)
        if self.kv_unified:
            ll.llama_memory_seq_cp(self.memory, src, dst, 0, n)
        else:
            ll.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
            ll.llama_memory_seq_rm(self.memory, dst, n, -1)

    def save_sequence(self, seq: int) -> bytearray:
        """The sequence's KV cells as llama.cpp serializes them (``llama_state_seq_get_data``)."""
        size = int(ll.llama_state_seq_get_size(self.ptr, seq))
        state = bytearray(size)
        written = int(
            ll.llama_state_seq_get_data(self.ptr, (ctypes.c_uint8 * size).from_buffer(state), size, seq)
        )
        if written == 0:
            raise ContextError(f"llama.cpp could not save sequence {seq}")
        del state[written:]
        return state

    def restore_sequence(self, seq: int, state: bytes | bytearray) -> bool:
        """Replace the sequence with cells saved by ``save_sequence`` (from any sequence); False
        when llama.cpp refuses them (the sequence is then empty)."""
        self.clear_sequence(seq)
        size = len(state)
        writable = state if isinstance(state, bytearray) else bytearray(state)  # ctypes shares, no copy
        data = (ctypes.c_uint8 * size).from_buffer(writable)
        if int(ll.llama_state_seq_set_data(self.ptr, data, size, seq)) == 0:
            self.clear_sequence(seq)
            return False
        return True

    def sequence_length(self, seq: int) -> int:
        """Cells the sequence holds (its highest position + 1)."""
        return int(ll.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            ll.llama_free(self.ptr)


_openmp_lock = threading.Lock()
_openmp_state: dict[str, ctypes.CDLL | None] = {}


def _openmp_library() -> ctypes.CDLL | None:
    """libgomp as loaded by ggml's CPU backend (None when llama.cpp was built without OpenMP)."""
    with _openmp_lock:
        if "lib" not in _openmp_state:
            lib = None
            try:
                with open("/proc/self/maps") as maps:
                    path = next(
                        (ln.split()[-1] for ln in maps if "libgomp" in ln and "/" in ln), None
                    )
                if path is not None:
                    candidate = ctypes.CDLL(path)
                    if hasattr(candidate, "omp_pause_resource_all"):
                        candidate.omp_pause_resource_all.argtypes = [ctypes.c_int]
                        candidate.omp_pause_resource_all.restype = ctypes.c_int
                        lib = candidate
            except OSError:
                lib = None
            _openmp_state["lib"] = lib
        return _openmp_state["lib"]


def release_openmp_threads() -> None:
    """Let go of the calling thread's idle OpenMP worker threads.

    ggml's CPU backend runs each graph in an OpenMP team owned by the thread
    that called ``llama_decode``. An idle team stays alive, and libgomp counts
    its threads: once it counts more threads than cores, it cuts the spinning
    in every barrier (ggml waits at one after each op) to about 100 turns and
    sleeps instead. A ``Llama`` that ran on the notebook's main thread, or an
    idle engine beside a busy one, slowed decoding by 15-25% this way. The
    team is rebuilt (one ``pthread_create`` per worker) the next time that
    thread decodes. Harmless without OpenMP.
    """
    _ensure_backend()
    lib = _openmp_library()
    if lib is not None:
        lib.omp_pause_resource_all(1)  # omp_pause_soft
