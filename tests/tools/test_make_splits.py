import csv
import math

import pytest

from data.io import BadInputError
from tools.make_splits import main, majority_vote

READERS_FIELDS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                  "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift"]
CQ500_HEADER = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in READERS_FIELDS]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _cq500(tmp_path, n=20):
    """reads.csv with n patients; patient i has ICH votes (1,1,0) when i is even, (1,0,0) when odd,
    Fracture (0,1,1) for i % 3 == 0; two series each under 'CQ500CT<i> CQ500CT<i>/...'."""
    rows = []
    for i in range(n):
        votes = {f: [0, 0, 0] for f in READERS_FIELDS}
        votes["ICH"] = [1, 1, 0] if i % 2 == 0 else [1, 0, 0]
        votes["SDH"] = [1, 1, 1] if i % 4 == 0 else [0, 0, 0]
        votes["Fracture"] = [0, 1, 1] if i % 3 == 0 else [0, 0, 0]
        rows.append([f"CQ500-CT-{i}", "B1" if i < n // 2 else "B2"]
                    + [votes[f][r] for r in range(3) for f in READERS_FIELDS])
    _write(tmp_path / "reads.csv", CQ500_HEADER, rows)
    images = tmp_path / "cq500" / "nifti"
    for i in range(n):
        for series in ("CT PLAIN THIN", "CT 5mm"):
            d = images / f"CQ500CT{i} CQ500CT{i}" / "Unknown Study"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{series}.nii.gz").write_bytes(b"")
    (images / "notes.txt").write_text("not an image")
    return tmp_path / "reads.csv", images


def test_majority_vote():
    assert majority_vote([1, 1, 0]) == 1 and majority_vote([1, 0, 0]) == 0
    assert majority_vote([1, math.nan, 1]) == 1
    assert math.isnan(majority_vote([1, math.nan, 0])) and math.isnan(majority_vote([math.nan] * 3))


def test_cq500_splits(tmp_path, capsys):
    reads, images = _cq500(tmp_path)
    out = tmp_path / "splits"
    main(["--dataset", "cq500", "--labels", str(reads), "--images", str(images), "--out", str(out),
          "--root", str(tmp_path / "cq500"), "--val-frac", "0.2", "--test-frac", "0.2", "--seed", "1"])
    printed = capsys.readouterr().out
    assert "patients" in printed and "set DATA.ROOT" in printed
    splits = {s: _read(out / f"{s}.csv") for s in ("train", "val", "test")}
    patients = {s: {r["patient_id"] for r in rows} for s, rows in splits.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert [len(patients[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sum(len(r) for r in splits.values()) == 40  # two series per patient, notes.txt ignored
    header = list(splits["train"][0])
    assert header[:4] == ["img_path", "id", "patient_id", "category"]
    assert header[4:11] == ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "Fracture"]
    assert {"MassEffect", "MidlineShift", "CalvarialFracture"} <= set(header)
    for rows in splits.values():
        for r in rows:
            i = int(r["patient_id"].rsplit("-", 1)[1])
            assert r["ICH"] == ("1" if i % 2 == 0 else "0")  # 2 of 3 readers -> 1, 1 of 3 -> 0
            assert r["SDH"] == ("1" if i % 4 == 0 else "0")
            assert r["Fracture"] == ("1" if i % 3 == 0 else "0")
            assert r["img_path"].startswith(f"nifti/CQ500CT{i} CQ500CT{i}/")
            assert (tmp_path / "cq500" / r["img_path"]).is_file()
    # ICH stratified: half the patients are positive, so each split holds both classes equally
    for s, n in (("train", 6), ("val", 2), ("test", 2)):
        assert len({r["patient_id"] for r in splits[s] if r["ICH"] == "1"}) == n

    # the manifests are what data/manifest.py reads
    from data.manifest import Manifest
    m = Manifest.read(out / "test.csv", root=tmp_path / "cq500", label_columns=["ICH", "Fracture"],
                      group_column="patient_id")
    assert len(m) == 8 and len(set(m.groups.tolist())) == 4


def test_cq500_image_map_and_bad_reads(tmp_path):
    reads, images = _cq500(tmp_path, n=6)
    _write(tmp_path / "manifest.csv", ["img_path", "id", "patient_id"],
           [[f"vols/s{i}.nii.gz", f"s{i}", f"CQ500CT{i // 2}"] for i in range(12)])
    out = tmp_path / "splits"
    main(["--dataset", "cq500", "--labels", str(reads), "--image-map", str(tmp_path / "manifest.csv"),
          "--out", str(out), "--val-frac", "0", "--test-frac", "0.34"])
    rows = _read(out / "train.csv") + _read(out / "test.csv")
    assert len(rows) == 12 and _read(out / "val.csv") == []
    assert {r["img_path"] for r in rows} == {f"vols/s{i}.nii.gz" for i in range(12)}  # relative to the map
    assert all(r["patient_id"] == f"CQ500-CT-{int(r['id'][1:]) // 2}" for r in rows)

    text = reads.read_text().splitlines()
    text[1] = text[1].replace(",0,", ",2,", 1)
    reads.write_text("\n".join(text))
    with pytest.raises(BadInputError, match="line 2"):
        main(["--dataset", "cq500", "--labels", str(reads), "--images", str(images), "--out", str(out)])


def _rsna(tmp_path):
    """3 patients, 4 series; P1 has two series (one with a subdural slice)."""
    series = {"S1": ("T1", "P1"), "S2": ("T2", "P1"), "S3": ("T3", "P2"), "S4": ("T4", "P3")}
    slice_pos = {("S1", 1): ["subdural"], ("S3", 0): ["epidural", "subarachnoid"], ("S3", 2): ["subarachnoid"]}
    meta, labels = [], []
    for s, (study, patient) in series.items():
        for k in range(3):
            sop = f"ID_{s}x{k}"
            meta.append([sop, f"ID_{study}", f"ID_{s}", f"ID_{patient}"])
            pos = slice_pos.get((s, k), [])
            for sub in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"):
                labels.append([f"{sop}_{sub}", int(sub in pos or (sub == "any" and bool(pos)))])
    labels.append(["ID_unknownslice_any", 1])  # not in the metadata: warned about, not used
    labels.append(labels[0])  # stage_2_train.csv has duplicate rows
    _write(tmp_path / "stage_2_train.csv", ["ID", "Label"], labels)
    _write(tmp_path / "metadata.csv", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"], meta)
    return tmp_path / "stage_2_train.csv", tmp_path / "metadata.csv"


def test_rsna_series_level_any_slice_positive(tmp_path, capsys):
    labels, meta = _rsna(tmp_path)
    images = tmp_path / "rsna"
    images.mkdir()
    for s in ("S1", "S2", "S3", "S4"):
        (images / f"ID_{s}.nii.gz").write_bytes(b"")
    out = tmp_path / "splits"
    main(["--dataset", "rsna", "--labels", str(labels), "--rsna-metadata", str(meta), "--images", str(images),
          "--out", str(out), "--val-frac", "0.34", "--test-frac", "0.33"])
    assert "1 labelled images" in capsys.readouterr().err
    rows = {r["series_uid"]: (s, r) for s in ("train", "val", "test") for r in _read(out / f"{s}.csv")}
    assert set(rows) == {"S1", "S2", "S3", "S4"}
    assert rows["S1"][0] == rows["S2"][0]  # same patient, same split
    assert {rows[k][0] for k in rows} == {"train", "val", "test"}
    r1, r2, r3, r4 = (rows[k][1] for k in ("S1", "S2", "S3", "S4"))
    assert (r1["ICH"], r1["SDH"], r1["EDH"]) == ("1", "1", "0")
    assert (r2["ICH"], r2["SDH"]) == ("0", "0")
    assert (r3["ICH"], r3["EDH"], r3["SAH"], r3["SDH"]) == ("1", "1", "1", "0")
    assert r4["ICH"] == "0" and r1["patient_id"] == r2["patient_id"] == "ID_P1"
    assert list(r1)[:5] == ["img_path", "id", "patient_id", "study_uid", "series_uid"]
    assert list(r1)[5:] == ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH"]


def test_rsna_study_level_image_map(tmp_path):
    labels, meta = _rsna(tmp_path)
    _write(tmp_path / "manifest.csv", ["img_path", "study_uid"],
           [[f"v/{t}.nii.gz", t] for t in ("T1", "T2", "T3", "T4", "T9")])
    out = tmp_path / "splits"
    main(["--dataset", "rsna", "--labels", str(labels), "--rsna-metadata", str(meta),
          "--image-map", str(tmp_path / "manifest.csv"), "--out", str(out)])
    rows = [r for s in ("train", "val", "test") for r in _read(out / f"{s}.csv")]
    by = {r["study_uid"]: r for r in rows}
    assert set(by) == {"T1", "T2", "T3", "T4"}  # T9 has no labelled slice: left out with a warning
    assert by["T1"]["ICH"] == "1" and by["T2"]["ICH"] == "0" and by["T3"]["SAH"] == "1"

    with pytest.raises(SystemExit, match="rsna-metadata"):
        main(["--dataset", "rsna", "--labels", str(labels), "--image-map", str(tmp_path / "manifest.csv"),
              "--out", str(out)])


def test_pseudonymised_image_maps(tmp_path):
    """tools/prepare_dicom.py's manifest.csv: img_path,id,patient_id,study_id,series_id, all keyed
    hashes, with the key in .salt beside it (found without a flag)."""
    from data.dicom import pseudonym
    salt = "s3cret"
    labels, meta = _rsna(tmp_path)
    prep = tmp_path / "prepared"
    prep.mkdir()
    (prep / ".salt").write_text(salt + "\n")
    _write(prep / "manifest.csv", ["img_path", "id", "patient_id", "study_id", "series_id"],
           [[f"images/{pseudonym(salt, 'series', 'ID_' + s)}.nii.gz", pseudonym(salt, "series", "ID_" + s),
             pseudonym(salt, "patient", "ID_" + p), pseudonym(salt, "study", "ID_" + t),
             pseudonym(salt, "series", "ID_" + s)]
            for s, t, p in (("S1", "T1", "P1"), ("S2", "T2", "P1"), ("S3", "T3", "P2"))])
    out = tmp_path / "splits"
    main(["--dataset", "rsna", "--labels", str(labels), "--rsna-metadata", str(meta),
          "--image-map", str(prep / "manifest.csv"), "--out", str(out)])
    rows = {r["series_id"]: r for s in ("train", "val", "test") for r in _read(out / f"{s}.csv")}
    s1, s2, s3 = (rows[pseudonym(salt, "series", "ID_" + s)] for s in ("S1", "S2", "S3"))
    assert s1["ICH"] == "1" and s1["SDH"] == "1" and s2["ICH"] == "0" and s3["SAH"] == "1"
    assert s1["patient_id"] == s2["patient_id"] == pseudonym(salt, "patient", "ID_P1")
    assert s1["id"] == pseudonym(salt, "series", "ID_S1") and s1["img_path"].startswith("images/")
    text = "".join((out / f"{s}.csv").read_text() for s in ("train", "val", "test"))
    assert "ID_" not in text and "series_uid" not in text

    reads, _ = _cq500(tmp_path, n=4)
    _write(tmp_path / "cq.csv", ["img_path", "patient_id"],
           [[f"c/{i}.nii.gz", pseudonym("other", "patient", f"CQ500-CT-{i}")] for i in range(4)])
    main(["--dataset", "cq500", "--labels", str(reads), "--image-map", str(tmp_path / "cq.csv"), "--out", str(out),
          "--pseudonym-salt", "other", "--val-frac", "0.25", "--test-frac", "0.25"])
    rows = {r["img_path"]: r for s in ("train", "val", "test") for r in _read(out / f"{s}.csv")}
    assert len(rows) == 4 and rows["c/2.nii.gz"]["ICH"] == "1" and rows["c/1.nii.gz"]["ICH"] == "0"
    assert rows["c/0.nii.gz"]["patient_id"] == pseudonym("other", "patient", "CQ500-CT-0")
