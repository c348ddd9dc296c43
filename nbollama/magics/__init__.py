"""The notebook surface: ``%nbollama`` to manage the kernel's engine, ``%%generate`` to use it.

Both magics work on the kernel's engine (``nbollama.session``), so cells,
the dashboard and the side panel all look at the same slots. ``%%generate``
streams every prompt into its own area of one display, updated at most four
times a second with ``update_display_data``: that works in JupyterLab (and
Notebook 7) and under nbclient, with no widget involved.

Each magic is three steps: ``_parse_nbollama`` and ``_parse_generate`` read
and check what was typed into a frozen call (so a bad value is a UsageError
before any model loads), with ``_args`` (argparse types), ``_prompts``
(``{name}`` templating) and ``_fanout`` (``--each``); ``_run`` loads, queues
and streams; ``_render`` turns state into output, ``_status`` an engine
snapshot into the ``%nbollama status`` table.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.display import display
from IPython.utils.text import DollarFormatter

from .. import session
from .._eval_results import EvalResults
from ..bench import SweepResult
from ..remote import RemoteEngine
from ..remote._bench import RemoteSweepResult
from ..results import BackgroundGeneration, Results
from ._cache import CacheReport, run_cache
from ._cell import run_compared, run_in_background, run_in_foreground, start_cell
from ._eval import run_eval
from ._models import ModelsListing, models_listing
from ._parse_generate import GenerateHelpCall, parse_generate
from ._parse_nbollama import (
    BenchCall,
    CacheCall,
    ConnectCall,
    DashboardCall,
    DisconnectCall,
    EvalCall,
    LoadCall,
    ModelsCall,
    StatusCall,
    UnloadCall,
    UseCall,
    parse_nbollama,
)
from ._prompts import interpolate, split_prompts
from ._render import (
    disconnected_message,
    generate_help,
    nbollama_help,
    unloaded_message,
)
from ._run import (
    connect,
    load,
    named_or_usage,
    open_dashboard,
    run_bench,
    status_report,
    unload_engine,
)
from ._status import EnginesReport, StatusReport

__all__ = [
    "NbollamaMagics",
    "StatusReport",
    "interpolate",
    "split_prompts",
    "load_ipython_extension",
    "unload_ipython_extension",
]


@magics_class
class NbollamaMagics(Magics):
    """``%nbollama`` and ``%%generate``/``%generate``, registered by ``%load_ext nbollama``."""

    @line_magic("nbollama")  # type: ignore[arg-type]  # IPython mistypes the named form
    def nbollama_magic(
        self, line: str
    ) -> StatusReport | EnginesReport | ModelsListing | CacheReport | SweepResult | RemoteSweepResult | EvalResults | None:
        """Manage the kernel's engine: one model, N parallel slots.

        Usage::

            %nbollama load [MODEL] [--parallel N|auto|adaptive] [--ctx N] [--gpu-layers N|auto]
                           [--threads N] [--batch N] [--no-prefix-cache] [--reproducible]
                           [--max-parallel N] [--min-tps R | --max-ttft S]
                           [--kv-type f16|q8_0|q4_0] [--kv-type-v TYPE] [--flash-attn on|off|auto]
                           [--jump-forward on|off] [--cache-ram MIB] [--as NAME] [--download]
            %nbollama status [NAME]
            %nbollama dashboard
            %nbollama bench [--parallel 1,2,4,8] [--prompts N] [--max-tokens N] [--ctx N]
                            [--kv-type f16,q8_0,q4_0] [--apply]
            %nbollama unload [NAME]
            %nbollama connect URL [--kind auto|llama-server|ollama|vllm|openai] [--model NAME]
                              [--api-key-env VAR] [--max-inflight N] [--timeout S] [--ca-bundle PATH]
                              [--as NAME]
            %nbollama disconnect [NAME]
            %nbollama use NAME
            %nbollama models [FOLDER ...]
            %nbollama cache [clear [--model NAME] [--older-than AGE]] [--dir PATH]
            %nbollama eval TASKS [--limit N] [--num-fewshot K] [--include-path DIR]
                           [--engine NAME[,NAME]] [--out VAR]
            %nbollama help

        ``load`` replaces the kernel's engine (the old one's requests are
        cancelled and its memory freed first) and prints one line: the model,
        the effective number of slots and why, the context per slot, the KV
        cache size and the load time. MODEL is a ``.gguf`` path, an Ollama
        name (``gemma3:270m``, from its store), ``hf:ORG/REPO/FILE.gguf`` (the
        Hugging Face cache; ``--download`` fetches it when missing); without
        it, the bundled Gemma 3 270M. ``--as NAME`` loads it as the engine
        called NAME, beside the others (the first engine stays the default;
        ``use NAME`` switches it, ``unload NAME`` closes one, ``status`` lists
        them all); two engines from one file share its weights. A load that
        would not fit next to the loaded engines is refused first, saying how
        much it needs and how much is free. ``models`` lists the GGUF models
        on this machine: Ollama's store, the Hugging Face cache, LM Studio's
        folder and any FOLDER given. ``--ctx`` is the context of ONE slot: the KV
        cache holds parallel × ctx tokens. ``--parallel auto`` picks what fits
        in memory (``NBOLLAMA_NUM_PARALLEL`` overrides it). ``--parallel adaptive``
        reserves ``--max-parallel`` slots (8 by default) and moves how many take
        requests while it runs: to keep each request at ``--min-tps`` tokens/s,
        the first token under ``--max-ttft`` seconds, or, with neither, the most
        throughput short of where one more slot adds less than 5%. Finished slots keep
        their tokens' KV and prompts that start alike share one prefill (the
        prefix cache); ``--no-prefix-cache`` prefills every prompt in full.
        ``--reproducible`` makes each request's tokens independent of what else
        runs: of ``parallel``, the slot, the other prompts and when they came
        (same prompt, same seed, same text), at some cost in throughput.
        ``--kv-type q8_0`` stores the KV cache in 8 bits (about half of f16's
        bytes, so about twice the slots in the same memory), ``q4_0`` in 4;
        ``--kv-type-v`` sets V apart from K. A quantised V needs flash
        attention: with ``--flash-attn off`` it is an error, never a silent f16.

        ``status`` shows slots, queue, throughput, KV cache and memory as a
        table; ``dashboard`` (with ``nbollama.widgets``) a live view of them;
        ``unload`` closes the engine and frees its memory.

        ``bench`` runs the parallelism sweep (``nbollama.bench.sweep``): for
        each value a fresh context on the same loaded weights, the same prompts
        fired at once; it shows the table (tok/s, TTFT, per-request tok/s, peak
        memory), the plot and the recommended value (the smallest within 10% of
        the best throughput); ``--apply`` switches the engine to it.
        ``--kv-type f16,q8_0,q4_0`` sweeps each KV type x parallel, measures
        each type's quality against f16 (greedy texts, KL divergence,
        perplexity: ``nbollama.bench.kv_quality``) and recommends a type too,
        with the server settings that give the same.

        ``connect`` makes a server the kernel's engine: llama-server, Ollama,
        vLLM or any OpenAI-compatible one, its kind found from its own
        endpoints; it prints what was found (kind, model, the server's
        parallel, the context). ``%%generate``, ``status``, ``dashboard`` and
        the side panel then show the server; ``load`` switches back.
        ``--api-key-env VAR`` names the environment variable that holds the
        API key (never the key itself). ``--max-inflight N`` caps this kernel's
        requests open at once (default: the server's slot count when it says,
        else 4); the rest wait in nbollama's queue. On a server, ``bench``
        sweeps client concurrency (``--concurrency 1,2,4,8,16,32``), infers
        the server's parallelism from the TTFT staircase and recommends a
        setting in the server's words (``OLLAMA_NUM_PARALLEL``, ``-np``,
        ``--max-num-seqs``). ``disconnect`` closes the connection; the server
        keeps running.

        ``eval`` runs lm-evaluation-harness tasks (``nbollama_mc,nbollama_gen`` or
        ``hellaswag``; needs ``pip install 'nbollama[eval]'``) on the kernel's
        engine, every request through its slots at once: a bar per task,
        requests/s and the slots while it runs, then lm-eval's metrics with their
        standard errors (the value: an ``EvalResults``; ``.samples`` has one row
        per question, ``.calibration()`` the plot). ``--include-path DIR`` adds a
        folder of task YAMLs (looked in first; relative ``data_files`` are read
        beside the YAML); ``--engine a,b`` compares named engines in one table.

        Examples::

            %nbollama load
            %nbollama load ~/models/qwen2.5-0.5b-q4_k_m.gguf --parallel 4 --ctx 2048
            %nbollama load gemma3:270m --as small --parallel 2
            %nbollama use small
            %nbollama status
            %nbollama connect http://gpu-box:11434
            %nbollama connect https://llm.example.org/v1 --kind openai --model m --api-key-env EXAMPLE_KEY
        """
        call = parse_nbollama(line)
        if isinstance(call, LoadCall):
            print(load(call).summary)
            return None
        if isinstance(call, StatusCall):
            return status_report(call.name)
        if isinstance(call, DashboardCall):
            display(open_dashboard())
            return None
        if isinstance(call, BenchCall):
            return run_bench(call)
        if isinstance(call, UnloadCall):
            print(unloaded_message(unload_engine(call.name), call.name))
            return None
        if isinstance(call, ConnectCall):
            print(connect(call).summary)
            return None
        if isinstance(call, DisconnectCall):
            engine = named_or_usage("%nbollama disconnect", call.name) if call.name else session.current_engine()
            what: str | None
            if isinstance(engine, RemoteEngine):
                what = f"disconnected from {engine.kind} at {engine.url} (the server keeps running)"
            else:
                what = None if engine is None else "engine closed, its memory freed"
            session.disconnect(call.name)
            print(disconnected_message(what))
            return None
        if isinstance(call, UseCall):
            engine = named_or_usage("%nbollama use", call.name)
            session.use(call.name)
            print(f"nbollama: {call.name!r} is the default engine now: {engine.summary}")
            return None
        if isinstance(call, ModelsCall):
            return models_listing(call.folders)
        if isinstance(call, EvalCall):
            return run_eval(self.shell, call)
        if isinstance(call, CacheCall):
            return run_cache(call)
        print(nbollama_help(call))
        return None

    @no_var_expand
    @line_cell_magic("generate")  # type: ignore[arg-type]  # IPython mistypes the named form
    def generate(self, line: str, cell: str | None = None) -> Results | BackgroundGeneration | None:
        """Generate with the kernel's engine: every prompt in its own slot, all at once.

        Usage::

            %%generate [options]
            first prompt
            ---
            second prompt

            %generate [options] PROMPT

        Prompts are separated by lines holding only ``---`` (``--lines``: one
        prompt per non-empty line). ``{name}`` is filled from the notebook's
        variables; unknown names, ``{{doubled}}`` braces, JSON and code are left
        as written (``--no-format`` turns filling off). ``--each VAR`` runs the
        cell once per item of the list ``VAR``, ``{item}`` being the item.

        Each prompt gets its own area: the prompt, the slot serving it and its
        state, the text as it streams (updated about 4 times a second), then
        its figures: tokens, time to first token, tokens/s, finish reason. A
        prompt that fails (say, too long for a slot) shows its error in its own
        area; the others go on. The cell's value is a ``Results`` list (``.texts``,
        ``.to_pandas()``). No engine loaded? The bundled model is loaded with
        ``parallel="auto"`` first.

        Options (``$name`` and ``{name}`` in this line are expanded, as in any magic)::

            --max-tokens N        tokens to generate per prompt (engine default 256)
            --temperature T       0 is greedy; --top-k K, --top-p P, --min-p P,
                                  --repeat-penalty R, --seed N as in llama.cpp
            --stop TEXT           stop at TEXT (repeatable)
            --chat / --raw        through the model's chat template, or as written (default)
            --system TEXT         a system message (implies --chat)
            --priority N          higher is served first when slots are busy
            --out VAR             also store the Results in VAR
            --each VAR            one prompt per item of VAR, {item} in the template
            --lines               one prompt per non-empty line
            --no-format           leave {name} as written ({item} is still filled)
            -b, --background      return at once with a BackgroundGeneration (.done(),
                                  .wait(), .cancel()), also stored in --out VAR; the
                                  cell's output keeps streaming and VAR becomes the
                                  Results when it finishes
            --markdown            render the final texts as Markdown
            --quiet               no live output, only the value
            --cache / --no-cache  the result store: replay any stored identical request
                                  (sampled ones too) / neither read nor write; by default
                                  only what a rerun would give anyway (reproducible mode)
                                  and the finished rows of this cell cut short
            --watch               a compact engine dashboard above the outputs
                                  (with nbollama.widgets)
            --model NAME          ask the engine called NAME (%nbollama load --as NAME)
            --models A,B          ask each engine named: one table, a column per engine;
                                  the Results hold all (model column; VAR.compare())

        Beyond text (checked before anything runs; one of --choices, --json-schema,
        --regex, --grammar per cell)::

            --logprobs K          each token's probability and its top K alternatives
                                  (0-20): the card shows the tokens shaded, hover for more
            --prompt-logprobs     the same for the prompt's tokens (its perplexity)
            --choices A,B,C       pick the most likely option after the prompt, scored,
                                  not generated (or --choices VAR: a list in the notebook)
            --choice-score S      sum (default) or mean: the options' token logprobs
            --json-schema VAR     output JSON following VAR: a schema dict or a pydantic
                                  model class; each Result.parsed holds it
            --regex PATTERN       output matching PATTERN (quote it: '[0-9]+')
            --grammar VAR         output following the grammar in VAR (Lark or GBNF)

        Ctrl-C (interrupt the kernel) cancels the cell's requests and frees their
        slots; what was generated stays visible, marked "cancelled", and is stored
        in ``--out VAR`` as a partial ``Results``. The KeyboardInterrupt is then
        re-raised, as with any interrupted cell, so "Run all" stops there. A
        ``--background`` cell is not interrupted by Ctrl-C: use ``.cancel()``.

        Examples::

            %%generate --max-tokens 64 --temperature 0.7 --seed 1 --out answers
            Explain continuous batching in one sentence.
            ---
            Write a haiku about {topic}.

            %%generate --each cities --max-tokens 16
            The capital of {item} is

            %generate --max-tokens 32 What's a KV cache?

            %%generate --each reviews --choices positive,negative
            Review: {review}
            Sentiment:

            %%generate --models small,lab --max-tokens 32 --out side
            Explain continuous batching in one sentence.
        """
        shell = self.shell
        assert shell is not None  # load_ipython_extension gives the magics their shell
        call = parse_generate(line, cell, shell.user_ns, expand_options=self._expand)
        if isinstance(call, GenerateHelpCall):
            print(generate_help(call, self.generate.__doc__ or ""))
            return None
        def store(value: Results | BackgroundGeneration) -> None:
            if call.out is not None:
                shell.user_ns[call.out] = value

        if call.models:
            return run_compared(call, store)
        run = start_cell(shell, call)

        if call.background:
            return run_in_background(run, call.out, store)
        return run_in_foreground(run, store)

    def _expand(self, line: str) -> str:
        """IPython's ``$name``/``{name}`` expansion of a cell's options line (the body's is ours)."""
        assert self.shell is not None  # load_ipython_extension gives the magics their shell
        return str(self.shell.var_expand(line, formatter=DollarFormatter()))


# -- the extension --------------------------------------------------------------------------


def _comm(action: str, ipython: Any) -> None:
    """The side panel's comm target (``nbollama.comm``) comes along when that module exists."""
    if importlib.util.find_spec("nbollama.comm") is None:
        return
    comm = importlib.import_module("nbollama.comm")
    getattr(comm, action)(ipython)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbollama``: register the magics and the side panel's comm target."""
    ipython.register_magics(NbollamaMagics(ipython))
    _comm("register", ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbollama``: close the engines, then remove the magics and the comm target."""
    for name in list(session.engines()):
        session.unload(name)
    session.unload()
    manager = ipython.magics_manager
    instance = manager.registry.pop(NbollamaMagics.__name__, None)
    if instance is not None:
        for table in manager.magics.values():
            for name, function in list(table.items()):
                if getattr(function, "__self__", None) is instance:
                    del table[name]
    _comm("unregister", ipython)
