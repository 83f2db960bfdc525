"""benchmarks/segment_inference.py at a toy size: every family's case runs in its own process and reports
seconds, peak memory and the predicted shape of the whole volume."""
import json

from benchmarks.segment_inference import main


def test_segment_inference_smoke(tmp_path):
    doc = main(["--families", "segresnet,vit", "--size", "40", "--roi", "32", "--threads", "1",
                "--json", str(tmp_path / "s.json")])
    assert json.load(open(tmp_path / "s.json"))["results"] == doc["results"]
    assert [r["family"] for r in doc["results"]] == ["segresnet", "vit"]
    for r in doc["results"]:
        assert r["shape"] == [40, 40, 40] and r["seconds"] > 0 and 0.1 < r["peak_rss_gb"] < 8
    assert doc["roi"] == 32 and doc["overlap"] == 0.5 and "load_avg" in doc
