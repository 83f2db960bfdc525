"""The one configuration tree (yacs) for every entry script and tool.

Merge order: defaults (below) <- ``--cfg`` YAML (``_BASE_`` files first) <- ``--opts KEY VALUE``.
The merged tree is validated, frozen and written to ``OUTPUT/config.yaml`` by every run.

Axis convention: volumes are oriented to RAS and held as arrays ``[X, Y, Z]`` (nibabel's voxel
order after reorientation). ``DATA.SPACING``, ``DATA.ROI`` and ``MODEL.PATCH_SIZE`` list the three
spatial axes in that array order; ``DATA.ROI`` is written ``[D, H, W]`` in the docs for the three
array axes.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

from models.names import BACKBONES, NORMS, POOLS, POS_EMBEDS, orientation_axes

_C = CN()
_C.OUTPUT = "outputs/run"  # run folder: config.yaml, logs, checkpoints, run.lock; reused by TRAIN.RESUME auto
_C.SEED = 0  # global seed; each rank and DataLoader worker derives its own from it

# ---------------------------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.ROOT = ""  # prefix for relative img_path entries of the manifests ('' = CSV's folder)
_C.DATA.TRAIN_CSV = ""  # training manifest (img_path, id, labels, ...)
_C.DATA.VAL_CSV = ""  # validation manifest ('' = no validation)
_C.DATA.TEST_CSV = ""  # test manifest (downstream evaluation, feature extraction)
# HU windows, one input channel each: preset names (brain 40/80, subdural 80/200, stroke 40/40,
# bone 600/2800, soft_tissue 40/400) or "center,width" strings. Three windows as in HeadCT-FM.
_C.DATA.WINDOWS = ["brain", "subdural", "bone"]
_C.DATA.SPACING = [1.0, 1.0, 1.0]  # target voxel spacing in mm (linear resampling)
_C.DATA.ROI = [96, 96, 96]  # model input size [D, H, W]; must be divisible by MODEL.PATCH_SIZE for ViTs
# how a head is fitted to ROI: 'crop_pad' (random/centre crop and pad, keeps mm scale) or
# 'resize' (aspect-preserving resize then pad: whole head always visible)
_C.DATA.FIT = "crop_pad"
_C.DATA.HEAD_THRESHOLD = -300.0  # HU above which voxels count as body when cropping to the head
_C.DATA.BATCH_SIZE = 8  # per process; global batch = BATCH_SIZE * world size * TRAIN.ACCUM_STEPS
_C.DATA.NUM_WORKERS = 4  # DataLoader worker processes per rank
_C.DATA.PIN_MEMORY = True  # page-locked host batches (only used with CUDA)
_C.DATA.PREFETCH_FACTOR = 4  # batches prefetched per worker
# whole seconds a batch may take to arrive from the DataLoader workers before the run stops naming the batch's
# scans (a scan that hangs its reader, e.g. on a stalled network filesystem); 0 = wait forever. Generous:
# a batch of slow network reads takes seconds to a minute, and Slurm would otherwise keep a hung job to its limit
_C.DATA.TIMEOUT = 600
_C.DATA.CACHE_DIR = ""  # preprocessed cache (tools/preprocess.py); '' = read the source files
_C.DATA.ON_ERROR = "raise"  # bad input: 'raise' (stop naming file and reason) | 'skip' (list in skipped.csv)
_C.DATA.MAX_BAD_FRACTION = 0.05  # under 'skip', more bad inputs than this fraction stop the run
# head-CT template: the common frame of Alice's cross-scan views (docs/pretraining.md#alice). When set,
# tools/preprocess.py registers every scan to it (affine, SimpleITK, brain window) and stores the scan -> template
# world transform and the registration's similarity beside the cache entry; '' = no registration;
# 'identity' = the scans already share one frame (pre-registered, or centred crops as MedMNIST): nothing is registered
_C.DATA.TEMPLATE = ""
# a registration whose similarity (normalised cross-correlation in the brain window, 1 = identical) is below
# this is refused: the scan is listed in the cache's registration.csv and gets crop views only. Measured
# (benchmarks/alice_matching.py): phantom heads 0.58-0.69 against the shared atlas, the atlas under a random affine
# 0.99; non-head and partial scans are refused by the scale and coverage checks, not by this value
_C.DATA.TEMPLATE_MIN_SIMILARITY = 0.5

# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
# vit_tiny | vit_small | vit_base | vit_large | swin | segresnet | resnet18 | resnet50; variants:
# vit_base_headct (HeadCT-Foundation's ViT-B: block LayerNorm eps 1e-5, for its imported weights)
_C.MODEL.NAME = "vit_base"
_C.MODEL.PATCH_SIZE = [16, 16, 16]  # ViT patch size per axis (8 or 16 typical at 96^3)
_C.MODEL.PRETRAINED = ""  # checkpoint to initialise the backbone from ('' = random init)
_C.MODEL.MIN_LOADED_FRACTION = 0.9  # fail when fewer backbone tensors than this load from PRETRAINED
_C.MODEL.POOL = "cls"  # ViT pooled output: 'cls' | 'mean' | 'cls+mean'
_C.MODEL.NUM_REGISTERS = 0  # ViT register tokens (DINOv2-style; 4 helps attention maps)
_C.MODEL.POS_EMBED = "sincos"  # ViT position embedding: 'sincos' (fixed) | 'learned' (sin-cos init)
_C.MODEL.DROP_PATH = 0.0  # stochastic depth rate (0.1 for fine-tuning ViT-B)
# width of the MONAI encoders: swin embed dim (multiple of 12), segresnet init filters, resnet
# first-stage channels; 0 = the standard width (swin 48 as SwinUNETR, segresnet 32 as CT-FM, resnet 64)
_C.MODEL.FEATURE_SIZE = 0
# normalisation of the segresnet encoder, with affine parameters as MONAI's SegResEncoder builds it:
# 'batch' (MONAI's default) | 'instance'; tools/import_checkpoint.py sets it from a CT-FM config.json
_C.MODEL.NORM = "batch"
# orientation the MONAI encoders (swin, segresnet, resnet*) give their input in: the data stay RAS, the
# encoder permutes / flips its input to this code and its feature map back (CT-FM: SPL, FMCIB: LPS); ViTs: RAS
_C.MODEL.INPUT_ORIENTATION = "RAS"

# ---------------------------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.EPOCHS = 100  # full passes over the training manifest
_C.TRAIN.WARMUP_EPOCHS = 10  # linear lr warm-up, then cosine decay to MIN_LR
_C.TRAIN.BASE_LR = 1.5e-4  # lr for a global batch of 256; scaled linearly by global batch / 256
_C.TRAIN.MIN_LR = 1e-6  # lr at the end of the cosine schedule
_C.TRAIN.WEIGHT_DECAY = 0.05  # AdamW weight decay at the start (never on norms, biases, pos-embed, tokens)
_C.TRAIN.WEIGHT_DECAY_END = -1.0  # weight decay at the end (cosine); < 0 = constant WEIGHT_DECAY
_C.TRAIN.OPTIMIZER = "adamw"  # 'adamw' | 'sgd'
_C.TRAIN.BETAS = [0.9, 0.95]  # AdamW betas (0.95 as MAE: steadier with large batches)
_C.TRAIN.LAYER_DECAY = 1.0  # layer-wise lr decay for ViT fine-tuning (0.75 typical; 1 = off)
_C.TRAIN.CLIP_GRAD = 3.0  # max global grad norm (0 = no clipping)
_C.TRAIN.ACCUM_STEPS = 1  # gradient accumulation steps per optimizer step
_C.TRAIN.AMP = "none"  # 'bf16' | 'fp16' (with a GradScaler) | 'none'; production configs use bf16
_C.TRAIN.COMPILE = False  # torch.compile the method's model
_C.TRAIN.RESUME = "auto"  # 'auto' (the newest full-state checkpoint of OUTPUT that loads) | a checkpoint path | ''
_C.TRAIN.SAVE_EVERY = 10  # epochs between numbered checkpoint_epochN.pth (0 = never)
_C.TRAIN.SAVE_MINUTES = 10.0  # also write checkpoint_last.pth this often within an epoch (0 = off): what a
#   rank killed without warning (SIGKILL, a dead node) loses at most; docs/cluster.md#faults
_C.TRAIN.ON_NONFINITE = "stop"  # a NaN/inf loss on any rank: 'stop' the run | 'skip' the step (no update)
_C.TRAIN.MAX_SKIPPED_STEPS = 10  # under ON_NONFINITE skip: this many skipped steps in a row stop the run
_C.TRAIN.LOG_EVERY = 10  # iterations between logged step lines / metrics.jsonl rows
_C.TRAIN.EVAL_EVERY = 1  # epochs between validation passes (when DATA.VAL_CSV is set)

# ---------------------------------------------------------------------------------------------
# Collapse monitor of every pretraining run (evaluation/collapse.py, engine/monitor.py): once per
# epoch, and once before the first step, the backbone that backbone.pth holds embeds a fixed set of
# scans; metrics.jsonl and TensorBoard get feature_rank (RankMe effective rank) and feature_std (std
# of the l2-normalised embeddings, about 1/sqrt(dim) when healthy, towards 0 when collapsed).
_C.MONITOR = CN()
_C.MONITOR.NUM_SCANS = 256  # scans of DATA.VAL_CSV (TRAIN_CSV when unset), evenly spaced rows (0 = off)
_C.MONITOR.RANK_WARN_FRACTION = 0.5  # warn when feature_rank falls below this fraction of its initial value

# ---------------------------------------------------------------------------------------------
_C.MAE = CN()
_C.MAE.MASK_RATIO = 0.75  # fraction of patches hidden per sample (0.9 also works in 3D)
_C.MAE.NORM_PIX_LOSS = True  # normalise each target patch by its mean/std (sharper features)
# shallow decoder: in 3D the decoder sees every token, so a deep one dominates the cost
_C.MAE.DECODER_DIM = 384
_C.MAE.DECODER_DEPTH = 4
_C.MAE.DECODER_NUM_HEADS = 6
_C.MAE.VIS_EVERY = 5  # epochs between reconstruction images in TensorBoard (0 = never)

# ---------------------------------------------------------------------------------------------
_C.DINO = CN()
_C.DINO.GLOBAL_CROPS = 2  # global crops at DATA.ROI, seen by teacher and student
_C.DINO.LOCAL_CROPS_NUMBER = 8  # local crops, student only
_C.DINO.LOCAL_CROP_SIZE = []  # [D, H, W] of local crops; [] = half of DATA.ROI
_C.DINO.GLOBAL_CROP_SCALE = [0.4, 1.0]  # crop volume as a fraction of the head's extent
_C.DINO.LOCAL_CROP_SCALE = [0.05, 0.4]  # same for local crops
_C.DINO.OUT_DIM = 65536  # prototypes of the DINO head
_C.DINO.HEAD_HIDDEN_DIM = 2048  # DINO head MLP width
_C.DINO.HEAD_BOTTLENECK_DIM = 256  # DINO head bottleneck before the weight-normalised layer
_C.DINO.HEAD_BN = False  # BatchNorm in the DINO head's MLP and bottleneck: stops small, uniform sets collapsing
_C.DINO.NORM_LAST_LAYER = True  # fix the norm of the last layer's weights (stabler for ViTs)
_C.DINO.MOMENTUM_TEACHER = 0.996  # EMA momentum at iteration 0, cosine to MOMENTUM_TEACHER_END
_C.DINO.MOMENTUM_TEACHER_END = 1.0
_C.DINO.WARMUP_TEACHER_TEMP = 0.04  # teacher temperature at the start of its warm-up
_C.DINO.TEACHER_TEMP = 0.07  # teacher temperature after warm-up
_C.DINO.WARMUP_TEACHER_TEMP_EPOCHS = 30  # linear teacher-temperature warm-up length
_C.DINO.STUDENT_TEMP = 0.1
_C.DINO.CENTER_MOMENTUM = 0.9  # EMA of the teacher output centre (training steps only)
_C.DINO.FREEZE_LAST_LAYER_EPOCHS = 1  # last head layer frozen this many epochs (avoids early collapse)
_C.DINO.KOLEO_WEIGHT = 0.0  # KoLeo regulariser on student CLS features (DINOv2 uses 0.1)
_C.DINO.IBOT_WEIGHT = 0.0  # iBOT masked-token loss weight (0 = off)
_C.DINO.IBOT_MASK_RATIO = [0.1, 0.5]  # range of masked patch fraction in global student crops
_C.DINO.KNN_EVERY = 0  # epochs between k-NN evaluations on DATA.VAL_CSV (0 = never)
_C.DINO.KNN_K = 20  # neighbours for the k-NN monitor
_C.DINO.KNN_LABEL = "ICH"  # label column of DATA.VAL_CSV scored by the k-NN monitor

# ---------------------------------------------------------------------------------------------
_C.SIMCLR = CN()
_C.SIMCLR.MODE = "inter"  # 'inter' (between scans) | 'intra' (patches of one scan) | 'negative_mined'
_C.SIMCLR.TEMPERATURE = 0.1  # NT-Xent temperature
_C.SIMCLR.CROP_SIZE = []  # [D, H, W] of the views; [] = DATA.ROI
_C.SIMCLR.CROP_SCALE = [0.3, 1.0]  # random resized crop: volume fraction of the source region
# random resized crop: largest per-axis side ratio of a view's box (log-uniform in [1/a, a]); 1 = no
# stretching. In 'inter' mode a head's proportions are part of what tells it from other heads.
_C.SIMCLR.CROP_ASPECT = 4.0 / 3.0
_C.SIMCLR.PATCHES_PER_SCAN = 4  # patches per scan in 'intra' mode
_C.SIMCLR.PROJ_DIM = 128  # projection head output
_C.SIMCLR.PROJ_HIDDEN_DIM = 2048  # projection head hidden width
_C.SIMCLR.ROTATION_WEIGHT = 0.0  # SwinUNETR-style rotation prediction loss weight (0 = off)
_C.SIMCLR.INPAINT_WEIGHT = 0.0  # SwinUNETR-style masked-volume inpainting loss weight (0 = off)
_C.SIMCLR.INPAINT_MASK_RATIO = 0.3  # fraction of the volume dropped for inpainting

# ---------------------------------------------------------------------------------------------
# Alice (Jiang et al. 2023): DINO-style views of the same anatomy in two heads, matched through DATA.TEMPLATE,
# aligned by CASA (one cross-attention block); teacher, centre, schedules and KoLeo come from DINO.*
_C.ALICE = CN()
_C.ALICE.CROSS_SCAN_PROB = 1.0  # probability that a sample's anchor view comes from another scan (else the same)
_C.ALICE.CROP_SCALE = [0.75, 1.25]  # crop side as a factor of DATA.ROI voxels (same physical size in both views)
_C.ALICE.SAME_SCAN_JITTER_MM = 8.0  # same-scan views: the anchor centre moves up to this far (mm, per axis)
_C.ALICE.MASK_RATIO = 0.75  # fraction of the student's patches hidden (block masking)
_C.ALICE.PATCH_WEIGHT = 1.0  # weight of the iBOT-style patch loss on CASA's outputs
_C.ALICE.RECON_WEIGHT = 1.0  # weight of the MSE reconstruction of the masked patches
_C.ALICE.DECODER_DIM = 128  # width of the light reconstruction decoder
_C.ALICE.DECODER_DEPTH = 1  # transformer blocks of the reconstruction decoder

# ---------------------------------------------------------------------------------------------
_C.DOWNSTREAM = CN()
_C.DOWNSTREAM.MODE = "finetune"  # 'finetune' | 'linear' (frozen backbone) | 'fewshot'
_C.DOWNSTREAM.LABELS = ["ICH"]  # label columns (several = multi-label sigmoid heads)
_C.DOWNSTREAM.GROUP_COLUMN = ""  # patient/study column for group-level metrics ('' = none)
_C.DOWNSTREAM.HEAD = "linear"  # 'linear' | 'attentive' (learned query over all tokens)
_C.DOWNSTREAM.HEAD_LR_SCALE = 10.0  # head lr = backbone lr * this when fine-tuning
_C.DOWNSTREAM.IMBALANCE = "pos_weight"  # 'pos_weight' | 'balanced_sampler' | 'none'
_C.DOWNSTREAM.SAMPLES_PER_EPOCH = 0  # samples per epoch (0 = one full pass)
_C.DOWNSTREAM.FEATURE_CACHE = False  # linear mode: extract features once, fit sklearn logistic regression
_C.DOWNSTREAM.FEW_SHOT_K = 8  # positives (and as many negatives) per label and seed
_C.DOWNSTREAM.FEW_SHOT_SEEDS = 5  # number of few-shot draws (seeds SEED .. SEED+N-1)
_C.DOWNSTREAM.FEW_SHOT_BASE = "linear"  # how each few-shot draw is trained: 'linear' | 'finetune'
_C.DOWNSTREAM.BOOTSTRAP = 1000  # bootstrap resamples for AUROC 95% CIs (and Dice / HD95 CIs over cases)
# 'classify' (labels per scan) | 'segment' (a label map per scan from the manifest's mask_path column;
# a decoder around the encoder: docs/downstream.md#segmentation)
_C.DOWNSTREAM.TASK = "classify"
# segmentation: the mask_path label values that become classes 1..K, in this order (others -> background 0)
_C.DOWNSTREAM.SEG_CLASSES = []
# decoder width of the ViT (UNETR-style) and ResNet (U-Net) decoders; Swin's and SegResNet's decoders take
# the encoder's width (MODEL.FEATURE_SIZE) as SwinUNETR and SegResNetDS do. 16 as UNETR's default
_C.DOWNSTREAM.SEG_DECODER_WIDTH = 16
# training crops: probability that a crop is centred on a voxel of a foreground class (drawn uniformly among
# the classes the scan holds; as RandCropByLabelClassesd), else anywhere: small lesions are seen often
_C.DOWNSTREAM.SEG_FOREGROUND_PROB = 0.67
_C.DOWNSTREAM.SEG_OVERLAP = 0.5  # sliding-window inference: overlap of neighbouring DATA.ROI windows (0 <= . < 1)
# sliding-window inference: windows per forward pass. Memory grows with it, speed on a CPU does not: a 200^3 volume
# with swin took 828 s / 4.11 GB at 2 and 878 s / 2.91 GB at 1 (benchmarks/segment_inference.py); raise it on a GPU
_C.DOWNSTREAM.SEG_SW_BATCH = 1


PRESET_WINDOWS = ("brain", "subdural", "stroke", "bone", "soft_tissue")
CHOICES = {
    "DATA.FIT": ("crop_pad", "resize"),
    "DATA.ON_ERROR": ("raise", "skip"),
    "MODEL.NAME": BACKBONES,
    "MODEL.POOL": POOLS,
    "MODEL.POS_EMBED": POS_EMBEDS,
    "MODEL.NORM": NORMS,
    "TRAIN.OPTIMIZER": ("adamw", "sgd"),
    "TRAIN.AMP": ("bf16", "fp16", "none"),
    "TRAIN.ON_NONFINITE": ("stop", "skip"),
    "SIMCLR.MODE": ("inter", "intra", "negative_mined"),
    "DOWNSTREAM.MODE": ("finetune", "linear", "fewshot"),
    "DOWNSTREAM.HEAD": ("linear", "attentive"),
    "DOWNSTREAM.IMBALANCE": ("pos_weight", "balanced_sampler", "none"),
    "DOWNSTREAM.FEW_SHOT_BASE": ("linear", "finetune"),
    "DOWNSTREAM.TASK": ("classify", "segment"),
}
NON_NEGATIVE = ("MODEL.FEATURE_SIZE", "TRAIN.EPOCHS", "TRAIN.WARMUP_EPOCHS", "TRAIN.SAVE_EVERY", "TRAIN.SAVE_MINUTES",
                "TRAIN.CLIP_GRAD", "DATA.NUM_WORKERS", "DATA.TIMEOUT", "DOWNSTREAM.SAMPLES_PER_EPOCH", "TRAIN.BASE_LR",
                "TRAIN.MIN_LR", "TRAIN.WEIGHT_DECAY", "MAE.VIS_EVERY", "DINO.KNN_EVERY",
                "DINO.FREEZE_LAST_LAYER_EPOCHS", "SIMCLR.ROTATION_WEIGHT", "SIMCLR.INPAINT_WEIGHT",
                "DINO.KOLEO_WEIGHT", "DINO.IBOT_WEIGHT", "MONITOR.NUM_SCANS",
                "ALICE.SAME_SCAN_JITTER_MM", "ALICE.PATCH_WEIGHT", "ALICE.RECON_WEIGHT",
                "ALICE.DECODER_DEPTH")
POSITIVE = ("DATA.BATCH_SIZE", "TRAIN.ACCUM_STEPS", "TRAIN.LOG_EVERY", "TRAIN.EVAL_EVERY", "TRAIN.MAX_SKIPPED_STEPS",
            "DOWNSTREAM.FEW_SHOT_K", "DOWNSTREAM.FEW_SHOT_SEEDS", "DINO.GLOBAL_CROPS", "DINO.OUT_DIM",
            "SIMCLR.TEMPERATURE", "SIMCLR.PATCHES_PER_SCAN", "DOWNSTREAM.BOOTSTRAP",
            "DOWNSTREAM.SEG_DECODER_WIDTH", "DOWNSTREAM.SEG_SW_BATCH", "ALICE.DECODER_DIM")
FRACTIONS = ("MAE.MASK_RATIO", "DATA.MAX_BAD_FRACTION", "MODEL.MIN_LOADED_FRACTION",
             "SIMCLR.INPAINT_MASK_RATIO", "DINO.CENTER_MOMENTUM",
             "MONITOR.RANK_WARN_FRACTION", "DOWNSTREAM.SEG_FOREGROUND_PROB",
             "ALICE.CROSS_SCAN_PROB", "ALICE.MASK_RATIO", "DATA.TEMPLATE_MIN_SIMILARITY")


class ConfigError(ValueError):
    """A config key holds a value that cannot work; the message names the key and the value."""


def get_defaults() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def parse_window(spec: str) -> tuple[float, float]:
    """``"center,width"`` -> (center, width); raises ValueError naming the string."""
    parts = str(spec).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"window {spec!r} is neither a preset {PRESET_WINDOWS} nor 'center,width'") from None
    if not width > 0:
        raise ValueError(f"window {spec!r} has width {width}; it must be > 0")
    return center, width


def validate(cfg: CN) -> None:
    """Raise ConfigError naming the key and value of the first contradiction found."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key} = {_get(cfg, key)!r}; expected one of {list(allowed)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} = {_get(cfg, key)!r}; it must be >= 0")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} = {_get(cfg, key)!r}; it must be > 0")
    for key in FRACTIONS:
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key} = {_get(cfg, key)!r}; it must lie in [0, 1]")
    if not cfg.DATA.WINDOWS:
        raise ConfigError("DATA.WINDOWS is empty; give at least one window (one input channel each)")
    for w in cfg.DATA.WINDOWS:
        if w not in PRESET_WINDOWS:
            try:
                parse_window(w)
            except ValueError as e:
                raise ConfigError(f"DATA.WINDOWS: {e}") from None
    for key, n in (("DATA.ROI", 3), ("DATA.SPACING", 3), ("MODEL.PATCH_SIZE", 3)):
        v = _get(cfg, key)
        if len(v) != n or any(x <= 0 for x in v):
            raise ConfigError(f"{key} = {list(v)}; expected {n} positive numbers")
    for key in ("DINO.LOCAL_CROP_SIZE", "SIMCLR.CROP_SIZE"):
        v = _get(cfg, key)
        if len(v) not in (0, 3) or any(x <= 0 for x in v):
            raise ConfigError(f"{key} = {list(v)}; expected [] or 3 positive sizes")
    for key in ("DINO.GLOBAL_CROP_SCALE", "DINO.LOCAL_CROP_SCALE", "SIMCLR.CROP_SCALE",
                "DINO.IBOT_MASK_RATIO"):
        v = _get(cfg, key)
        if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
            raise ConfigError(f"{key} = {list(v)}; expected [low, high] with 0 < low <= high <= 1")
    v = list(cfg.ALICE.CROP_SCALE)
    if len(v) != 2 or not 0 < v[0] <= v[1]:
        raise ConfigError(f"ALICE.CROP_SCALE = {v}; expected [low, high] with 0 < low <= high")
    if not 0 < cfg.ALICE.MASK_RATIO < 1:
        raise ConfigError(f"ALICE.MASK_RATIO = {cfg.ALICE.MASK_RATIO!r}; it must lie in (0, 1): the student needs "
                          "both hidden and visible patches")
    if cfg.SIMCLR.CROP_ASPECT < 1:
        raise ConfigError(f"SIMCLR.CROP_ASPECT = {cfg.SIMCLR.CROP_ASPECT!r}; it must be >= 1 (1 = no stretching)")
    try:
        orientation_axes(cfg.MODEL.INPUT_ORIENTATION)
    except ValueError as e:
        raise ConfigError(f"MODEL.INPUT_ORIENTATION: {e}") from None
    if cfg.MODEL.NAME.startswith("vit_") and cfg.MODEL.INPUT_ORIENTATION.upper() != "RAS":
        raise ConfigError(f"MODEL.INPUT_ORIENTATION = {cfg.MODEL.INPUT_ORIENTATION!r}: ViTs take RAS input only "
                          "(their position table and token grid follow the data's axes)")
    if cfg.MODEL.NAME.startswith("vit_"):
        roi, patch = list(cfg.DATA.ROI), list(cfg.MODEL.PATCH_SIZE)
        if any(r % p for r, p in zip(roi, patch)):
            raise ConfigError(f"DATA.ROI = {roi} is not divisible by MODEL.PATCH_SIZE = {patch}")
    # a run whose optimizer steps all get lr 0 "trains" and saves its random init
    if cfg.TRAIN.WARMUP_EPOCHS > 0 and cfg.TRAIN.WARMUP_EPOCHS >= cfg.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.WARMUP_EPOCHS = {cfg.TRAIN.WARMUP_EPOCHS} covers the whole run (TRAIN.EPOCHS = "
                          f"{cfg.TRAIN.EPOCHS}): the lr would still be warming up from 0 at the last step (with "
                          "one step an epoch, never above 0); use fewer warm-up epochs than epochs")
    if cfg.TRAIN.BASE_LR == 0 and cfg.TRAIN.MIN_LR == 0:
        raise ConfigError("TRAIN.BASE_LR = 0 and TRAIN.MIN_LR = 0: every optimizer step would have lr 0 and the "
                          "run would save its initial weights")
    if not cfg.DOWNSTREAM.LABELS:
        raise ConfigError("DOWNSTREAM.LABELS is empty; name at least one label column")
    if cfg.DOWNSTREAM.FEATURE_CACHE and cfg.DOWNSTREAM.MODE == "finetune":
        raise ConfigError("DOWNSTREAM.FEATURE_CACHE = True needs a frozen backbone, but DOWNSTREAM.MODE = "
                          "'finetune'; use 'linear' (or 'fewshot' with FEW_SHOT_BASE 'linear')")
    if cfg.DOWNSTREAM.TASK == "segment":
        classes = list(cfg.DOWNSTREAM.SEG_CLASSES)
        if not classes or any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in classes) \
                or len(set(classes)) != len(classes):
            raise ConfigError(f"DOWNSTREAM.SEG_CLASSES = {classes}; DOWNSTREAM.TASK segment needs distinct positive "
                              "integer label values of the masks (e.g. [1, 2]); 0 is the background")
        if cfg.DOWNSTREAM.FEATURE_CACHE:
            raise ConfigError("DOWNSTREAM.FEATURE_CACHE = True fits a logistic regression on pooled features; "
                              "DOWNSTREAM.TASK segment trains a decoder (FEATURE_CACHE False)")
        roi = list(cfg.DATA.ROI)
        if cfg.MODEL.NAME == "swin" and any(r % 32 or r < 64 for r in roi):
            raise ConfigError(f"DATA.ROI = {roi}: the Swin segmenter (SwinUNETR's decoder) needs sizes divisible by 32 "
                              "and at least 64 (at 32 its deepest stage is one voxel, which instance normalisation "
                              "cannot normalise)")
        if cfg.MODEL.NAME.startswith("resnet") and any(r % 32 for r in roi):
            raise ConfigError(f"DATA.ROI = {roi}: the ResNet segmenter (a U-Net decoder on its stages) needs sizes "
                              "divisible by 32")
        if not 0 <= cfg.DOWNSTREAM.SEG_OVERLAP < 1:
            raise ConfigError(f"DOWNSTREAM.SEG_OVERLAP = {cfg.DOWNSTREAM.SEG_OVERLAP!r}; it must lie in [0, 1)")


def _load_yaml_with_base(path: str) -> CN:
    """Read a YAML file, first merging the files named by its ``_BASE_`` (str or list), relative to it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} does not hold a mapping of keys")
    bases = data.pop("_BASE_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged = CN(new_allowed=True)
    for base in bases:
        merged = _merge_new(merged, _load_yaml_with_base(os.path.join(os.path.dirname(path), base)))
    return _merge_new(merged, CN(data, new_allowed=True))


def _merge_new(a: CN, b: CN) -> CN:
    for k, v in b.items():
        if isinstance(v, CN) and isinstance(a.get(k), CN):
            _merge_new(a[k], v)
        else:
            a[k] = v
    return a


def _unknown_keys(defaults: CN, other: CN, prefix: str = "") -> list[str]:
    bad = []
    for k, v in other.items():
        full = prefix + k
        if k not in defaults:
            bad.append(full)
        elif isinstance(v, CN):
            if not isinstance(defaults[k], CN):
                bad.append(full)
            else:
                bad.extend(_unknown_keys(defaults[k], v, full + "."))
    return bad


def merge_file(cfg: CN, path: str) -> None:
    """Merge a YAML file (with ``_BASE_`` inheritance) into cfg; unknown keys raise naming them."""
    other = _load_yaml_with_base(path)
    bad = _unknown_keys(cfg, other)
    if bad:
        raise ConfigError(f"unknown config key(s) in {path}: {', '.join(bad)}")
    cfg.merge_from_other_cfg(other)


def merge_opts(cfg: CN, opts: Sequence[str]) -> None:
    """Merge ``KEY VALUE`` pairs; an unknown key or a value of the wrong type raises naming it."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs; got an odd number of items: {opts}")
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            _get(cfg, key)
        except KeyError:
            raise ConfigError(f"unknown config key {key!r} in --opts") from None
        try:
            cfg.merge_from_list([key, value])
        except Exception as e:  # yacs raises ValueError/AssertionError with terse text
            raise ConfigError(f"--opts {key} {value!r}: {e}") from None


def build_parser(description: str) -> argparse.ArgumentParser:
    """The one argument parser shared by all entry scripts: ``--cfg`` and ``--opts`` only."""
    groups = ", ".join(k for k, v in _C.items() if isinstance(v, CN))
    epilog = (f"Config groups: {groups} (plus top-level OUTPUT, SEED). Every key has a comment in "
              "config.py and any key can be set with --opts KEY VALUE, e.g. --opts DATA.BATCH_SIZE 4 "
              "TRAIN.EPOCHS 10. Unknown keys are an error.")
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    parser.add_argument("--cfg", default="", help="YAML file of overrides (may use _BASE_ to inherit)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE pairs overriding the file, e.g. OUTPUT runs/x SEED 1")
    return parser


def get_config(argv: Optional[Sequence[str]] = None, description: str = "",
               parser: Optional[argparse.ArgumentParser] = None) -> CN:
    """Defaults <- --cfg file <- --opts, validated and frozen.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
        description: shown by ``--help``.
        parser: the parser to use (default :func:`build_parser`). Tools that add flags of their
            own parse with it themselves and call :func:`config_from_args`.
    """
    args = (parser or build_parser(description)).parse_args(argv if argv is not None else sys.argv[1:])
    return config_from_args(args)


def config_from_args(args: argparse.Namespace) -> CN:
    """Build the frozen config from a namespace holding ``cfg`` and ``opts``."""
    cfg = get_defaults()
    if args.cfg:
        merge_file(cfg, args.cfg)
    merge_opts(cfg, args.opts or [])
    validate(cfg)
    cfg.freeze()
    return cfg


def save_config(cfg: CN, output_dir: str) -> str:
    """Write the merged config to ``output_dir/config.yaml`` atomically; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(cfg.dump())
    os.replace(tmp, path)
    return path


def load_config(path: str) -> CN:
    """Read a saved ``config.yaml`` back (validated and frozen)."""
    cfg = get_defaults()
    merge_file(cfg, path)
    validate(cfg)
    cfg.freeze()
    return cfg
