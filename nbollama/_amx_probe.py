"""The AMX probe's child process: decode real batches on llama.cpp's AMX buffer, then on the plain path.

``nbollama.amx`` runs this file by its path (``python _amx_probe.py MODEL THREADS``) in a process of
its own, so that if the AMX path crashes, only this process dies. It imports llama_cpp and numpy, not
nbollama. It prints one JSON line: whether llama.cpp made an AMX buffer, and how often the two paths
agree on the most likely next token.
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp as ll
import numpy as np

_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers that "
    "changed physics: on the photoelectric effect, Brownian motion, special relativity and the "
    "equivalence of mass and energy. Water boils at 100 degrees Celsius at sea level."
)
_SEQS = 8  # a batch of one token from each of 8 sequences: the shape of a decode step at parallel 8
_log_lines: list[str] = []


@ll.llama_log_callback
def _on_log(level: int, text: bytes | None, user_data: object) -> None:
    _log_lines.append((text or b"").decode("utf-8", errors="replace"))


def _top1(path: bytes, threads: int, use_extra_bufts: bool) -> list[int]:
    """The argmax of every logits row of three decodes: a prompt, one token, and 8 sequences at once."""
    params = ll.llama_model_default_params()
    params.n_gpu_layers = 0  # AMX is a CPU buffer
    params.use_extra_bufts = use_extra_bufts
    model = ll.llama_model_load_from_file(path, params)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path.decode()}")
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = int(ll.llama_vocab_n_tokens(vocab))
    data = _TEXT.encode()
    buffer = (ll.llama_token * (len(data) + 8))()
    n = ll.llama_tokenize(vocab, data, len(data), buffer, len(buffer), True, False)
    tokens = list(buffer[: max(n, 0)])[:64]
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = 128 * _SEQS
    cparams.n_batch = cparams.n_ubatch = 128
    cparams.n_seq_max = _SEQS
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.kv_unified = True
    context = ll.llama_init_from_model(model, cparams)
    if not context:
        raise SystemExit("llama.cpp could not create a context")
    batch = ll.llama_batch_init(128, 0, 1)
    rows: list[int] = []

    def decode(entries: list[tuple[int, int, int]]) -> None:
        batch.n_tokens = len(entries)
        for i, (token, pos, seq) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = True
        if ll.llama_decode(context, batch) != 0:
            raise SystemExit("llama_decode failed")
        for i in range(len(entries)):
            row = np.ctypeslib.as_array(ll.llama_get_logits_ith(context, i), shape=(n_vocab,))
            rows.append(int(row.argmax()))

    decode([(t, p, 0) for p, t in enumerate(tokens)])  # a prompt: many rows, AMX tiles
    decode([(tokens[0], len(tokens), 0)])  # one row: the single-token path
    # one token from each of 8 sequences (sequence 0 goes on, the others start)
    decode([(tokens[0], len(tokens) + 1, 0)] + [(tokens[s], 0, s) for s in range(1, _SEQS)])
    ll.llama_batch_free(batch)
    ll.llama_free(context)
    ll.llama_model_free(model)
    return rows


def main() -> int:
    path, threads = sys.argv[1].encode(), int(sys.argv[2])
    ll.llama_backend_init()
    ll.llama_log_set(_on_log, ctypes.c_void_p(0))
    amx_rows = _top1(path, threads, use_extra_bufts=True)
    amx_buffer = any("AMX" in line and "buffer size" in line for line in _log_lines)
    plain_rows = _top1(path, threads, use_extra_bufts=False)
    same = sum(a == b for a, b in zip(amx_rows, plain_rows))
    print(json.dumps({"ok": True, "amx_buffer": amx_buffer, "rows": len(amx_rows),
                      "agreement": same / max(len(amx_rows), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
