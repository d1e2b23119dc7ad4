"""How the three parts of the GMD engine fit: every compatibility rule between a gradient source, a communicator
and an aggregator lives in `resolve` (docs/design.md §8). It resolves each `auto` choice and says why, or raises
ValueError with the reason; nothing falls back silently. docs/engine.md's combination table is `table()`'s output
and tests/test_engine_plan.py checks GMD against it.

`compose` builds the parts from GMD's keyword arguments (today's strategy= / memory= / ddp_module= /
process_group= / communication= / order= / ... are a thin translation onto the same parts).
"""
from __future__ import annotations

from dataclasses import dataclass

from gmd_ext.gmd import comm as comm_, fsdp, sources
from gmd_ext.gmd.aggregators import GMDProjection, as_aggregator

SOURCE_KINDS = ("auto", "sequential", "batched", "branches", "low_memory")
COMM_KINDS = ("auto", "local", "all_reduce", "reduce_scatter", "fsdp2")
AGGREGATOR_KINDS = ("gmd", "weighting")


@dataclass(frozen=True)
class Resolution:
    """What `resolve` decided: concrete source / communicator kinds (source "auto" stays: it is decided per step
    from the losses) and one line per choice made on the caller's behalf."""
    source: str
    comm: str
    aggregator: str
    notes: tuple[str, ...]


def resolve(source: str, comm: str, aggregator: str, *, sharded: bool = False, group: bool = False,
            numel: int = 0) -> Resolution:
    """The one home of the engine's combination rules.

    Args:
        source: one of SOURCE_KINDS. comm: one of COMM_KINDS. aggregator: one of AGGREGATOR_KINDS.
        sharded: the trainable parameters are FSDP2 DTensors. group: a process group was given (ddp_module= /
            process_group=). numel: the number of trainable elements.
    Returns:
        Resolution. Raises ValueError naming the rule when the parts cannot work together.
    """
    for value, kinds, what in ((source, SOURCE_KINDS, "source"), (comm, COMM_KINDS, "communicator"),
                               (aggregator, AGGREGATOR_KINDS, "aggregator")):
        if value not in kinds:
            raise ValueError(f"{what} must be one of {kinds}, got {value!r}")
    notes = []
    if sharded:
        if group or comm == "local":
            raise ValueError(f"GMD on an FSDP2 (fully_shard) model communicates through FSDP2 on the device mesh's "
                             f"group: pass neither ddp_module= / process_group= nor another communicator (got "
                             f"{comm}{' with a process group' if group else ''})")
        if comm != "fsdp2":
            notes.append(f"communicator {comm} -> fsdp2: the parameters are FSDP2 DTensors (FSDP reduce-scatters "
                         f"each objective's gradient itself)")
        comm = "fsdp2"
    elif comm == "fsdp2":
        raise ValueError("the FSDP2 communicator needs a model sharded by fully_shard (DTensor parameters)")
    elif comm == "auto":
        if not group:
            comm = "local"
        else:
            big = numel >= comm_.REDUCE_SCATTER_MIN_NUMEL
            comm = "reduce_scatter" if big else "all_reduce"
            notes.append(f"communicator auto -> {comm}: N = {numel} trainable elements {'>=' if big else '<'} "
                         f"REDUCE_SCATTER_MIN_NUMEL = {comm_.REDUCE_SCATTER_MIN_NUMEL}")
    elif not group and comm != "local":
        notes.append(f"communicator {comm} -> local: no process group, nothing to communicate")
        comm = "local"
    if comm == "fsdp2":
        if source in ("batched", "branches"):
            raise ValueError(f"the {source} source cannot run on an FSDP2 model: FSDP's reduce-scatter runs in "
                             f"backward hooks that vmapped and partial (autograd.grad) backward passes do not "
                             f"trigger; use the sequential source")
        if source == "auto":
            notes.append("source auto -> sequential: FSDP2 reduce-scatters in its backward hooks, one plain "
                         "backward per objective")
            source = "sequential"
    if source == "low_memory" and comm != "local":
        raise ValueError('memory="low" (the low_memory source) runs in one process: the Gramian of rank-averaged '
                         'gradients is not the average of the ranks\' Gramians, so it needs the rows it does not '
                         'keep; under DDP / process_group= / FSDP2 use the default memory (reduce_scatter or FSDP2 '
                         'keep K·N/W per rank)')
    if comm == "reduce_scatter" and source in ("auto", "batched", "branches"):
        notes.append("reduce_scatter under a source that completes the rows at the end (batched, branches): K "
                     "full rows per rank, each reduce-scattered once complete; (K + 1)·N values sent per rank")
    if source == "auto":
        notes.append("source auto: branches when the step's losses reach marked branch outputs, else sequential")
    return Resolution(source, comm, aggregator, tuple(notes))


#: The communicator settings the table lists: (requested kind, sharded, group, numel, label).
_SETTINGS = (("local", False, False, 0, "local"), ("all_reduce", False, True, 0, "all_reduce"),
             ("reduce_scatter", False, True, 0, "reduce_scatter"), ("fsdp2", True, False, 0, "fsdp2 (FSDP2 model)"),
             ("auto", False, False, 0, "auto, one process"),
             ("auto", False, True, comm_.REDUCE_SCATTER_MIN_NUMEL - 1, "auto, DDP, N < REDUCE_SCATTER_MIN_NUMEL"),
             ("auto", False, True, comm_.REDUCE_SCATTER_MIN_NUMEL, "auto, DDP, N >= REDUCE_SCATTER_MIN_NUMEL"),
             ("auto", True, False, 0, "auto, FSDP2 model"))


def table() -> list[tuple[str, str, str, str]]:
    """(source, communicator setting, resolved "source + comm" or "refused", reason) for every combination; the
    aggregator column is omitted because no rule depends on it (checked by the tests)."""
    rows = []
    for source in SOURCE_KINDS:
        for comm, sharded, group, numel, label in _SETTINGS:
            try:
                r = resolve(source, comm, "gmd", sharded=sharded, group=group, numel=numel)
            except ValueError as e:
                rows.append((source, label, "refused", str(e)))
                continue
            rows.append((source, label, f"{r.source} + {r.comm}", "; ".join(r.notes)))
    return rows


_BEGIN = "<!-- combination table: generated by gmd_ext.gmd.plan, do not edit -->\n"
_END = "<!-- end of combination table -->"


def render_docs(text: str) -> str:
    """docs/engine.md's text with the combination table between its markers replaced by `markdown_table()`."""
    a, b = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    return text[:a] + markdown_table() + text[b:]


def markdown_table() -> str:
    lines = ["| source | communicator | resolves to | why |", "|---|---|---|---|"]
    lines += [f"| {s} | {c} | {r} | {why.replace('|', '/')} |" for s, c, r, why in table()]
    return "\n".join(lines) + "\n"


_OFFICIAL_DEFAULTS = dict(reduction="mean", order="random", seed=None, include_self=True, usage="official",
                          specific=None)


def compose(params, *, source, comm, aggregator, strategy, memory, ddp_module, process_group, communication,
            backend, official: dict):
    """(source, communicator, aggregator, Resolution) from GMD's arguments: the new parts (source=, comm=,
    aggregator=) or today's keyword arguments translated onto them; never both for one part."""
    # seed only seeds randomness the aggregator has (GMDProjection's order); a Gramian weighting has none, so a
    # seed passed out of habit changes nothing. The others would change the result: refused with a weighting.
    given = {k: v for k, v in official.items() if k != "seed" and not _same(v, _OFFICIAL_DEFAULTS[k])}
    if aggregator is None:
        aggregator = GMDProjection(backend=backend, **official)
    elif given or (isinstance(aggregator, GMDProjection) and official["seed"] is not None):
        if isinstance(aggregator, GMDProjection) and official["seed"] is not None:
            given["seed"] = official["seed"]
        raise ValueError(f"{sorted(given)} are arguments of the official GMD projection; with aggregator= pass them "
                         f"to gmd_ext.gmd.GMDProjection(...) (a Gramian weighting has no order, reduction or usage)")
    aggregator = as_aggregator(aggregator, backend)
    if source is None:
        if memory not in ("default", "low"):
            raise ValueError(f"memory must be one of ('default', 'low'), got {memory!r}")
        if strategy not in ("auto", "sequential", "batched", "branches"):
            raise ValueError(f"strategy must be one of ('auto', 'sequential', 'batched', 'branches'), got {strategy!r}")
        source = "low_memory" if memory == "low" else strategy
    elif strategy != "auto" or memory != "default":
        raise ValueError("pass either source= or strategy= / memory=, not both")
    source = sources.as_source(source)
    sharded = fsdp.is_sharded(params)
    if comm is None:
        comm = fsdp.FSDP2() if sharded and ddp_module is None and process_group is None else \
            comm_.make_comm(ddp_module, process_group, communication, sum(p.numel() for p in params))
        requested = communication
    elif ddp_module is not None or process_group is not None or communication != "auto":
        raise ValueError("pass either comm= or ddp_module= / process_group= / communication=, not both")
    elif not isinstance(comm, comm_.Comm):
        raise TypeError(f"comm must be a gmd_ext.gmd communicator (Local, AllReduce, ReduceScatter, FSDP2), got "
                        f"{type(comm).__name__}")
    else:
        requested = comm.kind
    kind = "gmd" if isinstance(aggregator, GMDProjection) else "weighting"
    plan = resolve(source.name, requested, kind, sharded=sharded, group=comm.group is not None or
                   isinstance(comm, (comm_.AllReduce, comm_.ReduceScatter)), numel=sum(p.numel() for p in params))
    if plan.source != source.name:  # an auto choice the rules made
        source = sources.as_source(plan.source)
    return source, comm, aggregator, plan


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and not hasattr(a, "shape") and a == b)


if __name__ == "__main__":  # python -m gmd_ext.gmd.plan [docs/engine.md]: rewrite the table in place
    import sys
    from pathlib import Path

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/engine.md")
    path.write_text(render_docs(path.read_text()))
