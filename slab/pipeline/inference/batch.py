"""Volumes through one model, as ``slab predict`` runs them: every output name checked once
(:func:`plan_jobs`) and every input's header read (:func:`check_inputs`) before the model
predicts anything; then :func:`predict_cases` predicts each case (:func:`~slab.pipeline.inference.files.predict_file`),
shares the cases out between the ranks under ``torchrun`` (or one volume's blocks, when it goes
out of core), and gathers every volume's RLE rows and statistics into one file each."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slab.core.distributed import gather_objects, init_distributed, shard_items
from slab.core.errors import SlabError
from slab.core.outputs import atomic_write, temp_dir
from slab.io.dicom_seg import is_dicom_seg
from slab.io.volumes import output_format, volume_info
from slab.pipeline.data.cases import Case, stem
from slab.pipeline.inference.files import Target, VolumePredictor, check_target, predict_file


@dataclass(frozen=True)
class Job:
    """One case and where its results go (names checked)."""

    case: Case
    target: Target
    preview: Path | None = None


def plan_jobs(cases: list[Case], output, *, collection: bool, prob=None, preview=None, per_channel: bool = False,
              id_prefix: str | None = None) -> list[Job]:
    """A job per case, every output name checked once (a DICOM SEG against its case's series).
    For a directory of volumes (``collection``) ``output``, ``prob`` and ``preview`` are
    directories and each case's results take its name."""
    if not collection:
        if preview and Path(preview).suffix.lower() != ".png":
            raise SlabError(f"--preview {preview}: expected a .png file name")
        case = cases[0]
        return [Job(case, check_target(output, per_channel, case.source, prob), Path(preview) if preview else None)]
    if preview and Path(preview).suffix:
        raise SlabError(f"--preview: INPUT is a directory of volumes, so {preview} must be a directory name")
    if id_prefix:
        raise SlabError("--id-prefix: INPUT is a directory of volumes; each case's name is its id prefix")
    for flag, value in (("-o", output), ("--prob", prob)):
        if value and (is_dicom_seg(value) or output_format(value) != "stack"):
            raise SlabError(f"{flag}: INPUT is a directory of volumes, so {value} must be a directory name")
    return [Job(case, check_target(Path(output) / case.output_name, per_channel, case.source,
                                   Path(prob) / case.output_name if prob else None),
                Path(preview) / f"{stem(Path(case.output_name))}.png" if preview else None) for case in cases]


def check_inputs(jobs: list[Job], predictor: VolumePredictor) -> None:
    """Every input's header and channels against the model, before anything is written."""
    for job in jobs:
        predictor.check_input(volume_info(job.case.source), job.case.source)


def predict_cases(jobs: list[Job], predictor: VolumePredictor, *, collection: bool, rle_csv=None,
                  statistics=None, id_prefix: str | None = None, per_channel: bool = False, device: str = "cpu",
                  report: Callable[[str], None] = print) -> None:
    """Predict every job; ``rle_csv`` and ``statistics`` (a ``.json``) gather every volume's rows
    and statistics (one file each; for one volume, its own). ``report`` is told each file written.
    Under ``torchrun`` a directory of volumes is shared out by volume, one volume by block when it
    is predicted out of core into a chunked output (else rank 0 predicts it); rank 0 writes what
    every rank found."""
    info = init_distributed(device)
    shard = info if info.enabled and not collection else None
    found = {}
    with temp_dir("predict") as tmp:
        csvs = {}
        mine = shard_items(list(enumerate(jobs)), info.rank, info.world_size) if collection else list(enumerate(jobs))
        for index, job in mine:
            csv = (tmp / f"{index}.csv" if collection else Path(rle_csv)) if rle_csv else None
            written = predict_file(job.case.source, job.target, predictor, rle_csv=csv,
                                   row_ids=lambda depth, c=job.case: c.row_ids(depth, id_prefix),
                                   statistics=bool(statistics), per_channel=per_channel, shard=shard,
                                   preview=job.preview)
            if not written:  # another rank writes this volume
                continue
            if csv is not None:
                csvs[index] = csv.read_text(encoding="utf-8") if collection else ""
            if statistics:
                source = job.case.source
                found[job.case.output_name] = {"input": [str(s) for s in source] if isinstance(source, list)
                                               else str(source), "mask": str(job.target.mask),
                                               **written.pop("statistics")}
            report(f"wrote {', '.join(str(p) for key, p in written.items() if key != 'rle_csv' or not collection)}")
        if info.enabled and collection:  # rank 0 writes what every rank found
            parts = gather_objects((csvs, found), info)
            csvs = {k: v for part, _ in parts for k, v in part.items()}
            found = {k: v for _, part in parts for k, v in part.items()}
        if info.enabled and not info.is_main:
            return
        if rle_csv and collection:  # one submission CSV: the header once, then every volume's rows in order
            with atomic_write(rle_csv) as staged, open(staged, "w", newline="", encoding="utf-8") as out:
                for k, index in enumerate(sorted(csvs)):
                    lines = csvs[index].splitlines(keepends=True)
                    out.writelines(lines if k == 0 else lines[1:])
            report(f"wrote {rle_csv}")
    if statistics:
        if collection:  # in the cases' order, whichever rank predicted them
            order = [job.case.output_name for job in jobs]
            found = {name: found[name] for name in order if name in found}
        document = {"cases": found} if collection else next(iter(found.values()))
        with atomic_write(statistics) as staged:
            staged.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        report(f"wrote {statistics}")
