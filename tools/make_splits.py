"""Patient-level train/val/test manifests for CQ500 and RSNA intracranial hemorrhage.

Examples (see datasets/README.md for the whole pipeline)::

    # CQ500: reads.csv holds three readers' labels per patient; labels = majority vote
    python -m tools.make_splits --dataset cq500 --labels data/cq500/reads.csv \\
        --images data/cq500/nifti --root data/cq500 --out data/cq500/splits

    # RSNA: per-slice labels -> series (any slice positive), patients from the DICOM headers
    python -m tools.make_splits --dataset rsna --labels data/rsna/stage_2_train.csv \\
        --rsna-metadata data/rsna/metadata.csv --image-map data/rsna/manifest.csv \\
        --root data/rsna --out data/rsna/splits

Output: ``OUT/train.csv``, ``OUT/val.csv``, ``OUT/test.csv`` with columns ``img_path`` (relative
to ``--root``), ``id``, ``patient_id``, dataset keys (CQ500 ``category``; RSNA ``study_uid`` and
``series_uid``, or the pseudonymised ``series_id``/``study_id`` of a tools/prepare_dicom.py
manifest, whose ``.salt`` key is picked up beside it) and 0/1 label columns (blank = unknown).
No patient is in two splits; patients are stratified by the ``--stratify`` label (default ICH: a
patient counts positive when any of its scans is).

Patients are assigned by :func:`data.manifest.split_groups` (whole patients, largest-remainder
allocation of patients per stratum).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence


from data.io import BadInputError
from data.manifest import split_groups
from engine.cli import run_cli

#: label columns written first, in this order, when present (the phantom's names)
PREFERRED_ORDER = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "Fracture", "CalvarialFracture", "OtherFracture",
                   "MassEffect", "MidlineShift", "ChronicBleed", "BleedLocation-Left", "BleedLocation-Right")
#: RSNA subtype -> manifest label column ("any" hemorrhage is ICH)
RSNA_SUBTYPES = {"any": "ICH", "intraparenchymal": "IPH", "intraventricular": "IVH", "subdural": "SDH",
                 "epidural": "EDH", "subarachnoid": "SAH"}
RSNA_LABELS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH")
_CQ500_NAME = re.compile(r"CQ500[-_ ]?CT[-_ ]?(\d+)", re.IGNORECASE)
_READER_COL = re.compile(r"^R(\d+):(.+)$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# accepted spellings of key columns (first present wins)
SOP_COLUMNS = ("SOPInstanceUID", "ID", "sop_uid")
# (prepare_dicom.py's manifest.csv has series_id / study_id / patient_id, pseudonymised)
STUDY_COLUMNS = ("study_uid", "StudyInstanceUID", "study_instance_uid", "study_id")
SERIES_COLUMNS = ("series_uid", "SeriesInstanceUID", "series_instance_uid", "series_id")
PATIENT_COLUMNS = ("patient_id", "PatientID", "name")


@dataclass
class ScanRow:
    """One manifest row before splitting."""
    img_path: str  # absolute path
    id: str
    patient_id: str
    labels: dict[str, float]  # label -> 0/1/NaN
    extra: dict[str, str] = field(default_factory=dict)  # dataset columns (category, study_uid, ...)


# ---------------------------------------------------------------------------------------------
# CSV helpers
def _read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.isfile(path):
        raise BadInputError(path, "file does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise BadInputError(path, "empty CSV (no header)")
        header = [h.strip() for h in reader.fieldnames]
        reader.fieldnames = header
        rows = list(reader)
    return header, rows


def _pick(header: Sequence[str], options: Sequence[str], path: str, what: str, required: bool = True) -> Optional[str]:
    for name in options:
        if name in header:
            return name
    if required:
        raise BadInputError(path, f"no {what} column; expected one of {list(options)}, found {list(header)}")
    return None


def _parse_01(value: str, path: str, where: str) -> float:
    v = (value or "").strip()
    if v == "":
        return math.nan
    try:
        x = float(v)
    except ValueError:
        raise BadInputError(path, f"{where}: label value {value!r} is not 0, 1 or blank") from None
    if x not in (0.0, 1.0):
        raise BadInputError(path, f"{where}: label value {value!r} is not 0, 1 or blank")
    return x


def _strip_nifti(name: str) -> str:
    for s in NIFTI_SUFFIXES:
        if name.lower().endswith(s):
            return name[:-len(s)]
    return name


def _strip_id_prefix(uid: str) -> str:
    uid = uid.strip()
    return uid[3:] if uid.startswith("ID_") else uid


def cq500_patient(text: str) -> Optional[str]:
    """Canonical CQ500 patient name ``CQ500-CT-<n>`` found in ``text`` (a name, folder or path), or None."""
    m = _CQ500_NAME.search(text)
    return f"CQ500-CT-{int(m.group(1))}" if m else None


# ---------------------------------------------------------------------------------------------
# labels
def majority_vote(votes: Sequence[float]) -> float:
    """1 when more than half of the non-blank reads are 1, 0 when fewer, NaN on a tie or no read.

    Args:
        votes: per-reader values 0/1/NaN.
    """
    known = [v for v in votes if not math.isnan(v)]
    pos = sum(known)
    if not known or 2 * pos == len(known):
        return math.nan
    return 1.0 if 2 * pos > len(known) else 0.0


def cq500_labels(reads_csv: str) -> tuple[dict[str, dict[str, float]], dict[str, str], list[str]]:
    """Majority-vote labels of the CQ500 ``reads.csv`` (columns name, Category, R1:ICH, ... R3:MidlineShift).

    Args:
        reads_csv: path of the reads CSV distributed with CQ500.

    Returns:
        ``(labels, category, label_names)``: ``{patient: {label: 0/1/NaN}}``, ``{patient: Category}``
        (empty string when absent) and the label names in output order. Patients are keyed by
        :func:`cq500_patient` of the ``name`` column.
    """
    header, rows = _read_csv(reads_csv)
    if "name" not in header:
        raise BadInputError(reads_csv, f"no 'name' column; found {header[:6]}...")
    readers: dict[str, list[str]] = defaultdict(list)  # label -> its reader columns
    for col in header:
        m = _READER_COL.match(col)
        if m:
            readers[m.group(2)].append(col)
    if not readers:
        raise BadInputError(reads_csv, "no reader columns like 'R1:ICH'")
    names = [n for n in PREFERRED_ORDER if n in readers] + sorted(n for n in readers if n not in PREFERRED_ORDER)
    labels: dict[str, dict[str, float]] = {}
    category: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        patient = cq500_patient(row["name"] or "")
        if patient is None:
            raise BadInputError(reads_csv, f"line {i}: name {row['name']!r} is not a CQ500 name like CQ500-CT-12")
        if patient in labels:
            raise BadInputError(reads_csv, f"line {i}: patient {row['name']!r} appears twice")
        labels[patient] = {n: majority_vote([_parse_01(row[c], reads_csv, f"line {i}, {c}") for c in readers[n]])
                           for n in names}
        category[patient] = (row.get("Category") or "").strip()
    return labels, category, names


def rsna_labels(labels_csv: str, metadata_csv: str, level: str
                ) -> tuple[dict[str, dict[str, float]], dict[str, str], dict[str, tuple[str, str]]]:
    """RSNA per-slice labels -> per-series or per-study labels (positive when any slice is).

    Args:
        labels_csv: ``stage_2_train.csv`` (columns ID like ``ID_12cadc6af_epidural``, Label 0/1).
        metadata_csv: one row per slice with SOPInstanceUID (or ID), StudyInstanceUID,
            SeriesInstanceUID, PatientID (from the DICOM headers; see datasets/README.md).
        level: ``"series"`` or ``"study"``: the unit of the image map.

    Returns:
        ``(labels, patient, uids)``: ``{key: {label: 0/1/NaN}}``, ``{key: PatientID}`` and
        ``{key: (study_uid, series_uid)}`` (series_uid '' at study level), keyed by the series or
        study UID without a leading ``ID_``.
    """
    if level not in ("series", "study"):
        raise ValueError(f"level = {level!r}; expected 'series' or 'study'")
    header, meta = _read_csv(metadata_csv)
    c_sop = _pick(header, SOP_COLUMNS, metadata_csv, "SOPInstanceUID")
    c_study = _pick(header, ("StudyInstanceUID", "study_uid"), metadata_csv, "StudyInstanceUID")
    c_series = _pick(header, ("SeriesInstanceUID", "series_uid"), metadata_csv, "SeriesInstanceUID",
                     required=level == "series")
    c_pat = _pick(header, ("PatientID", "patient_id"), metadata_csv, "PatientID")
    sop_to_key: dict[str, str] = {}
    patient: dict[str, str] = {}
    uids: dict[str, tuple[str, str]] = {}
    for i, row in enumerate(meta, start=2):
        study = _strip_id_prefix(row[c_study])
        series = _strip_id_prefix(row[c_series]) if c_series else ""
        key = series if level == "series" else study
        pid = row[c_pat].strip()
        if not key or not pid:
            raise BadInputError(metadata_csv, f"line {i}: empty {level} UID or PatientID")
        if patient.setdefault(key, pid) != pid:
            raise BadInputError(metadata_csv, f"line {i}: {level} {key} belongs to patients {patient[key]} and {pid}")
        uids[key] = (study, series)
        sop_to_key[_strip_id_prefix(row[c_sop])] = key
    labels: dict[str, dict[str, float]] = {}
    unmapped: set[str] = set()
    if not os.path.isfile(labels_csv):
        raise BadInputError(labels_csv, "file does not exist")
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        head = [h.strip() for h in next(reader, [])]
        if head[:2] != ["ID", "Label"]:
            raise BadInputError(labels_csv, f"header {head}; expected ID,Label (RSNA stage_2_train.csv)")
        for i, row in enumerate(reader, start=2):
            if not row:
                continue
            sop, _, subtype = row[0].rpartition("_")
            name = RSNA_SUBTYPES.get(subtype)
            if name is None or not sop:
                raise BadInputError(labels_csv, f"line {i}: ID {row[0]!r} does not end in one of "
                                                f"{sorted(RSNA_SUBTYPES)}")
            key = sop_to_key.get(_strip_id_prefix(sop))
            if key is None:
                unmapped.add(sop)
                continue
            value = _parse_01(row[1], labels_csv, f"line {i}")
            slot = labels.setdefault(key, {n: math.nan for n in RSNA_LABELS})
            if not math.isnan(value):  # any slice positive -> positive (max; duplicates are harmless)
                slot[name] = value if math.isnan(slot[name]) else max(slot[name], value)
    if unmapped:
        print(f"warning: {len(unmapped)} labelled images of {labels_csv} are not in {metadata_csv} "
              f"(e.g. {sorted(unmapped)[:3]}); their labels are not used", file=sys.stderr)
    if not labels:
        raise BadInputError(labels_csv, f"no labelled image maps to a {level} of {metadata_csv}")
    return labels, patient, uids


# ---------------------------------------------------------------------------------------------
# images
def find_nifti(images_dir: str) -> list[str]:
    """Absolute paths of every ``.nii``/``.nii.gz`` under ``images_dir``, sorted."""
    if not os.path.isdir(images_dir):
        raise BadInputError(images_dir, "image folder does not exist")
    out = []
    for folder, _, files in os.walk(images_dir):
        out += [os.path.abspath(os.path.join(folder, f)) for f in files if f.lower().endswith(NIFTI_SUFFIXES)]
    if not out:
        raise BadInputError(images_dir, "no .nii or .nii.gz file below this folder")
    return sorted(out)


def read_image_map(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Read an image map (e.g. tools/prepare_dicom.py's manifest.csv); img_path made absolute.

    Relative ``img_path`` entries are resolved against the map's folder.
    """
    header, rows = _read_csv(path)
    if "img_path" not in header:
        raise BadInputError(path, f"no img_path column; found {header}")
    folder = os.path.dirname(os.path.abspath(path))
    missing = []
    for i, r in enumerate(rows, start=2):
        if not (r["img_path"] or "").strip():
            raise BadInputError(path, f"line {i}: empty img_path")
        r["img_path"] = os.path.normpath(os.path.join(folder, r["img_path"].strip()))
        if not os.path.exists(r["img_path"]):
            missing.append(r["img_path"])
    if missing:  # not fatal: splits can be made where the labels are and used where the images are
        print(f"warning: {len(missing)} img_path entries of {path} do not exist on this machine, e.g. "
              f"{missing[:3]}", file=sys.stderr)
    return header, rows


def _default_id(abs_path: str, base: str) -> str:
    rel = os.path.relpath(abs_path, base)
    return _strip_nifti(rel).replace(os.sep, "/")


def _pseudonyms(salt: str, kind: str, keys: Iterable[str], variants) -> dict[str, str]:
    """``{data.dicom.pseudonym(salt, kind, v): key}`` for every spelling ``v`` in ``variants(key)``."""
    from data.dicom import pseudonym  # only needed with --pseudonym-salt
    return {pseudonym(salt, kind, v): k for k in keys for v in variants(k)}


def cq500_rows(labels: dict[str, dict[str, float]], category: dict[str, str], images_dir: str = "",
               image_map: str = "", salt: str = "") -> list[ScanRow]:
    """One row per CQ500 image (several series per patient share the patient's labels).

    The patient is recognised by the pattern ``CQ500-CT-<n>`` (separators optional, as in the
    folder names ``CQ500CT12 CQ500CT12``): with ``images_dir`` in the file's path; with
    ``image_map`` in the patient_id/PatientID/name column, else in any other column (img_path,
    a source folder...). With ``salt``, a patient column holding
    ``data.dicom.pseudonym(salt, "patient", "CQ500-CT-<n>")`` (or of ``CQ500CT<n>``) matches too.
    """
    rows: list[ScanRow] = []
    unmatched: list[str] = []
    items: list[tuple[str, str, Optional[str], Optional[str]]] = []  # (path, id, patient, pseudonym written)
    if images_dir:
        base = os.path.abspath(images_dir)
        items = [(p, _default_id(p, base), cq500_patient(os.path.relpath(p, base)), None)
                 for p in find_nifti(images_dir)]
    else:
        header, mrows = read_image_map(image_map)
        c_pat = _pick(header, PATIENT_COLUMNS, image_map, "patient", required=False)
        hashed = _pseudonyms(salt, "patient", labels, lambda k: (k, k.replace("-", ""))) if salt else {}
        base = os.path.dirname(os.path.abspath(image_map))
        for r in mrows:
            cells = ([r[c_pat]] if c_pat else []) + [v for c, v in r.items() if c != c_pat]
            pseudo = (r[c_pat] or "").strip() if c_pat else ""
            patient = hashed.get(pseudo) if pseudo and hashed else None
            written = pseudo if patient else None  # a pseudonymised map keeps its pseudonyms
            patient = patient or next((cq500_patient(v) for v in cells if v and cq500_patient(v)), None)
            items.append((r["img_path"], (r.get("id") or "").strip() or _default_id(r["img_path"], base), patient,
                          written))
    for path, sid, patient, written in items:
        if patient is None or patient not in labels:
            unmatched.append(path)
            continue
        rows.append(ScanRow(path, sid, written or patient, dict(labels[patient]),
                            {"category": category.get(patient, "")}))
    _report_unmatched(unmatched, "no CQ500 patient with labels matches them")
    return rows


def rsna_rows(labels: dict[str, dict[str, float]], patient: dict[str, str], uids: dict[str, tuple[str, str]],
              level: str, images_dir: str = "", image_map: str = "", salt: str = "") -> list[ScanRow]:
    """One row per RSNA volume; the volume is matched to its series (or study) UID.

    With ``images_dir`` the file name is the UID (``<SeriesInstanceUID>.nii.gz``, leading ``ID_``
    optional); with ``image_map`` its series_uid/SeriesInstanceUID (or study_uid/StudyInstanceUID
    at study level) column, holding the UID or, with ``salt``, its pseudonym
    ``data.dicom.pseudonym(salt, "series" | "study", UID)`` as written by tools/prepare_dicom.py.
    """
    rows: list[ScanRow] = []
    unmatched: list[str] = []
    if images_dir:
        base = os.path.abspath(images_dir)
        items = [(p, _default_id(p, base), _strip_nifti(os.path.basename(p))) for p in find_nifti(images_dir)]
    else:
        header, mrows = read_image_map(image_map)
        opts = SERIES_COLUMNS if level == "series" else STUDY_COLUMNS
        c_key = _pick(header, opts, image_map, f"{level} UID")
        items = [(r["img_path"], (r.get("id") or "").strip() or r[c_key].strip(), r[c_key].strip()) for r in mrows]
    hashed = _pseudonyms(salt, level, labels, lambda k: (k, "ID_" + k)) if salt else {}
    if salt:  # write pseudonyms only: the patient hashed like prepare_dicom does, the UID as in the map
        from data.dicom import pseudonym
    for path, sid, raw in items:
        key = hashed.get(raw) or _strip_id_prefix(raw)
        if key not in labels:
            unmatched.append(path)
            continue
        if salt:
            rows.append(ScanRow(path, sid, pseudonym(salt, "patient", patient[key]), dict(labels[key]),
                                {f"{level}_id": raw}))
        else:
            study, series = uids[key]
            rows.append(ScanRow(path, sid, patient[key], dict(labels[key]), {"study_uid": study, "series_uid": series}))
    _report_unmatched(unmatched, f"their {level} UID has no labelled slice")
    return rows


def _report_unmatched(unmatched: list[str], why: str) -> None:
    if unmatched:
        print(f"warning: {len(unmatched)} image(s) left out because {why}, e.g. {unmatched[:3]}", file=sys.stderr)


def rsna_level(image_map: str) -> str:
    """'series' when the image map has a series UID column, else 'study' (folder input: 'series')."""
    if not image_map:
        return "series"
    header, _ = _read_csv(image_map)
    if _pick(header, SERIES_COLUMNS, image_map, "series", required=False):
        return "series"
    _pick(header, STUDY_COLUMNS, image_map, "series or study UID")
    return "study"


# ---------------------------------------------------------------------------------------------
# splitting
def patient_strata(rows: Sequence[ScanRow], label: str) -> dict[str, str]:
    """Patient -> '1' when any of its scans is positive for ``label``, '0' when all known are 0, 'blank'."""
    agg: dict[str, float] = {}
    for r in rows:
        v = r.labels.get(label, math.nan)
        cur = agg.get(r.patient_id, math.nan)
        agg[r.patient_id] = v if math.isnan(cur) else (cur if math.isnan(v) else max(cur, v))
    return {p: "blank" if math.isnan(v) else str(int(v)) for p, v in agg.items()}


# ---------------------------------------------------------------------------------------------
# output
def write_manifest(path: str, rows: Sequence[ScanRow], label_names: Sequence[str], root: str) -> None:
    """Write one split's manifest atomically; img_path relative to ``root``, blank for NaN labels."""
    extra = [k for k in (rows[0].extra if rows else {})]
    header = ["img_path", "id", "patient_id"] + extra + list(label_names)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            rel = os.path.relpath(r.img_path, root).replace(os.sep, "/")
            lab = ["" if math.isnan(r.labels[n]) else str(int(r.labels[n])) for n in label_names]
            w.writerow([rel, r.id, r.patient_id] + [r.extra.get(k, "") for k in extra] + lab)
    os.replace(tmp, path)


def count_table(split_rows: dict[str, list[ScanRow]], label_names: Sequence[str]) -> str:
    """Text table: per split scans, patients and per label positives/known (blanks excluded)."""
    header = ["split", "scans", "patients"] + list(label_names)
    lines = []
    for split, rows in split_rows.items():
        cells = [split, str(len(rows)), str(len({r.patient_id for r in rows}))]
        for n in label_names:
            known = [r.labels[n] for r in rows if not math.isnan(r.labels[n])]
            cells.append(f"{int(sum(known))}/{len(known)}")
        lines.append(cells)
    widths = [max(len(c[i]) for c in [header] + lines) for i in range(len(header))]

    def fmt(c: list[str]) -> str:
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))

    return "\n".join([fmt(header)] + [fmt(c) for c in lines] + ["(label cells: positives/labelled scans)"])


def resolve_salt(value: str, image_map: str) -> str:
    """The pseudonym key: ``value`` itself, or the content of the file it names; when empty, the
    ``.salt`` file that tools/prepare_dicom.py keeps beside its manifest.csv (else '' = none)."""
    if value:
        return open(value).read().strip() if os.path.isfile(value) else value
    beside = os.path.join(os.path.dirname(os.path.abspath(image_map)), ".salt") if image_map else ""
    if beside and os.path.isfile(beside):
        print(f"using the pseudonym key in {beside} to match the image map's ids", file=sys.stderr)
        with open(beside) as f:
            return f.read().strip()
    return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Patient-level train/val/test manifests for CQ500 or RSNA ICH.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, choices=("cq500", "rsna"))
    p.add_argument("--labels", required=True, help="CQ500 reads.csv or RSNA stage_2_train.csv")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", default="", help="folder of NIfTI volumes (CQ500: patient name in the path; "
                                                  "RSNA: <SeriesInstanceUID>.nii.gz)")
    src.add_argument("--image-map", default="", help="CSV with img_path and the key column (CQ500: patient_id; "
                                                     "RSNA: series_uid or study_uid), e.g. prepare_dicom's "
                                                     "manifest.csv")
    p.add_argument("--rsna-metadata", default="", help="RSNA: CSV SOPInstanceUID (or ID), StudyInstanceUID, "
                                                       "SeriesInstanceUID, PatientID, one row per slice")
    p.add_argument("--out", required=True, help="folder for train.csv, val.csv, test.csv")
    p.add_argument("--root", default="", help="img_path is written relative to this folder (set DATA.ROOT to it); "
                                              "default: --images, or the image map's folder")
    p.add_argument("--val-frac", type=float, default=0.15, help="fraction of patients for validation")
    p.add_argument("--test-frac", type=float, default=0.15, help="fraction of patients for test")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed")
    p.add_argument("--stratify", default="ICH", help="label to stratify patients by ('' = none)")
    p.add_argument("--pseudonym-salt", default="", help="key (or a file holding it) tools/prepare_dicom.py "
                                                         "pseudonymised ids with; default: the .salt file beside "
                                                         "--image-map, when there is one")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, list[ScanRow]]:
    """Run the tool; returns ``{"train": rows, "val": rows, "test": rows}``."""
    args = build_parser().parse_args(argv)
    salt = resolve_salt(args.pseudonym_salt, args.image_map)
    if args.dataset == "cq500":
        labels, category, names = cq500_labels(args.labels)
        rows = cq500_rows(labels, category, args.images, args.image_map, salt)
    else:
        if not args.rsna_metadata:
            raise SystemExit("--dataset rsna needs --rsna-metadata (SOPInstanceUID -> study/series/patient; "
                             "see datasets/README.md)")
        level = rsna_level(args.image_map)
        labels, patient, uids = rsna_labels(args.labels, args.rsna_metadata, level)
        names = list(RSNA_LABELS)
        rows = rsna_rows(labels, patient, uids, level, args.images, args.image_map, salt)
    if not rows:
        raise SystemExit("no image matched a labelled patient/series; nothing written")
    seen = Counter(r.id for r in rows)
    dup = [i for i, c in seen.items() if c > 1]
    if dup:
        raise SystemExit(f"ids repeat ({dup[:3]}); give the image map a unique 'id' column")
    strata: dict[str, str] = {}
    if args.stratify:
        if args.stratify not in names:
            print(f"warning: --stratify {args.stratify} is not a label of this dataset {names}; not stratified",
                  file=sys.stderr)
        else:
            strata = patient_strata(rows, args.stratify)
    assign = split_groups((r.patient_id for r in rows), strata, args.val_frac, args.test_frac, args.seed)
    split_rows: dict[str, list[ScanRow]] = {"train": [], "val": [], "test": []}
    for r in sorted(rows, key=lambda r: (r.patient_id, r.id)):
        split_rows[assign[r.patient_id]].append(r)
    root = os.path.abspath(args.root or args.images or os.path.dirname(os.path.abspath(args.image_map)))
    os.makedirs(args.out, exist_ok=True)
    for split, srows in split_rows.items():
        write_manifest(os.path.join(args.out, f"{split}.csv"), srows, names, root)
    print(count_table(split_rows, names))
    print(f"wrote {', '.join(os.path.join(args.out, s + '.csv') for s in split_rows)}; img_path is relative to "
          f"{root}: set DATA.ROOT to it")
    return split_rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
