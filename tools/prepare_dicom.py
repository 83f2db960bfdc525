#!/usr/bin/env python
"""DICOM folder tree -> NIfTI volumes in HU + manifest.csv + series_report.csv.

    python -m tools.prepare_dicom --input /data/dicom --output /data/ct [--criteria FILE] [--workers N]

Writes, under OUTPUT:
    images/<id>.nii.gz   int16 HU on an orthogonal grid (gantry tilt, uneven spacing and slice
                         thickness changing part-way resampled onto one uniform spacing),
                         voxel axes closest to RAS, affine voxel -> RAS world mm
    manifest.csv         img_path (relative to OUTPUT), id, patient_id, study_id, series_id
    series_report.csv    every series: kept / dropped / error, why, and its acquisition figures
    .salt                key of the pseudonyms (absent when given with --salt); keep it private
    .salt_check          detects a rerun with another key
All ids are keyed hashes of the DICOM UIDs / PatientID; no name, birth date, UID, PatientID or
input path is written. Reruns skip series already done (resumable after an interruption);
series that failed with status 'error' are retried.
"""
from __future__ import annotations

import argparse
import csv
import os
import secrets
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data.dicom import (
    DEFAULT_CRITERIA,
    Criteria,
    DicomError,
    SeriesGeometry,
    SliceHeader,
    analyse_geometry,
    describe_drops,
    group_series,
    iter_files,
    load_criteria,
    load_hu,
    pseudonym,
    read_header,
    resample_to_grid,
    select_slices,
)
from engine.cli import run_cli

# Bump when the conversion changes: reruns then redo every series. 2: gap rule on uncovered distance,
# thickness changing part-way resampled, tilted slices interpolated along their normal.
PIPELINE_VERSION = "2"
MANIFEST_COLUMNS = ["img_path", "id", "patient_id", "study_id", "series_id"]
REPORT_COLUMNS = [
    "id", "status", "reason", "notes", "patient_id", "study_id", "series_id",
    "modality", "study_description", "series_description", "body_part", "kvp", "kernel",
    "thickness_min", "thickness_max", "n_files", "n_slices", "dropped_slices", "slice_spacing", "max_gap",
    "max_uncovered", "missing_slices", "tilt_deg", "shape", "spacing", "img_path", "seconds", "settings",
]
HEADER_CHUNK = 256  # files per header-reading task


@dataclass
class SeriesJob:
    """One series to convert (pickled to a worker process)."""

    id: str
    patient_id: str
    study_id: str
    slices: list[SliceHeader]
    criteria: Criteria
    output: str
    settings: str
    slice_spacing: float | None = None  # --spacing-mm (None: each series' own)


def _fmt(x: float, digits: int = 3) -> str:
    text = f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def write_nifti(path: Path, hu: np.ndarray, affine: np.ndarray) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Reorient to the closest RAS axes and write int16 HU atomically (tmp file + os.replace).

    Args:
        path: destination ``.nii.gz``.
        hu: float HU ``[X, Y, Z]``.
        affine: (4, 4) voxel -> RAS mm.
    Returns:
        (shape, voxel spacing in mm) as written.
    """
    rounded = np.rint(hu)
    np.clip(rounded, -32768, 32767, out=rounded)
    ornt = nib.orientations.io_orientation(affine)
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, hu.shape)
    data = nib.orientations.apply_orientation(rounded.astype(np.int16), ornt)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return data.shape, tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _scrub(message: str, job: SeriesJob) -> str:
    """Remove input paths (folder names often hold patient names) from a message."""
    for folder in sorted({os.path.dirname(h.path) for h in job.slices}, key=len, reverse=True):
        message = message.replace(folder, "<input>")
    return message


def process_series(job: SeriesJob) -> dict[str, str]:
    """Select, check and convert one series; returns its report row (never raises)."""
    t0 = time.perf_counter()
    row = {c: "" for c in REPORT_COLUMNS}
    row.update(id=job.id, series_id=job.id, patient_id=job.patient_id, study_id=job.study_id,
               n_files=str(len(job.slices)), settings=job.settings, status="dropped")
    first = job.slices[0]
    row.update(modality=first.modality, study_description=first.study_description,
               series_description=first.series_description, body_part=first.body_part,
               kvp=first.kvp, kernel=first.kernel)
    stage = "header"
    try:
        kept, dropped = select_slices(job.slices)
        row.update(dropped_slices=describe_drops(dropped), n_slices=str(len(kept)))
        if not kept:
            row["reason"] = f"no usable slices ({describe_drops(dropped)})"
            return row
        first = kept[0]
        row.update(modality=first.modality, study_description=first.study_description,
                   series_description=first.series_description, body_part=first.body_part,
                   kvp=first.kvp, kernel=first.kernel)
        thick = [h.thickness for h in kept if h.thickness is not None and h.thickness > 0]
        if thick:
            row.update(thickness_min=_fmt(min(thick)), thickness_max=_fmt(max(thick)))
        reason = job.criteria.check_header(first)
        if reason is None and len(kept) < job.criteria.min_slices:
            reason = f"{len(kept)} slices < minimum {job.criteria.min_slices}"
        if reason:
            row["reason"] = reason
            return row
        geom = analyse_geometry(kept, job.id)
        row.update(slice_spacing=_fmt(geom.median_spacing), max_gap=_fmt(geom.max_gap),
                   missing_slices=str(geom.missing_slices), tilt_deg=_fmt(geom.tilt_deg, 2),
                   max_uncovered="" if geom.max_uncovered is None else _fmt(geom.max_uncovered))
        reason = job.criteria.check_geometry(geom)
        if reason:
            row["reason"] = reason
            return row
        stage = "pixels"
        hu, affine = resample_to_grid(load_hu(geom, job.id), geom, slice_spacing=job.slice_spacing)
        rel = f"images/{job.id}.nii.gz"
        shape, spacing = write_nifti(Path(job.output) / rel, hu, affine)
        row.update(status="kept", notes="; ".join(conversion_notes(geom, dropped)), img_path=rel,
                   shape="x".join(map(str, shape)), spacing="x".join(_fmt(s) for s in spacing))
    except DicomError as e:
        row.update(status="dropped" if stage == "header" else "error", reason=_scrub(e.reason, job))
    except Exception as e:  # noqa: BLE001 - one bad series must not stop the others
        row.update(status="error", reason=_scrub(f"{type(e).__name__}: {e}", job)[:500])
    finally:
        row["seconds"] = _fmt(time.perf_counter() - t0, 2)
    return row


def conversion_notes(geom: SeriesGeometry, dropped: Counter) -> list[str]:
    """What was done to a kept series beyond reading it, in words (the report's ``notes``)."""
    notes = []
    if dropped.get("off-orientation"):
        notes.append(f"{dropped['off-orientation']} slice(s) of another orientation or matrix left out")
    if geom.sheared:
        notes.append(f"gantry tilt {geom.tilt_deg:.1f} deg resampled")
    if geom.mixed_thickness:
        notes.append(f"slice thickness {_fmt(geom.thickness)}-{_fmt(geom.max_thickness)} mm resampled "
                     f"to one spacing")
    elif geom.uneven:
        notes.append("uneven spacing resampled")
    if geom.missing_slices:
        uncovered = "" if geom.max_uncovered is None else f" (largest uncovered gap {_fmt(geom.max_uncovered)} mm)"
        notes.append(f"{geom.missing_slices} missing slice(s) interpolated{uncovered}")
    return notes


def _read_headers(paths: list[str]) -> list[SliceHeader | None]:
    return [read_header(p) for p in paths]


def scan_headers(files: list[str], workers: int) -> Iterator[SliceHeader | None]:
    """Read every file's header (in parallel when workers > 1), with a progress bar."""
    chunks = [files[i:i + HEADER_CHUNK] for i in range(0, len(files), HEADER_CHUNK)]
    with tqdm(total=len(files), unit="file", desc="headers", disable=None) as bar:
        if workers <= 1 or len(chunks) <= 1:
            results: Iterable[list[SliceHeader | None]] = map(_read_headers, chunks)
            for chunk in results:
                bar.update(len(chunk))
                yield from chunk
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for chunk in pool.map(_read_headers, chunks):
                bar.update(len(chunk))
                yield from chunk


def run_jobs(jobs: list[SeriesJob], workers: int) -> Iterator[dict[str, str]]:
    """Process series (in parallel when workers > 1) and yield their report rows as they finish."""
    with tqdm(total=len(jobs), unit="series", desc="series", disable=None) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield process_series(job)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(process_series, job): job for job in jobs}
            for fut in as_completed(futures):
                try:
                    row = fut.result()
                except BrokenProcessPool as e:  # a worker died (e.g. out of memory)
                    job = futures[fut]
                    row = {c: "" for c in REPORT_COLUMNS}
                    row.update(id=job.id, series_id=job.id, patient_id=job.patient_id, study_id=job.study_id,
                               status="error", reason=f"worker process died: {e}", settings=job.settings)
                yield row
                bar.update()


def load_salt(output: Path, salt: str | None) -> str:
    """The pseudonym key: --salt if given, else OUTPUT/.salt (created with a random key).

    OUTPUT/.salt_check (a keyed hash of a constant, which does not reveal the key) makes a rerun
    with another key fail instead of mixing two id systems in one folder.
    """
    path, check = output / ".salt", output / ".salt_check"
    if not salt:
        salt = path.read_text().strip() if path.exists() else ""
        if not salt and check.exists():
            raise ValueError(f"{output} was written with --salt; pass the same --salt again")
        if not salt:
            salt = secrets.token_hex(32)
            tmp = path.with_name(f".salt.tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(salt + "\n")
            os.replace(tmp, path)
    token = pseudonym(salt, "check", "salt")
    if check.exists():
        if check.read_text().strip() != token:
            raise ValueError(f"{output} was written with another salt: ids would not match the earlier "
                             f"run; use another --output or the same salt")
    else:
        check.write_text(token + "\n")
    return salt


def read_report(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier series_report.csv by id (last row wins; torn or foreign rows ignored)."""
    if not path.exists():
        return {}
    rows: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != REPORT_COLUMNS:
            print(f"warning: {path} has other columns; it is rewritten", file=sys.stderr)
            return {}
        for row in reader:
            if None in row or any(v is None for v in row.values()) or row["status"] not in ("kept", "dropped", "error"):
                continue  # torn last line of an interrupted run
            rows[row["id"]] = row
    return rows


def write_csv_atomic(path: Path, columns: list[str], rows: Iterable[dict[str, str]]) -> None:
    """Write a CSV through a temporary file and os.replace (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def prepare_dicom(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    criteria: Criteria,
    workers: int = 1,
    salt: str | None = None,
    slice_spacing: float | None = None,
) -> dict[str, int]:
    """Convert every selected series under ``input_dir``; see the module docstring for outputs.

    Args:
        input_dir: folder tree of DICOM files (any layout; other files are ignored).
        output_dir: output folder (created; reruns resume in it).
        criteria: selection rules.
        workers: processes for header reading and conversion (1 = in this process).
        salt: pseudonym key; default: OUTPUT/.salt, created on the first run.
        slice_spacing: spacing in mm along the slice (or, with tilt, table) axis of every output
            grid; None: each series' own (median, or the finest where the thickness changes).
    Returns:
        Counts: files, not_dicom, series, kept, dropped, error, reused, processed.
    """
    inp, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if slice_spacing is not None and not slice_spacing > 0:
        raise ValueError(f"--spacing-mm must be > 0, got {slice_spacing}")
    if not inp.is_dir():
        raise FileNotFoundError(f"{inp}: input folder not found")
    (out / "images").mkdir(parents=True, exist_ok=True)
    for stale in (out / "images").glob(".tmp-*"):  # left by an interrupted run
        stale.unlink()
    key = load_salt(out, salt)
    settings = f"v{PIPELINE_VERSION}-{criteria.fingerprint()}"
    if slice_spacing is not None:
        settings += f"-z{_fmt(slice_spacing, 4)}"

    files = list(iter_files(inp, exclude=[out]))
    headers = list(scan_headers(files, workers))
    series = group_series(headers)
    jobs = []
    for uid, slices in series.items():
        first = slices[0]
        patient = first.patient_key or f"study:{first.study_uid}"  # no PatientID: one group per study
        jobs.append(SeriesJob(id=pseudonym(key, "series", uid), patient_id=pseudonym(key, "patient", patient),
                              study_id=pseudonym(key, "study", first.study_uid), slices=slices,
                              criteria=criteria, output=str(out), settings=settings,
                              slice_spacing=slice_spacing))

    report_path = out / "series_report.csv"
    rows = read_report(report_path)

    def done(job: SeriesJob) -> bool:
        row = rows.get(job.id)
        return (row is not None and row["settings"] == settings and row["n_files"] == str(len(job.slices))
                and (row["status"] == "dropped"
                     or (row["status"] == "kept" and (out / row["img_path"]).is_file())))

    todo = [job for job in jobs if not done(job)]
    for job in todo:
        rows.pop(job.id, None)
    write_csv_atomic(report_path, REPORT_COLUMNS, rows.values())  # the rows kept from earlier runs
    with open(report_path, "a", newline="", encoding="utf-8") as f:  # append as series finish
        writer = csv.DictWriter(f, REPORT_COLUMNS)
        for row in run_jobs(todo, workers):
            writer.writerow(row)
            f.flush()
            rows[row["id"]] = row
    ordered = [rows[k] for k in sorted(rows)]
    write_csv_atomic(report_path, REPORT_COLUMNS, ordered)
    write_csv_atomic(out / "manifest.csv", MANIFEST_COLUMNS,
                     (r for r in ordered if r["status"] == "kept" and (out / r["img_path"]).is_file()))
    this_run = [rows[j.id] for j in jobs]
    return {
        "files": len(files),
        "not_dicom": sum(h is None for h in headers),
        "series": len(jobs),
        "kept": sum(r["status"] == "kept" for r in this_run),
        "dropped": sum(r["status"] == "dropped" for r in this_run),
        "error": sum(r["status"] == "error" for r in this_run),
        "reused": len(jobs) - len(todo),
        "processed": len(todo),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder tree of DICOM files (any layout)")
    p.add_argument("--output", required=True, help="output folder (reruns resume here)")
    p.add_argument("--criteria", default=str(DEFAULT_CRITERIA),
                   help="CSV of allowed (StudyDescription, KVP, ConvolutionKernel, ...) patterns; "
                        "'' keeps every description/kVp/kernel (default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel processes (default: %(default)s)")
    p.add_argument("--salt", default=None, help="pseudonym key (default: OUTPUT/.salt, created once)")
    p.add_argument("--modality", nargs="+", default=["CT"], help="allowed Modality values")
    p.add_argument("--min-thickness", type=float, default=0.5,
                   help="min SliceThickness in mm (of the thinnest slices when it changes within a series)")
    p.add_argument("--max-thickness", type=float, default=5.0,
                   help="max SliceThickness in mm (of the thinnest slices when it changes within a series)")
    p.add_argument("--min-slices", type=int, default=20, help="fewest usable slices")
    p.add_argument("--max-gap-mm", type=float, default=5.0,
                   help="drop a series whose slices leave more than this uncovered between neighbours "
                        "(spacing - mean of the two SliceThickness values; without SliceThickness: the "
                        "spacing, never below 1.5x the median); smaller gaps are interpolated")
    p.add_argument("--spacing-mm", type=float, default=None,
                   help="slice spacing of every output grid along the slice (with tilt: table) axis; "
                        "default: each series' own, the finest where the thickness changes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be >= 1, got {args.workers}")
    try:
        criteria = Criteria(
            patterns=load_criteria(args.criteria) if args.criteria else [],
            modalities=tuple(args.modality), min_thickness=args.min_thickness,
            max_thickness=args.max_thickness, min_slices=args.min_slices, max_gap_mm=args.max_gap_mm,
        )
        t0 = time.perf_counter()
        counts = prepare_dicom(args.input, args.output, criteria, workers=args.workers, salt=args.salt,
                               slice_spacing=args.spacing_mm)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{counts['series']} series in {counts['files']} files ({counts['not_dicom']} not DICOM): "
          f"kept {counts['kept']}, dropped {counts['dropped']}, error {counts['error']}; "
          f"processed {counts['processed']}, reused {counts['reused']} in {time.perf_counter() - t0:.1f} s "
          f"-> {Path(args.output) / 'manifest.csv'}")
    return 0


def cli() -> int:
    """The ``headct-prepare-dicom`` command: :func:`main`, a config or input error as one line (engine/cli.py)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
