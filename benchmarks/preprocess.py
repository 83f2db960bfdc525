"""Preprocessing throughput per CPU core on clinical-size head CTs (512 x 512 x ~200 int16 .nii.gz).

    python -m benchmarks.preprocess --volumes 4 --processes 1 2 --json benchmarks/results/preprocess.json

Makes ``--volumes`` synthetic head CTs of clinical size: a phantom head (``data.phantom``) rendered
at ``--phantom-size`` and resampled (trilinear) to ``--shape`` (default 512 x 512 x 200) at
``--spacing`` (default 0.45 x 0.45 x 1 mm, a 230 x 230 x 200 mm field of view), stored as int16
NIfTI, gzip-compressed as scanners' exports are. Then, for each ``--processes`` count, runs the real
``tools/preprocess.py`` (``data.cache``: read, orient to RAS, crop to the head, resample to
DATA.SPACING, write the int16 ``.npy`` cache) into a fresh cache folder and records wall seconds and
the CPU seconds of the tool and its worker processes, less the start-up cost (imports, manifest)
measured by running the tool a second time on the finished cache (it resumes and finds nothing to
do): ``cpu_s_per_volume`` is the cost per volume on one core.
It also times reading one ``.nii.gz`` (gunzip + decode) alone, and reading a crop of the cache entry.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, header, write_json
from engine.cli import run_cli


def make_clinical_volume(path: Path, seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                         phantom_size: int) -> dict[str, Any]:
    """One phantom head resampled to a clinical grid, saved as gzip NIfTI; returns its description."""
    import torch
    import torch.nn.functional as F

    from data.phantom import FOV_MM, make_phantom, save_nifti

    hu, _, _, _ = make_phantom(seed, size=phantom_size, lesions=None)  # [X, Y, Z], FOV_MM cube centred at 0
    fov = np.asarray(shape, dtype=np.float64) * np.asarray(spacing)  # mm of the clinical grid
    # the clinical grid's voxel centres in normalised phantom coordinates ([-1, 1] = FOV_MM cube edges)
    axes = [torch.from_numpy(((np.arange(n) + 0.5) * s - f / 2) / (FOV_MM / 2)).float()
            for n, s, f in zip(shape, spacing, fov)]
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gz, gy, gx], dim=-1)[None]  # grid_sample wants (W, H, D) = (Z, Y, X) order
    src = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing)
    save_nifti(path, out, affine)
    return {"path": str(path), "shape": list(shape), "spacing": list(spacing), "bytes": os.path.getsize(path)}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_tool(csv_path: str, cache_dir: str, processes: int, spacing: float, in_process: bool = False
             ) -> dict[str, Any]:
    """Run tools/preprocess.py into ``cache_dir``; wall seconds and CPU seconds (tool + its workers).

    Args:
        in_process: call the tool's ``main`` here instead of starting ``python -m tools.preprocess``.
    """
    argv = ["--no-progress", "--opts", "DATA.TRAIN_CSV", csv_path, "DATA.CACHE_DIR", cache_dir,
            "DATA.NUM_WORKERS", str(processes), "DATA.SPACING", f"[{spacing},{spacing},{spacing}]"]
    cpu0 = _cpu(resource.RUSAGE_CHILDREN) + (_cpu(resource.RUSAGE_SELF) if in_process else 0.0)
    t = time.perf_counter()
    if in_process:
        from tools.preprocess import main as tool_main
        rc, log = tool_main(argv), []
    else:
        proc = subprocess.run([sys.executable, "-m", "tools.preprocess", *argv], cwd=str(REPO),
                              capture_output=True, text=True)
        rc, log = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()
    wall = time.perf_counter() - t
    cpu = _cpu(resource.RUSAGE_CHILDREN) + (_cpu(resource.RUSAGE_SELF) if in_process else 0.0) - cpu0
    if rc != 0:
        raise RuntimeError(f"tools/preprocess.py failed ({rc}):\n" + "\n".join(log))
    return {"processes": processes, "wall_s": wall, "cpu_s": cpu, "log": log[-1:]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--volumes", type=int, default=4, help="synthetic clinical volumes (default 4)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200], help="voxels (default 512 512 200)")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.45, 0.45, 1.0], help="mm (default 0.45 0.45 1)")
    p.add_argument("--phantom-size", type=int, default=160, help="phantom render size (default 160: 1.5 mm)")
    p.add_argument("--target-spacing", type=float, default=1.0, help="DATA.SPACING of the cache (default 1 mm)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="DATA.NUM_WORKERS values to time")
    p.add_argument("--in-process", action="store_true",
                   help="call the tool's main() in this process (no interpreter start-up per run)")
    p.add_argument("--workdir", default="", help="where volumes and caches go (default: a new temp folder)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.volumes < 1 or min(args.shape) < 16 or min(args.processes) < 0:
        p.error("--volumes >= 1, --shape >= 16 and --processes >= 0")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")).resolve()
    (work / "images").mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    vols = []
    for i in range(args.volumes):
        path = work / "images" / f"clinical_{i}.nii.gz"
        if path.exists():
            vols.append({"path": str(path), "shape": list(args.shape), "spacing": list(args.spacing),
                         "bytes": os.path.getsize(path)})
        else:
            vols.append(make_clinical_volume(path, i, tuple(args.shape), tuple(args.spacing), args.phantom_size))
    make_s = time.perf_counter() - t
    csv_path = work / "clinical.csv"
    csv_path.write_text("img_path\n" + "".join(f"{v['path']}\n" for v in vols))

    from data.io import read_volume
    t0 = time.process_time()
    vol = read_volume(vols[0]["path"])
    read_cpu = time.process_time() - t0
    result: dict[str, Any] = header(volumes=vols, make_volumes_s=make_s, target_spacing=args.target_spacing,
                                    read_nii_gz_cpu_s=read_cpu, runs=[])
    print(f"{args.volumes} volumes {args.shape} at {args.spacing} mm ({vols[0]['bytes'] / 2**20:.0f} MB .nii.gz "
          f"each) made in {make_s:.0f} s; reading one takes {read_cpu:.2f} CPU s", flush=True)
    del vol
    for n in args.processes:
        cache = work / f"cache_p{n}"
        r = run_tool(str(csv_path), str(cache), n, args.target_spacing, args.in_process)
        again = run_tool(str(csv_path), str(cache), n, args.target_spacing, args.in_process)  # nothing left to do
        r["startup_wall_s"], r["startup_cpu_s"] = again["wall_s"], again["cpu_s"]
        net_wall, net_cpu = max(1e-9, r["wall_s"] - again["wall_s"]), max(1e-9, r["cpu_s"] - again["cpu_s"])
        r["volumes_per_s"] = args.volumes / net_wall
        r["cpu_s_per_volume"] = net_cpu / args.volumes
        r["volumes_per_cpu_s"] = args.volumes / net_cpu
        result["runs"].append(r)
        print(f"tools/preprocess.py, {n} process(es): {args.volumes} volumes in {r['wall_s']:.1f} s "
              f"({again['wall_s']:.1f} s of it start-up, measured by a second, resumed run with nothing left to "
              f"do): {r['volumes_per_s']:.2f} volumes/s, {r['cpu_s_per_volume']:.2f} CPU s per volume", flush=True)
        if "cache_entry" not in result:
            from data.io import read_cached
            npy = next(cache.rglob("*.npy"))
            entry = read_cached(str(npy))
            t0 = time.perf_counter()
            for _ in range(20):
                np.ascontiguousarray(entry.array[:96, :96, :96])
            result["cache_entry"] = {"shape": list(entry.array.shape), "mb": os.path.getsize(npy) / 2**20,
                                     "crop_96_ms": (time.perf_counter() - t0) / 20 * 1000}
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
