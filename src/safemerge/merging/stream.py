"""Stream a planned merge: one chunk of rows at a time, from the readers through the merge
method to the writer; and ``merge``, the public entry point.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from safemerge.checkpoints.readers import Checkpoint
from safemerge.checkpoints.writer import (
    Entry,
    ShardedWriter,
    atomic_directory,
    check_out,
    copy_file,
    plan_shards,
    shard_names,
    write_file,
)
from safemerge.config import DEFAULT_SEED, MergeConfig, validate
from safemerge.errors import CheckpointError, SafemergeError
from safemerge.merging import methods
from safemerge.merging.plan import MergePlan, Source, TensorPlan, plan_merge

HEADROOM = 64 << 20  # free space kept beyond the weights when checking the disk
CHUNK_ELEMENTS = 1 << 20  # merges work on ~4 MB float32 pieces: fast, cache-warm and flat in memory
# a method with whole-tensor statistics reads a tensor whole when all its inputs take at most this much as
# float32, so one read serves statistics and merge; a larger one (Gemma 3's 262k-row embeddings) is read
# twice in chunks, once for the statistics and once for the merge, and memory stays flat
WHOLE_BYTES = 128 << 20
@dataclass(frozen=True)
class MergeResult:
    out: Path
    method: str
    params: dict
    fingerprints: dict[str, str]  # input spec -> content fingerprint (empty for a dry run)
    files: list[str]
    tensors: int
    notes: list[str]
    nbytes: int  # of the weights written
    dry_run: bool = False


# --- streaming -------------------------------------------------------------------------


def dare_generators(seed: int, name: str, count: int) -> list[torch.Generator]:
    """One CPU generator per fine-tuned model and tensor, seeded from sha256('seed:name:i'),
    so results never depend on the order in which tensors are processed."""
    gens = []
    for i in range(count):
        digest = hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return gens


class DareDraws:
    """DARE's uniform draws: per tensor and fine-tuned model, ``torch.rand`` float32 in
    row-major order on its own generator; drawing in consecutive chunks gives the same
    numbers as drawing whole. Made on the reader thread, in piece order."""

    def __init__(self, seed: int, count: int):
        self.seed, self.count = seed, count
        self.name, self.gens = None, []

    def next(self, name: str, shape: tuple[int, ...]) -> list[Tensor]:
        if name != self.name:
            self.name, self.gens = name, dare_generators(self.seed, name, self.count)
        return [torch.rand(shape, generator=g) for g in self.gens]


def check_finite(x: Tensor, name: str, where: str) -> None:
    # a sum (accumulated in float32 for any float dtype) is one fast pass with no copy;
    # only a non-finite sum, NaN/Inf or an overflow, needs the exact test
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise CheckpointError(f"tensor {name} in {where} contains NaN or Inf; that input is broken, re-download or re-train it")


@dataclass(frozen=True)
class Piece:
    """One unit of streaming work: rows [r0, r1) of a tensor; ``added`` for vocabulary rows."""

    plan: TensorPlan
    r0: int
    r1: int
    added: bool = False


def chunk_rows(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:]) if shape else 1
    return max(1, CHUNK_ELEMENTS // row)


def reads_whole(plan: MergePlan, tp: TensorPlan) -> bool:
    if plan.method.prepare is None or not tp.merge:
        return False
    return tp.shared_rows * math.prod(tp.shape[1:]) * 4 * (1 + len(plan.tuned)) <= WHOLE_BYTES


def pieces(plan: MergePlan):
    """Row chunks in output order; a merge that needs whole-tensor statistics reads a small
    tensor whole (and still computes and writes it in chunks)."""
    for tp in plan.tensors:
        step = tp.shared_rows if reads_whole(plan, tp) else chunk_rows(tp.shape)
        for r0 in range(0, tp.shared_rows, step):
            yield Piece(tp, r0, min(r0 + step, tp.shared_rows))
        out_rows = tp.shape[0] if tp.shape else 1
        if out_rows > tp.shared_rows:
            yield Piece(tp, tp.shared_rows, out_rows, added=True)


@dataclass
class Loaded:
    """A piece's inputs, made ready on the reader thread."""

    aligned: Tensor | None  # raw rows (None for added vocabulary rows)
    tuned: list[Tensor]  # per fine-tuned input: raw rows, or float32 rows built from a LoRA adapter
    draws: list[Tensor] | None = None  # DARE's uniform draws
    stats: object = None  # the method's whole-tensor statistics


class TensorStats:
    """A method's whole-tensor statistics, computed once per tensor at its first piece (the reader
    thread loads pieces in order): from the rows in hand when the tensor is read whole, otherwise
    from ``Flat`` views that read the inputs chunk by chunk."""

    def __init__(self, plan: MergePlan):
        self.plan, self.name, self.value = plan, None, None

    def of(self, p: Piece, aligned: Tensor, tuned: list[Tensor]):
        if p.plan.name != self.name:
            whole = (p.r0, p.r1) == (0, p.plan.shared_rows)
            base, fine = (aligned, tuned) if whole else lazy_inputs(self.plan, p.plan)
            self.value = self.plan.method.stats(base, fine, **self.plan.config.params)
            self.name = p.plan.name
        return self.value


def lazy_inputs(plan: MergePlan, tp: TensorPlan) -> tuple[methods.Flat, list[methods.Flat]]:
    """The merged rows of a tensor's inputs as Flat views, checked for NaN/Inf as they are read.
    They read the files directly: the content hash is fed by the merge's own in-order reads."""
    name, shape = tp.name, (tp.shared_rows, *tp.shape[1:])

    def aligned_rows(r0: int, r1: int) -> Tensor:
        return checked(plan.aligned.files.read(name, (r0, r1)), name, plan.aligned.spec)

    def tuned_view(t: Source) -> methods.Flat:
        if isinstance(t, Checkpoint):
            return methods.Flat(shape, lambda r0, r1: checked(t.files.read(name, (r0, r1)), name, t.spec))
        return methods.Flat(shape, lambda r0, r1: checked(t.tuned(name, aligned_rows(r0, r1).float(), (r0, r1)), name, t.spec))

    return methods.Flat(shape, aligned_rows), [tuned_view(t) for t in plan.tuned]


def checked(x: Tensor, name: str, where: str) -> Tensor:
    if x.is_floating_point():
        check_finite(x, name, where)
    return x


def load(plan: MergePlan, p: Piece, draws: DareDraws | None, stats: TensorStats | None = None) -> Loaded:
    """Everything a piece needs before the merge proper, run ahead on the reader thread so that
    it overlaps the merging of the previous piece: reads, NaN/Inf checks, fine-tuned rows from
    adapters, DARE's draws and whole-tensor statistics."""
    name, rows = p.plan.name, (p.r0, p.r1)
    aligned = None if p.added else read_checked(plan.aligned, name, rows)
    if not (p.plan.merge or p.added):
        return Loaded(aligned, [])
    tuned = [tuned_rows(t, name, aligned, rows) for t in plan.tuned]
    if p.added:
        return Loaded(aligned, tuned)
    return Loaded(aligned, tuned, draws and draws.next(name, aligned.shape), stats and stats.of(p, aligned, tuned))


def read_checked(source: Checkpoint, name: str, rows) -> Tensor:
    return checked(source.read(name, rows), name, source.spec)


def tuned_rows(t: Source, name: str, aligned: Tensor | None, rows) -> Tensor:
    """Fine-tuned rows: a checkpoint's own, or from a LoRA adapter the aligned rows + delta in
    float32 (or, for added vocabulary rows, the adapter's own)."""
    if isinstance(t, Checkpoint):
        return read_checked(t, name, rows)
    f = t.files.read(t.full[name], rows) if aligned is None else t.tuned(name, aligned.float(), rows)
    check_finite(f, name, t.spec)
    return f


def outputs(plan: MergePlan, p: Piece, x: Loaded):
    """The output chunks of a piece, each rounded once to the output dtype."""
    tp = p.plan
    if not (tp.merge or p.added):
        yield x.aligned.to(tp.dtype)
        return
    if p.added:
        yield rounded(methods.mean([f.float() for f in x.tuned]), tp)
        return
    step, row = chunk_rows(tp.shape), math.prod(tp.shape[1:]) if tp.shape else 1
    for r0 in range(0, p.r1 - p.r0, step):
        part = slice(r0, r0 + step) if tp.shape else ...
        out = plan.method.apply(
            x.aligned[part].float(), [f[part].float() for f in x.tuned],
            stats=x.stats, start=(p.r0 + r0) * row, draws=x.draws and [d[part] for d in x.draws], **plan.config.params,
        )
        yield rounded(out, tp)


def rounded(x: Tensor, tp: TensorPlan) -> Tensor:
    result = x.to(tp.dtype)
    if tp.dtype in (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2) and not torch.isfinite(result.float()).all():
        raise SafemergeError(f"merged tensor {tp.name} overflows {str(tp.dtype).removeprefix('torch.')}; use --dtype bfloat16 or float32")
    return result


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stream(plan: MergePlan, writer: ShardedWriter, progress=None) -> None:
    """Merge every piece in output order, with a reader thread running ahead.

    Three threads share the work: the reader (I/O, checks, statistics), this one (the merge
    proper) and the writer. Each runs torch on one core: chunks are too small to be worth
    splitting, and the threads already keep the cores busy.
    """
    with torch_threads(1):
        stream_pieces(plan, writer, progress)


def stream_pieces(plan: MergePlan, writer: ShardedWriter, progress=None) -> None:
    work = list(pieces(plan))
    draws = DareDraws(plan.config.seed, len(plan.tuned)) if "draws" in plan.method.takes else None
    stats = TensorStats(plan) if plan.method.prepare else None
    depth = 1 if plan.method.prepare else 2  # pieces read ahead; whole tensors are big
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="safemerge-reader") as pool:
        ahead = [pool.submit(load, plan, p, draws, stats) for p in work[:depth]]
        for i, p in enumerate(work):
            loaded = ahead.pop(0).result()
            if i + depth < len(work):
                ahead.append(pool.submit(load, plan, work[i + depth], draws, stats))
            for out in outputs(plan, p, loaded):
                writer.write(p.plan.name, out)
                if progress:
                    progress(out.numel() * out.element_size())


# --- the public entry point ------------------------------------------------------------


def merge(
    aligned: str | os.PathLike,
    finetuned: list[str | os.PathLike] | str | os.PathLike,
    out: str | Path,
    *,
    method: str = "linear",
    lam: float | None = None,
    density: float | None = None,
    seed: int = DEFAULT_SEED,
    dtype: str = "auto",
    shard_size: str | int = "5GB",
    keep_aligned: list[str] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    invoked_as: str | None = None,
    dry_run: bool = False,
) -> MergeResult:
    """Merge an aligned model with its fine-tuned version(s) and write a Hugging Face directory.

    ``lam`` (λ) is the weight of the fine-tuned model: linear gives (1-λ)·aligned + λ·finetuned.
    ``finetuned`` may be model directories, LoRA adapter directories or Hub ids; several are
    averaged (seeds). Raises ``SafemergeError`` subclasses for every problem a user can cause,
    leaving nothing at ``out``. ``invoked_as`` (the command line, when called from a CLI) is
    recorded in the model card beside the equivalent ``safemerge merge`` command. With
    ``dry_run`` every input is opened and checked (headers only) and nothing is written.

    Example::

        safemerge.merge("Meta-Llama-3-8B-Instruct", ["./sft-seed0"], "./merged", method="linear", lam=0.6)
    """
    cfg = validate(
        MergeConfig, aligned=str(aligned),
        finetuned=[str(finetuned)] if isinstance(finetuned, (str, os.PathLike)) else [str(f) for f in finetuned],
        out=Path(out), method=method, lam=lam, density=density, seed=seed, dtype=dtype, shard_size=shard_size,
        keep_aligned=keep_aligned or [], force=force, allow_pickle=allow_pickle,
    )
    return run(cfg, progress=progress, invoked_as=invoked_as, dry_run=dry_run)


def run(cfg: MergeConfig, progress: bool = True, invoked_as: str | None = None, dry_run: bool = False,
        note: str | None = None) -> MergeResult:
    """``note``: a paragraph for the model card (how this merge was chosen)."""
    plan = plan_merge(cfg)
    try:
        check_out(cfg.out, cfg.force)
        check_free_space(cfg.out, plan.output_bytes)
        if dry_run:
            files = shard_names(len(plan_shards(entries(plan), cfg.shard_size)))
            return MergeResult(Path(os.path.abspath(cfg.out)), cfg.method, cfg.params, {}, files,
                               len(plan.tensors), plan.notes, plan.output_bytes, dry_run=True)
        return write_merge(plan, progress, invoked_as, note)
    finally:
        plan.close()


def entries(plan: MergePlan) -> list[Entry]:
    return [Entry(t.name, t.dtype, t.shape) for t in plan.tensors]


def check_free_space(out: Path, need: int) -> None:
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    want = int(need * 1.02) + HEADROOM
    if free < want:
        raise SafemergeError(
            f"the merged model needs {human(need)} (plus {human(want - need)} headroom for the tokenizer, card and "
            f"file system) but {parent} has {human(free)} free; free some space or choose another --out"
        )


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_merge(plan: MergePlan, progress: bool, invoked_as: str | None = None, note: str | None = None) -> MergeResult:
    from safemerge.merging import card  # noqa: PLC0415  (imported late: the card is needed only here)

    cfg = plan.config
    metadata = {"format": "pt", "safemerge_version": card.version(), "method": cfg.method,
                **{k: str(v) for k, v in cfg.params.items()}}
    with atomic_directory(cfg.out, cfg.force) as tmp:
        writer = ShardedWriter(tmp, entries(plan), cfg.shard_size, metadata)
        try:
            with card.progress_bar(plan.output_bytes, f"{cfg.method} merge", enabled=progress) as advance:
                stream(plan, writer, advance)
            weight_map = writer.finish()
        except BaseException:
            writer.abort()
            raise
        fingerprints = {s.spec: s.fingerprint() for s in (plan.aligned, *plan.tuned)}
        write_file(tmp / "config.json", card.dump_json(plan.model_config))
        for f in (*plan.tokenizer, plan.aligned.path / "generation_config.json"):
            if f.exists():
                copy_file(f, tmp / f.name)
        result = MergeResult(
            Path(os.path.abspath(cfg.out)), cfg.method, cfg.params, fingerprints,
            sorted(set(weight_map.values())), len(weight_map), plan.notes, plan.output_bytes,
        )
        write_file(tmp / "safemerge.json", card.dump_json(card.provenance(cfg, result, invoked_as)))
        write_file(tmp / "README.md", card.model_card(cfg, result, invoked_as, note))
    return result
