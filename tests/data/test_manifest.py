import tracemalloc

import numpy as np
import pytest

from data.manifest import Manifest, ManifestError, StringArray, few_shot_indices, split_groups


def write(path, text):
    path.write_text(text)
    return path


def test_read_resolves_paths_defaults_ids_and_parses_columns(tmp_path):
    csv = write(tmp_path / "m.csv",
                "img_path,patient,ICH,fracture,coordX,coordY,coordZ,note\n"
                "scans/a.nii.gz,P1,1,,1.5,-2,3,x\n"
                "/abs/b.nii,P1,0,1,,,,\n"
                "c.npy,P2,,0,4,5,6,\n")
    m = Manifest.read(csv, label_columns=["ICH", "fracture"], group_column="patient")
    assert len(m) == 3
    assert m.ids.tolist() == ["a", "b", "c"]
    assert m.paths.tolist() == [str(tmp_path / "scans" / "a.nii.gz"), "/abs/b.nii", str(tmp_path / "c.npy")]
    assert m.label_names == ("ICH", "fracture")
    np.testing.assert_array_equal(m.labels, np.array([[1, np.nan], [0, 1], [np.nan, 0]], np.float32))
    assert m.labels.dtype == np.float32
    assert m.groups.tolist() == ["P1", "P1", "P2"]
    np.testing.assert_array_equal(m.coords[0], [1.5, -2, 3])
    assert np.isnan(m.coords[1]).all()
    r = m.row(2)
    assert r["id"] == "c" and r["group"] == "P2" and np.isnan(r["ICH"]) and r["fracture"] == 0.0
    assert r["coord"].tolist() == [4, 5, 6] and m.row(1)["coord"] is None
    # root given: relative paths resolve against it
    m2 = Manifest.read(csv, root=tmp_path / "data")
    assert m2.paths[0] == str(tmp_path / "data" / "scans" / "a.nii.gz")
    assert m2.groups.tolist() == m2.ids.tolist()  # no group column: each scan its own group
    assert m2.labels.shape == (3, 0)


def test_subset_and_string_array():
    s = StringArray(["a", "bé", "", "ccc"])
    assert len(s) == 4 and s[1] == "bé" and s[-1] == "ccc" and s[2] == ""
    assert s[[3, 0]].tolist() == ["ccc", "a"] and s[1:3].tolist() == ["bé", ""]
    assert list(np.asarray(s)) == ["a", "bé", "", "ccc"]
    assert (s == "a").tolist() == [True, False, False, False]
    with pytest.raises(IndexError):
        s[4]


def test_subset_keeps_rows(tmp_path):
    csv = write(tmp_path / "m.csv", "img_path,id,g,L\n" + "".join(f"x{i}.nii,id{i},g{i % 2},{i % 2}\n"
                                                                for i in range(6)))
    m = Manifest.read(csv, label_columns=["L"], group_column="g")
    sub = m.subset([4, 1])
    assert sub.ids.tolist() == ["id4", "id1"] and sub.groups.tolist() == ["g0", "g1"]
    np.testing.assert_array_equal(sub.labels[:, 0], [0, 1])
    sub2 = m.subset(np.array([True, False] * 3))
    assert sub2.ids.tolist() == ["id0", "id2", "id4"]
    m.write(tmp_path / "out.csv")
    again = Manifest.read(tmp_path / "out.csv", label_columns=["L"], group_column="g")
    assert again.ids.tolist() == m.ids.tolist() and again.paths.tolist() == m.paths.tolist()
    np.testing.assert_array_equal(again.labels, m.labels)


@pytest.mark.parametrize("text, kwargs, expected", [
    ("path,id\na.nii,a\n", {}, r"line 1, column 'img_path': required column missing"),
    ("img_path,ICH\na.nii,1\nb.nii,2\n", {"label_columns": ["ICH"]}, r"line 3, column 'ICH': label value '2'"),
    ("img_path,ICH\na.nii,1\nb.nii,yes\n", {"label_columns": ["ICH"]}, r"line 3, column 'ICH'"),
    ("img_path\na.nii\n", {"label_columns": ["ICH"]}, r"line 1, column 'ICH': label column missing"),
    ("img_path\na.nii\n", {"group_column": "patient"}, r"line 1, column 'patient': group column missing"),
    ("img_path,id\na.nii,x\nb.nii,y\nc.nii,x\n", {}, r"line 4, column 'id': id 'x' already used on line 2"),
    ("img_path\nd1/a.nii\nd2/a.nii\n", {}, r"line 3, column 'img_path': id 'a' already used on line 2"),
    ("img_path,id\na.nii,a\n,b\n", {}, r"line 3, column 'img_path': empty path"),
    ("img_path,coordX,coordY,coordZ\na.nii,1,2,abc\n", {}, r"line 2, column 'coordZ': 'abc' is not a number"),
    ("img_path,coordX,coordY,coordZ\na.nii,1,,3\n", {}, r"line 2, column 'coordY': give all three"),
    ("img_path,coordX,coordY\na.nii,1,2\n", {}, r"line 1, column 'coordZ'"),
    ("img_path,id\na.nii,a,extra\n", {}, r"line 2: 3 fields, header has 2"),
    ("img_path\n", {}, r"no rows"),
    ("", {}, r"empty"),
])
def test_errors_name_file_line_and_column(tmp_path, text, kwargs, expected):
    csv = write(tmp_path / "bad.csv", text)
    with pytest.raises(ManifestError, match=expected) as info:
        Manifest.read(csv, **kwargs)
    assert str(csv) in str(info.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.read(tmp_path / "nope.csv")


def _big_csv(path, n):
    with open(path, "w") as f:
        f.write("img_path,id,patient,ICH,fracture\n")
        for i in range(n):
            f.write(f"/data/headct/nifti/site{i % 7}/study_{i:07d}/series_1.nii.gz,scan{i:07d},"
                    f"P{i // 3:06d},{i % 2},{'' if i % 5 else 1}\n")
    return path


def test_memory_per_row_is_small(tmp_path):
    n = 100_000  # array bytes of 100k rows (paths of 55 characters)
    m = Manifest.read(_big_csv(tmp_path / "big.csv", n), label_columns=["ICH", "fracture"],
                      group_column="patient")
    assert len(m) == n and m.ids[n - 1] == "scan0099999" and m.groups[n - 1] == "P033333"
    assert m.nbytes / n < 200, m.nbytes / n
    # everything the manifest retains, Python objects included (tracemalloc is slow: fewer rows)
    n = 10_000
    csv = _big_csv(tmp_path / "small.csv", n)
    tracemalloc.start()
    m = Manifest.read(csv, label_columns=["ICH", "fracture"], group_column="patient")
    retained, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(m) == n
    assert retained / n < 300, f"{retained / n:.0f} bytes per row retained"


def test_split_groups_stratified_and_deterministic():
    groups = [f"p{i}" for i in range(40)]
    strata = {g: "1" if i < 10 else "0" for i, g in enumerate(groups)}
    a = split_groups(groups, strata, 0.2, 0.25, seed=3)
    assert a == split_groups(reversed(groups), strata, 0.2, 0.25, seed=3)
    assert a != split_groups(groups, strata, 0.2, 0.25, seed=4)
    count = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert count == {"train": 22, "val": 8, "test": 10}
    pos = {s: sum(a[g] == s for g in groups if strata[g] == "1") for s in count}
    assert pos["test"] in (2, 3) and pos["val"] == 2
    with pytest.raises(ValueError, match="sum < 1"):
        split_groups(groups, strata, 0.5, 0.5)


def test_few_shot_balanced_without_replacement_and_reproducible(tmp_path):
    labels = [1] * 12 + [0] * 20 + [""] * 5
    csv = write(tmp_path / "m.csv", "img_path,ICH,other\n" + "".join(f"s{i}.nii,{v},{i % 2}\n"
                                                                      for i, v in enumerate(labels)))
    m = Manifest.read(csv, label_columns=["ICH", "other"])
    idx = few_shot_indices(m, "ICH", k=8, seed=3)
    assert len(idx) == 16 and len(set(idx.tolist())) == 16
    assert (m.labels[idx[:8], 0] == 1).all() and (m.labels[idx[8:], 0] == 0).all()
    np.testing.assert_array_equal(idx, few_shot_indices(m, "ICH", k=8, seed=3))
    assert not np.array_equal(idx, few_shot_indices(m, "ICH", k=8, seed=4))
    draws = np.concatenate([few_shot_indices(m, "ICH", k=8, seed=s) for s in range(20)])
    assert set(draws.tolist()) <= set(range(32))  # blank rows never drawn
    assert len(set(draws.tolist())) == 32  # every labelled row gets drawn by some seed
    np.testing.assert_array_equal(few_shot_indices(m, 0, 12, 0)[:12], np.arange(12))
    with pytest.raises(ValueError, match="label 'ICH' has 12 positives"):
        few_shot_indices(m, "ICH", k=13, seed=0)
    with pytest.raises(ValueError, match="'nope'"):
        few_shot_indices(m, "nope", k=1, seed=0)
