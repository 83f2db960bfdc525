"""The preprocessing cache: every manifest volume preprocessed once into int16 HU for memory mapping.

Layout::

    DATA.CACHE_DIR/<key>/params.json           the preprocessing parameters behind <key>
    DATA.CACHE_DIR/<key>/ab/abcdef....npy      int16 HU [X, Y, Z], uncompressed (np.load mmap_mode="r")
    DATA.CACHE_DIR/<key>/ab/abcdef....json     sidecar: source, spacing, shape, affine, parameters
    DATA.CACHE_DIR/<key>/ab/abcdef..._<m>.mask.npy   label map of a manifest mask_path on the image's grid
    DATA.CACHE_DIR/<key>/ab/abcdef..._<m>.mask.json  its sidecar: mask source, shape, dtype, label values present
    DATA.CACHE_DIR/<key>/skipped.csv           path, reason of inputs refused under DATA.ON_ERROR skip

``<key>`` hashes every preprocessing parameter (:func:`preprocess_params`: spacing, head threshold,
orientation, cropping margins, interpolation, format version), so changing one starts a new folder
and never reuses stale arrays. An entry's file name hashes the resolved source path, so manifests
that list the same file share its entry. An entry counts as done when its sidecar exists: the array
is written first, each through a temporary file and ``os.replace``, so an interrupted run leaves no
half-written entry and simply resumes.

A segmentation manifest's masks are stored beside their images (``<m>`` hashes the mask's resolved
path): the labels went through the same orientation, head crop and grid as the image
(:func:`data.masks.preprocess_pair`, nearest neighbour), as uint8 (int16 above 255). The values each
mask holds are in its sidecar, so checking ``DOWNSTREAM.SEG_CLASSES`` reads no array.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from data.io import (BadInputError, TooManyBadInputs, Volume, read_sidecar, read_skipped, read_volume,
                     sidecar_path, write_skipped)
from data.transforms import HEAD_MARGIN_MM, HEAD_OPENING_MM, preprocess_volume

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 1  # bump when the stored layout or the preprocessing code changes meaning
SKIPPED_CSV = "skipped.csv"
REGISTRATION_CSV = "registration.csv"  # refused registrations to DATA.TEMPLATE: path, similarity, reason
REGISTRATION_FIELDS = ("path", "similarity", "reason")
# DATA.TEMPLATE 'identity': the scans already share one frame (pre-registered, or centred crops such as MedMNIST);
# nothing is registered and every scan's scan -> template transform is the identity
IDENTITY_TEMPLATE = "identity"


def preprocess_params(cfg) -> dict:
    """Every parameter that changes a cached entry (hashed into :func:`cache_key`).

    With ``DATA.TEMPLATE`` set to a file, a ``"template"`` item (the template's resolved path and content hash, the
    registration settings and ``DATA.TEMPLATE_MIN_SIMILARITY``) joins them; without it the parameters, and
    so the key, are exactly those of a cache without registration.

    Args:
        cfg: the config (``DATA.SPACING``, ``DATA.HEAD_THRESHOLD``, ``DATA.TEMPLATE``,
            ``DATA.TEMPLATE_MIN_SIMILARITY``).
    """
    params = {
        "format_version": FORMAT_VERSION,
        "orientation": "RAS",
        "spacing": [float(s) for s in cfg.DATA.SPACING],
        "interpolation": "linear",
        "head_threshold": float(cfg.DATA.HEAD_THRESHOLD),
        "head_margin_mm": float(HEAD_MARGIN_MM),
        "head_opening_mm": float(HEAD_OPENING_MM),
        "dtype": "int16",
    }
    if cfg.DATA.TEMPLATE and cfg.DATA.TEMPLATE != IDENTITY_TEMPLATE:
        from data.registration import settings, template_sha1

        path = os.path.abspath(os.path.expanduser(str(cfg.DATA.TEMPLATE)))
        if not os.path.isfile(path):
            raise ValueError(f"DATA.TEMPLATE = {cfg.DATA.TEMPLATE!r}: no such file")
        params["template"] = {"path": path, "sha1": template_sha1(path), "registration": settings(),
                              "min_similarity": float(cfg.DATA.TEMPLATE_MIN_SIMILARITY)}
    return params


def params_key(params: dict) -> str:
    """Short stable hash of a parameter dict (a template enters by its content hash, not its path: the same
    template moved or named by another relative path keeps the key)."""
    if "template" in params:
        params = {**params, "template": {k: v for k, v in params["template"].items() if k != "path"}}
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cache_key(cfg) -> str:
    """Name of the cache folder for this config's preprocessing parameters (16 hex digits)."""
    return params_key(preprocess_params(cfg))


def cache_root(cfg) -> Path:
    """``DATA.CACHE_DIR/<cache_key>``; ValueError when ``DATA.CACHE_DIR`` is empty."""
    if not cfg.DATA.CACHE_DIR:
        raise ValueError("DATA.CACHE_DIR is empty; set it to the folder of the preprocessing cache")
    return Path(os.path.expanduser(cfg.DATA.CACHE_DIR)).absolute() / cache_key(cfg)


def entry_name(source: PathLike) -> str:
    """Hash of the resolved (absolute, normalised) source path: the entry's file stem."""
    resolved = os.path.abspath(os.path.expanduser(str(source)))
    return hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:24]


def entry_path(root: PathLike, source: PathLike) -> Path:
    """The ``.npy`` of ``source`` under a cache folder (sharded by the hash's first two digits)."""
    name = entry_name(source)
    return Path(root) / name[:2] / f"{name}.npy"


def mask_entry_path(root: PathLike, source: PathLike, mask: PathLike) -> Path:
    """The ``.mask.npy`` of the label map ``mask`` of image ``source`` (beside the image's entry)."""
    name = entry_name(source)
    return Path(root) / name[:2] / f"{name}_{entry_name(mask)[:12]}.mask.npy"


def is_done(root: PathLike, source: PathLike, mask: PathLike = "") -> bool:
    """True when the entry's sidecar (written last) and array exist (and the mask's, when given)."""
    npy = entry_path(root, source)
    done = os.path.exists(sidecar_path(npy)) and npy.exists()
    if done and mask:
        m = mask_entry_path(root, source, mask)
        done = os.path.exists(sidecar_path(m)) and m.exists()
    return done


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_entry(root: PathLike, source: PathLike, vol: Volume, params: dict,
                extra: Optional[dict] = None) -> Path:
    """Store a preprocessed volume as int16 HU ``.npy`` plus its JSON sidecar, atomically.

    Args:
        root: the cache folder (``cache_root(cfg)``).
        source: the source file (its resolved path names the entry).
        vol: preprocessed float HU volume.
        params: :func:`preprocess_params` (recorded in the sidecar).
        extra: more sidecar items (e.g. ``"template"``: the registration, :meth:`Registration.to_json`).

    Returns:
        The ``.npy`` path.
    """
    npy = entry_path(root, source)
    npy.parent.mkdir(parents=True, exist_ok=True)
    hu = np.clip(np.rint(np.asarray(vol.array, dtype=np.float32)), -32768, 32767).astype(np.int16)
    _atomic_write_bytes(npy, lambda f: np.save(f, hu))
    src = os.path.abspath(os.path.expanduser(str(source)))
    st = os.stat(src) if os.path.exists(src) else None
    meta = {
        "source": src,
        "source_size": st.st_size if st else None,
        "source_mtime": st.st_mtime if st else None,
        "shape": list(hu.shape),
        "spacing": [float(s) for s in vol.spacing],
        "affine": np.asarray(vol.affine, dtype=np.float64).tolist(),
        "dtype": "int16",
        "params": params,
        "key": params_key(params),
        **(extra or {}),
    }
    blob = json.dumps(meta, indent=1).encode()
    _atomic_write_bytes(Path(sidecar_path(npy)), lambda f: f.write(blob))
    return npy


def write_mask_entry(root: PathLike, source: PathLike, mask: PathLike, labels: np.ndarray) -> Path:
    """Store a label map (on the image entry's grid) and its sidecar, atomically; returns the ``.npy``."""
    npy = mask_entry_path(root, source, mask)
    npy.parent.mkdir(parents=True, exist_ok=True)
    values = np.unique(labels)
    if values.size and (values.min() < 0 or values.max() > 32767):
        raise BadInputError(mask, f"label values {values.min()}..{values.max()} outside 0..32767")
    arr = labels.astype(np.uint8 if values.size == 0 or values.max() < 256 else np.int16)
    _atomic_write_bytes(npy, lambda f: np.save(f, arr))
    meta = {"source": os.path.abspath(os.path.expanduser(str(source))),
            "mask": os.path.abspath(os.path.expanduser(str(mask))), "shape": list(arr.shape),
            "dtype": str(arr.dtype), "values": [int(v) for v in values]}
    blob = json.dumps(meta, indent=1).encode()
    _atomic_write_bytes(Path(sidecar_path(npy)), lambda f: f.write(blob))
    return npy


def read_mask_entry(root: PathLike, source: PathLike, mask: PathLike) -> tuple[np.ndarray, list[int]]:
    """The cached label map of ``mask`` (memory map) and the label values it holds.

    Raises:
        BadInputError: naming the mask when it is not in the cache.
    """
    npy = mask_entry_path(root, source, mask)
    side = sidecar_path(npy)
    if not os.path.exists(side):
        raise BadInputError(mask, f"mask not in the preprocessing cache (expected {npy}); run tools/preprocess.py "
                                  "--cfg ... with the same DATA settings and manifests first")
    with open(side) as f:
        meta = json.load(f)
    return np.load(npy, mmap_mode="r"), list(meta["values"])


def skipped_reasons(root: PathLike) -> dict[str, str]:
    """``{source: reason}`` of the inputs refused when this cache was built."""
    return read_skipped(Path(root) / SKIPPED_CSV)


def read_entry(root: PathLike, source: PathLike, skipped: Optional[dict[str, str]] = None) -> Volume:
    """The cached volume of ``source`` (int16 memmap ``[X, Y, Z]`` + geometry).

    Args:
        root: the cache folder.
        source: the manifest's (resolved) source path.
        skipped: ``skipped_reasons(root)`` if already loaded (read here otherwise, when missing).

    Raises:
        BadInputError: naming the source: skipped at preprocessing (with the reason), or not in the
            cache (with the cache path and the command to run).
    """
    npy = entry_path(root, source)
    if not os.path.exists(sidecar_path(npy)):
        reasons = skipped if skipped is not None else skipped_reasons(root)
        src = os.path.abspath(os.path.expanduser(str(source)))
        if src in reasons:
            raise BadInputError(source, f"skipped at preprocessing: {reasons[src]}")
        raise BadInputError(source, f"not in the preprocessing cache (expected {npy}); run "
                                    "tools/preprocess.py --cfg ... with the same DATA settings first")
    return read_volume(npy)


def preprocess_one(source: str, root: str, params: dict, mask: str = "") -> tuple[str, str, str, Optional[dict]]:
    """Read, preprocess and store one volume and, when given, its label map (runs in a worker process).

    With a ``"template"`` in ``params`` the preprocessed volume is registered to it
    (:func:`data.registration.register_to_template`) and the result goes into the sidecar's ``"template"``
    item; a refused registration leaves the entry good (it keeps same-scan views).

    Returns:
        ``(status, source, reason, registration)``: status ``'done'`` or ``'bad'`` (reason = BadInputError's;
        a bad mask is named in it); registration: the sidecar's ``"template"`` dict, or None without a template
        (or for a bad input).
    """
    from data.masks import align_mask, preprocess_pair, read_mask
    try:
        vol = read_volume(source)
        try:
            head = dict(margin_mm=params["head_margin_mm"], opening_mm=params["head_opening_mm"])
            if mask:
                labels = align_mask(read_mask(mask, f"mask of {source}"), vol, mask, f"mask of {source}")
                out, labels = preprocess_pair(vol, labels, params["spacing"], params["head_threshold"], **head)
            else:
                out = preprocess_volume(vol, params["spacing"], params["head_threshold"], **head)
        except ValueError as e:  # e.g. nothing above the head threshold
            if isinstance(e, BadInputError):
                raise
            raise BadInputError(source, f"preprocessing failed: {e}") from None
        registration = None
        if "template" in params:
            from data.registration import cached_template, register_to_template

            tp = params["template"]
            reg = register_to_template(out.array, out.affine, cached_template(tp["path"], tp["sha1"]),
                                       min_similarity=tp["min_similarity"])
            registration = reg.to_json()
        write_entry(root, source, out, params, None if registration is None else {"template": registration})
        if mask:
            write_mask_entry(root, source, mask, labels)
        return "done", source, "", registration
    except BadInputError as e:
        return "bad", source, e.reason if e.path == source else str(e), None


def read_template(root: PathLike, source: PathLike) -> Optional[np.ndarray]:
    """The ``(4, 4)`` scan world -> template world matrix of a cached entry (RAS mm, homogeneous).

    None when the entry has no registration (a cache built without ``DATA.TEMPLATE``) or its registration
    was refused (listed in ``<root>/registration.csv``).

    Raises:
        BadInputError: naming the source when it is not in the cache.
    """
    npy = entry_path(root, source)
    side = sidecar_path(npy)
    if not os.path.exists(side):
        raise BadInputError(source, f"not in the preprocessing cache (expected {npy}); run "
                                    "tools/preprocess.py --cfg ... with the same DATA settings first")
    reg = read_sidecar(npy).get("template")
    if not reg or not reg.get("ok"):
        return None
    return np.asarray(reg["to_template"], dtype=np.float64)


def read_registrations(root: PathLike) -> dict[str, tuple[str, str]]:
    """``{source: (similarity, reason)}`` of the refused registrations listed in ``<root>/registration.csv``."""
    path = Path(root) / REGISTRATION_CSV
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {r["path"]: (r["similarity"], r["reason"]) for r in csv.DictReader(f)}


def write_registrations(root: PathLike, rows: dict[str, tuple[str, str]]) -> None:
    """Rewrite ``<root>/registration.csv`` (path, similarity, reason), atomically."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(REGISTRATION_FIELDS)
    for p in sorted(rows):
        w.writerow([p, *rows[p]])
    blob = buf.getvalue().encode()
    _atomic_write_bytes(Path(root) / REGISTRATION_CSV, lambda f: f.write(blob))


def manifest_sources(cfg, csv_paths: Optional[Sequence[PathLike]] = None) -> list[str]:
    """Unique resolved image paths of the manifests (default: the config's TRAIN/VAL/TEST CSVs that are set)."""
    from data.manifest import Manifest

    if csv_paths is None:
        csv_paths = [p for p in (cfg.DATA.TRAIN_CSV, cfg.DATA.VAL_CSV, cfg.DATA.TEST_CSV) if p]
    if not csv_paths:
        raise ValueError("no manifest: set DATA.TRAIN_CSV, DATA.VAL_CSV or DATA.TEST_CSV")
    seen: dict[str, None] = {}
    for p in csv_paths:
        for s in Manifest.read(p, root=cfg.DATA.ROOT).paths:
            seen.setdefault(s)
    return list(seen)


def manifest_pairs(cfg, csv_paths: Optional[Sequence[PathLike]] = None) -> list[tuple[str, str]]:
    """Unique ``(image, mask)`` resolved paths of the manifests (mask '' when a manifest has none)."""
    from data.manifest import Manifest

    if csv_paths is None:
        csv_paths = [p for p in (cfg.DATA.TRAIN_CSV, cfg.DATA.VAL_CSV, cfg.DATA.TEST_CSV) if p]
    if not csv_paths:
        raise ValueError("no manifest: set DATA.TRAIN_CSV, DATA.VAL_CSV or DATA.TEST_CSV")
    seen: dict[tuple[str, str], None] = {}
    for p in csv_paths:
        m = Manifest.read(p, root=cfg.DATA.ROOT)
        for i, s in enumerate(m.paths):
            seen.setdefault((s, m.masks[i] if m.masks is not None else ""))
    return list(seen)


def _summary(bad: dict[str, str], total: int) -> str:
    top = Counter(r.split(" (")[0] for r in bad.values()).most_common(5)
    lines = [f"{len(bad)} of {total} inputs are bad; most common reasons:"]
    lines += [f"  {n} x {r}" for r, n in top]
    return "\n".join(lines)


def preprocess_manifests(cfg, csv_paths: Optional[Sequence[PathLike]] = None,
                         num_workers: Optional[int] = None, progress: bool = True,
                         log=print) -> dict:
    """Fill the cache for every volume of the manifests: parallel, resumable, idempotent.

    Entries already done are skipped; the others run over ``num_workers`` processes (0 = in this
    process). Under ``DATA.ON_ERROR raise`` the first bad input stops everything with its
    BadInputError. Under ``skip`` each bad input is logged once and listed in
    ``<cache>/skipped.csv`` (rewritten each run: inputs that now succeed leave it); once more than
    ``DATA.MAX_BAD_FRACTION`` of the inputs are bad the run stops with :class:`TooManyBadInputs`.
    With ``DATA.TEMPLATE`` set each new entry is registered to the template; refused registrations are
    listed in ``<cache>/registration.csv`` (path, similarity, reason; rows of entries done earlier stay),
    and the entries stay usable (same-scan views only).

    Args:
        cfg: the config (DATA.CACHE_DIR, DATA.SPACING, DATA.HEAD_THRESHOLD, DATA.ON_ERROR,
            DATA.MAX_BAD_FRACTION, DATA.NUM_WORKERS, manifests).
        csv_paths: manifests to cover (default: the config's).
        num_workers: processes (default ``DATA.NUM_WORKERS``).
        progress: show a tqdm bar.
        log: called with each message line.

    Returns:
        ``{"root", "total", "already_done", "done", "bad", "seconds", "per_second"}``, and with a
        template ``"registered"`` / ``"registration_refused"``: the manifests' entries (this run's and earlier
        ones) whose registration was accepted / refused.
    """
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    params = preprocess_params(cfg)
    _atomic_write_bytes(root / "params.json", lambda f: f.write(json.dumps(params, indent=1).encode()))
    pairs = manifest_pairs(cfg, csv_paths)
    total = len(pairs)
    todo = [(s, m) for s, m in pairs if not is_done(root, s, m)]
    already = total - len(todo)
    workers = cfg.DATA.NUM_WORKERS if num_workers is None else num_workers
    skip = cfg.DATA.ON_ERROR == "skip"
    max_bad = float(cfg.DATA.MAX_BAD_FRACTION) * total
    log(f"preprocess: {total} volumes, {already} already in {root}, {len(todo)} to do on "
        f"{max(workers, 1)} process(es)")

    bad: dict[str, str] = {}
    register = "template" in params
    refused: dict[str, tuple[str, str]] = {}  # this run's refused registrations
    n_done = 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="preprocess", unit="vol", dynamic_ncols=True)

    def handle(result: tuple[str, str, str, Optional[dict]]) -> None:
        nonlocal n_done
        status, source, reason, registration = result
        if bar is not None:
            bar.update(1)
        if status == "done":
            n_done += 1
            if registration is not None and not registration["ok"]:
                sim = registration["similarity"]
                refused[source] = ("" if sim is None else f"{sim:.4f}", registration["reason"])
            return
        if not skip:
            raise BadInputError(source, reason)
        bad[source] = reason
        (bar.write if bar is not None else log)(f"skipped {source}: {reason}")
        if len(bad) > max_bad:
            raise TooManyBadInputs(_summary(bad, total) + f"\nmore than DATA.MAX_BAD_FRACTION = "
                                   f"{cfg.DATA.MAX_BAD_FRACTION} of {total}; stopped. Listed in "
                                   f"{root / SKIPPED_CSV}")

    try:
        if workers <= 0:
            for s, m in todo:
                handle(preprocess_one(s, str(root), params, m))
        else:
            _run_pool(todo, str(root), params, workers, handle)
    finally:
        if bar is not None:
            bar.close()
        if skip:
            # inputs that failed before but are now done leave the list; unseen ones stay
            mask_of = dict(pairs)
            old = {p: r for p, r in skipped_reasons(root).items() if not is_done(root, p, mask_of.get(p, ""))}
            old.update(bad)
            write_skipped(root / SKIPPED_CSV, old.items(), replace=True)
        if register:
            # rows of entries done earlier stay (they are not registered again); this run's are added
            rows = {p: r for p, r in read_registrations(root).items()
                    if os.path.exists(sidecar_path(entry_path(root, p)))}
            rows.update(refused)
            if rows or (root / REGISTRATION_CSV).exists():
                write_registrations(root, rows)
    seconds = time.perf_counter() - t0
    summary = {"root": str(root), "total": total, "already_done": already, "done": n_done,
               "bad": len(bad), "seconds": seconds, "per_second": n_done / seconds if seconds > 0 else 0.0}
    line = (f"preprocess: {n_done} written, {already} already done, {len(bad)} skipped in {seconds:.1f} s "
            f"({summary['per_second']:.2f} volumes/s)" + (f"; see {root / SKIPPED_CSV}" if bad else ""))
    if register:
        sources = {s for s, _ in pairs if s not in bad and os.path.exists(sidecar_path(entry_path(root, s)))}
        n_refused = len(sources & set(rows))
        summary["registered"] = len(sources) - n_refused
        summary["registration_refused"] = n_refused
        line += (f"; registered to {params['template']['path']}: {summary['registered']} accepted, "
                 f"{n_refused} refused" + (f" (see {root / REGISTRATION_CSV})" if n_refused else ""))
    log(line)
    return summary


def _init_worker(register: bool = False) -> None:
    """One thread per worker process: the processes are the parallelism (SimpleITK too, which otherwise
    starts a thread per core in every worker)."""
    import torch

    torch.set_num_threads(1)
    if register:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run_pool(todo: list[tuple[str, str]], root: str, params: dict, workers: int, handle) -> None:
    """At most ``4 * workers`` tasks in flight (a 400k-entry manifest is not submitted at once)."""
    it = iter(todo)
    pending: set[Future] = set()
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                             initargs=("template" in params,)) as pool:
        try:
            while True:
                while len(pending) < 4 * workers:
                    item = next(it, None)
                    if item is None:
                        break
                    pending.add(pool.submit(preprocess_one, item[0], root, params, item[1]))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    handle(fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
