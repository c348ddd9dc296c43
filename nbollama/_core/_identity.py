"""What the result store knows an in-kernel engine by: everything that decides its outputs."""

from __future__ import annotations

import json

from ..models import model_identity
from ._config import EngineConfig
from ._llama import LlamaModel

__all__ = ["engine_identity"]


def engine_identity(model: LlamaModel, config: EngineConfig, *, flash_attn: bool) -> str:
    """The model's bytes, the llama.cpp build and CPU, the AMX path, and every setting that
    changes the numbers (KV types, reproducible mode, jump-forward, ctx, batch, threads, GPU layers)."""
    from .. import amx  # here: `python -m nbollama.amx` runs before the package imports it

    return json.dumps(
        {
            "kind": "local",
            "model": model_identity(config.model_path),
            "llama.cpp": amx.build_fingerprint(),
            "repacked": model.amx.use_extra_bufts,
            "kv": [config.type_k, config.type_v],
            "kv_unified": config.kv_unified,
            "flash_attn": flash_attn,
            "reproducible": config.reproducible,
            "jump_forward": config.jump_forward,  # a forced run decoded as a chunk can move a near-tie
            "ctx": config.ctx_per_slot,
            "n_batch": config.n_batch,
            "threads": config.threads,
            "gpu_layers": config.gpu_layers,
        },
        sort_keys=True,
    )
