"""KV-cache precision: the types llama.cpp stores K and V in, checked before anything loads.

Both engines and every front end read the names from here: the local engine
passes them to llama.cpp, the sweep's recommendation turns them into each
server's own setting, and the magics check them.
"""

from __future__ import annotations

from ..exceptions import InvalidParamsError

__all__ = [
    "KV_TYPES",
    "KV_BYTES_PER_VALUE",
    "QUANTISED_KV_TYPES",
    "check_kv_types",
    "kv_label",
    "server_kv_words",
]

#: The cache types llama.cpp takes (llama-server's ``--cache-type-k`` list), smallest last.
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0")
#: Bytes per stored value, from ggml's block sizes: for estimates before a load only
#: (a loaded engine reports what llama.cpp allocated).
KV_BYTES_PER_VALUE = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
    "q4_1": 20 / 32, "iq4_nl": 18 / 32, "q4_0": 18 / 32,
}  # fmt: skip
#: Block-quantised types: V in one of these needs flash attention.
QUANTISED_KV_TYPES = frozenset({"q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0"})


def check_kv_types(
    kv_type: object, kv_type_v: object, flash_attn: object
) -> tuple[str, str]:
    """``(type_k, type_v)`` for the arguments given, or a one-line ``InvalidParamsError``.

    ``kv_type`` sets K, and V too unless ``kv_type_v`` is given. llama.cpp
    quantises V only inside its flash-attention kernel, so a quantised V with
    ``flash_attn=False`` is refused here; Ollama would silently fall back to f16.
    """
    for name, value in (("kv_type", kv_type), ("kv_type_v", kv_type_v)):
        if value is None and name == "kv_type_v":
            continue
        if not isinstance(value, str) or value.lower() not in KV_TYPES:
            raise InvalidParamsError(
                f"{name}={value!r}: must be one of {', '.join(KV_TYPES)} "
                "(q8_0 halves f16's KV memory, q4_0 quarters it)"
            )
    type_k = str(kv_type).lower()
    type_v = str(kv_type_v).lower() if kv_type_v is not None else type_k
    if type_v in QUANTISED_KV_TYPES and flash_attn is False:
        given = "kv_type_v" if kv_type_v is not None else "kv_type"
        raise InvalidParamsError(
            f"{given}={type_v!r} quantises V, which llama.cpp does only with flash attention, and "
            "flash_attn=False turns it off: pass flash_attn=True (or 'auto'), or keep V in f16 "
            "with kv_type_v='f16'"
        )
    return type_k, type_v


def kv_label(type_k: str, type_v: str) -> str:
    """``'q8_0'`` when K and V agree, else ``'K q8_0 / V f16'``."""
    return type_k if type_k == type_v else f"K {type_k} / V {type_v}"


def server_kv_words(kind: str, type_k: str, type_v: str, *, model: str = "") -> str:
    """The setting that gives a server this KV precision, as its admin would write it.

    Ollama sets K and V together and needs flash attention on, or it falls
    back to f16 without a word; vLLM stores KV in 8-bit floats, not q8_0.
    """
    quantised_v = type_v in QUANTISED_KV_TYPES
    if kind == "ollama":
        if type_k != type_v:
            return (
                f"# Ollama sets K and V together (OLLAMA_KV_CACHE_TYPE); {kv_label(type_k, type_v)} "
                f"has no Ollama form: the nearest is OLLAMA_KV_CACHE_TYPE={type_k}"
            )
        if type_k not in ("f16", "q8_0", "q4_0"):
            return f"# Ollama's OLLAMA_KV_CACHE_TYPE takes f16, q8_0 or q4_0, not {type_k}"
        return (
            "sudo systemctl edit ollama.service\n"
            "#   [Service]\n"
            f'#   Environment="OLLAMA_KV_CACHE_TYPE={type_k}"\n'
            '#   Environment="OLLAMA_FLASH_ATTENTION=1"\n'
            "sudo systemctl daemon-reload && sudo systemctl restart ollama\n"
            "# without OLLAMA_FLASH_ATTENTION=1 Ollama keeps the KV cache in f16, silently"
        )
    if kind == "llama-server":
        fa = " -fa on" if quantised_v else ""
        return f"llama-server -m {model or 'MODEL.gguf'} --cache-type-k {type_k} --cache-type-v {type_v}{fa}"
    if kind == "vllm":
        if type_k == "q8_0" and type_v == "q8_0":
            return (
                f"vllm serve {model or 'MODEL'} --kv-cache-dtype fp8"
                "  # vLLM's 8-bit KV is FP8, not q8_0: measure its quality there"
            )
        return f"# vLLM has no {kv_label(type_k, type_v)} KV cache (--kv-cache-dtype takes auto or fp8 variants)"
    return f"# an OpenAI-compatible server sets its KV cache type where it starts; nbollama cannot set {type_k}"
