"""Supervised classification on a backbone: fine-tuning, linear probing, few-shot.

The method (:class:`Classifier`) is what the trainer runs: a backbone plus a head
(:class:`models.heads.LinearClassifier` on pooled features or
:class:`models.heads.AttentiveClassifier` over all tokens / the CNN feature map), one sigmoid
output per label and a masked binary cross-entropy (a blank label excludes that sample for that
label only), with ``pos_weight = n_neg / n_pos`` per label when asked.

With a frozen backbone (linear probing) the freezing is enforced, not hoped for: every backbone
parameter has ``requires_grad=False`` (the optimizer and DDP never see them), the backbone stays in
eval mode (BatchNorm statistics and dropout frozen) even while the method trains, a step raises
when a backbone parameter requires or receives a gradient, and :meth:`Classifier.check_frozen`
compares a SHA-256 of the backbone's whole state dict (parameters and buffers) with the one taken
at construction.

Also here: the training sampler for ``DOWNSTREAM.IMBALANCE balanced_sampler`` and
``DOWNSTREAM.SAMPLES_PER_EPOCH`` (:class:`RandomEpochSampler`), prediction over an eval loader
gathered across ranks (:func:`predict_gathered`), the per-epoch validation scorer for the trainer
(:class:`ValidationScorer`), and the scikit-learn logistic-regression probe on cached features
(:class:`LogisticProbe`).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from engine import dist
from models.heads import AttentiveClassifier, LinearClassifier

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# loss and class balance
def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """Binary cross-entropy over the labelled entries only.

    Args:
        logits: ``[B, L]``.
        target: ``[B, L]`` 1 / 0, NaN = blank (that entry does not count).
        pos_weight: ``[L]`` weight of the positive term per label (None = 1).

    Returns:
        Scalar: the mean over labelled entries (0, still attached to the graph, when there is none).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ in shape")
    known = ~torch.isnan(target)  # [B, L]
    t = torch.where(known, target, torch.zeros_like(target)).to(logits.dtype)
    pw = pos_weight.to(device=logits.device, dtype=logits.dtype) if pos_weight is not None else None
    per = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw, reduction="none")  # [B, L]
    k = known.to(per.dtype)
    return (per * k).sum() / k.sum().clamp_min(1.0)


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per label column of ``labels [N, L]`` (NaN = blank, not counted)."""
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    return (y == 1).sum(axis=0), (y == 0).sum(axis=0)


def compute_pos_weight(labels: np.ndarray, label_names: Sequence[str]) -> torch.Tensor:
    """``n_neg / n_pos`` per label from the training labels.

    Args:
        labels: ``[N, L]`` training targets (NaN = blank).
        label_names: the L names (for the error message).

    Raises:
        ValueError: naming the label when it has no positive or no negative training sample.
    """
    pos, neg = label_counts(labels)
    for name, p, n in zip(label_names, pos, neg):
        if p == 0 or n == 0:
            raise ValueError(f"label {name!r} has {int(p)} positive and {int(n)} negative training samples; "
                             "a classifier needs both (check DOWNSTREAM.LABELS and DATA.TRAIN_CSV)")
    return torch.as_tensor(neg / pos, dtype=torch.float32)


def backbone_checksum(module: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every tensor of ``module.state_dict()``."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenBackboneError(RuntimeError):
    """A backbone that linear probing must keep frozen requires, received or changed a gradient."""


# ---------------------------------------------------------------------------------------------
# the method
class Classifier(nn.Module):
    """Backbone + classification head trained with a masked BCE; a method for the trainer.

    Args:
        backbone: a zoo backbone (``embed_dim``, ``token_dim``, ``forward``, ``forward_features``).
        label_names: the L labels (one sigmoid output each).
        head: 'linear' (:class:`LinearClassifier` on pooled features) or 'attentive'
            (:class:`AttentiveClassifier` over all tokens / the CNN feature map).
        freeze_backbone: linear probing: the backbone is frozen and kept in eval mode.
        pos_weight: ``[L]`` positive-class weights of the loss (None = unweighted).
        head_lr_scale: lr multiplier of the head when the backbone trains too.
    """

    def __init__(self, backbone: nn.Module, label_names: Sequence[str], head: str = "linear",
                 freeze_backbone: bool = False, pos_weight: Optional[torch.Tensor] = None,
                 head_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.label_names = [str(n) for n in label_names]
        if not self.label_names:
            raise ValueError("a classifier needs at least one label")
        n = len(self.label_names)
        self.backbone = backbone
        self.head_type = head
        if head == "linear":
            self.head = LinearClassifier(backbone.embed_dim, n)
        elif head == "attentive":
            self.head = AttentiveClassifier(getattr(backbone, "token_dim", backbone.embed_dim), n)
        else:
            raise ValueError(f"DOWNSTREAM.HEAD = {head!r}; expected 'linear' or 'attentive'")
        self.frozen = bool(freeze_backbone)
        self.head_lr_scale = float(head_lr_scale)
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32).reshape(n)
        # derived from the training labels at construction, so not part of the saved state
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        self.frozen_checksum = ""
        if self.frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
            self.frozen_checksum = backbone_checksum(self.backbone)

    # ------------------------------------------------------------------ modes and hooks
    def train(self, mode: bool = True) -> "Classifier":
        """Set the training mode; a frozen backbone stays in eval mode (BatchNorm stats, dropout)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def lr_scales(self) -> dict[str, float]:
        """Head lr = backbone lr * DOWNSTREAM.HEAD_LR_SCALE when fine-tuning (only the head trains otherwise)."""
        return {} if self.frozen else {"head.": self.head_lr_scale}

    def _assert_no_backbone_grad(self, where: str) -> None:
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                raise FrozenBackboneError(f"{where}: backbone parameter {name} requires grad although the "
                                          "backbone is frozen (linear probing)")
            if p.grad is not None:
                raise FrozenBackboneError(f"{where}: backbone parameter {name} received a gradient although "
                                          "the backbone is frozen (linear probing)")

    def on_step_start(self, it: int, epoch: int, total_iters: int) -> None:
        """Trainer hook: a frozen backbone must not require grad."""
        if self.frozen:
            self._assert_no_backbone_grad(f"iteration {it}")

    def on_after_backward(self, epoch: int) -> None:
        """Trainer hook: a frozen backbone must not have received a gradient."""
        if self.frozen:
            self._assert_no_backbone_grad(f"epoch {epoch} after backward")

    def check_frozen(self) -> None:
        """Raise :class:`FrozenBackboneError` unless a frozen backbone is bit-identical to its start."""
        if not self.frozen:
            return
        self._assert_no_backbone_grad("check")
        now = backbone_checksum(self.backbone)
        if now != self.frozen_checksum:
            raise FrozenBackboneError("the frozen backbone changed during linear probing (state-dict SHA-256 "
                                      f"{self.frozen_checksum[:12]} at the start, {now[:12]} now)")

    # ------------------------------------------------------------------ forward
    def _backbone_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_type == "attentive":
            return self.backbone.forward_features(x)  # ViT [B, T, D] | CNN [B, C', d, h, w]
        return self.backbone(x)  # [B, embed_dim]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head sees: pooled features ``[B, embed_dim]`` (linear head) or tokens / feature map."""
        if self.frozen:
            with torch.no_grad():
                return self._backbone_out(x)
        try:
            return self._backbone_out(x)
        except ValueError as e:
            if "Expected more than 1 value per channel" in str(e):
                raise ValueError(
                    f"{type(self.backbone).__name__} cannot train its BatchNorm on a batch of {x.shape[0]} "
                    f"input(s) of size {list(x.shape[2:])}: a feature map holds one value per channel. Raise "
                    "DATA.BATCH_SIZE above 1, use a larger DATA.ROI, or DOWNSTREAM.MODE linear (BatchNorm "
                    "statistics frozen)") from e
            raise

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> ``[B, L]`` logits."""
        return self.head(self.features(x))

    def forward(self, batch: dict) -> dict:
        """``batch["image"] [B, C, D, H, W]``, ``batch["label"] [B, L]`` (NaN = blank) -> ``{"loss", "labelled"}``."""
        if "label" not in batch:
            raise ValueError("the batch has no 'label': read the manifests with DOWNSTREAM.LABELS as label columns")
        logits = self.logits(batch["image"]).float()  # [B, L]
        target = batch["label"].float()
        loss = masked_bce(logits, target, self.pos_weight)
        return {"loss": loss, "labelled": (~torch.isnan(target)).float().mean().detach()}


def build_classifier(cfg: Any, backbone: nn.Module, train_labels: np.ndarray, frozen: bool) -> Classifier:
    """The :class:`Classifier` a config asks for.

    Args:
        cfg: config (DOWNSTREAM.LABELS, DOWNSTREAM.HEAD, DOWNSTREAM.IMBALANCE, DOWNSTREAM.HEAD_LR_SCALE).
        backbone: the (pretrained) backbone.
        train_labels: ``[N, L]`` training targets (pos_weight and the both-classes check).
        frozen: linear probing.
    """
    names = list(cfg.DOWNSTREAM.LABELS)
    pos_weight = compute_pos_weight(train_labels, names)  # also checks both classes are present
    return Classifier(backbone, names, head=cfg.DOWNSTREAM.HEAD, freeze_backbone=frozen,
                      pos_weight=pos_weight if cfg.DOWNSTREAM.IMBALANCE == "pos_weight" else None,
                      head_lr_scale=cfg.DOWNSTREAM.HEAD_LR_SCALE)


@torch.no_grad()
def average_buffers(method: Classifier) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of the trained parts over ranks.

    DDP does not sync buffers at each forward (``engine.trainer.wrap_ddp``), so each rank's running
    statistics follow its own
    batches; averaging them before every evaluation makes every rank's model (and the saved one)
    the same. A frozen backbone's buffers are identical already and are left untouched.
    """
    world = dist.get_world_size()
    if world == 1:
        return
    for name, buf in method.named_buffers():
        if not buf.is_floating_point() or name == "pos_weight" or (method.frozen and name.startswith("backbone.")):
            continue
        dist.all_reduce_sum(buf)
        buf.div_(world)


# ---------------------------------------------------------------------------------------------
# sampling
def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling probabilities ``[N]`` that give positives and negatives of one label equal mass.

    Rows where the label is blank keep their share ``n_blank / N`` at uniform weight; the rest is
    split half to the positives and half to the negatives.

    Args:
        labels: ``[N]`` targets of the balanced label (1 / 0 / NaN).
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    n = y.size
    pos, neg, blank = y == 1, y == 0, np.isnan(y)
    if not pos.any() or not neg.any():
        raise ValueError(f"balanced sampling needs positives and negatives of the first label; got "
                         f"{int(pos.sum())} positives and {int(neg.sum())} negatives")
    share = 1.0 - blank.sum() / n
    w = np.zeros(n)
    w[pos] = 0.5 * share / pos.sum()
    w[neg] = 0.5 * share / neg.sum()
    w[blank] = 1.0 / n
    return w / w.sum()


class RandomEpochSampler(Sampler):
    """Training sampler with a chosen epoch length, optionally weighted; yields ``(index, epoch)``.

    Every rank draws the same global sequence from ``(seed, epoch)`` and takes every
    ``num_replicas``-th entry from its rank on, so ranks never share a draw within an epoch.
    Unweighted: consecutive random permutations of the dataset (each pass without replacement),
    truncated to ``num_samples``. Weighted: ``num_samples`` draws with replacement.

    Args:
        n: dataset length.
        num_samples: samples per epoch over all ranks (rounded up to a multiple of the ranks).
        weights: ``[n]`` sampling probabilities, or None (uniform, permutation passes).
        seed: base seed.
        num_replicas: ranks (default: the world size).
        rank: this rank (default: the process's rank).
    """

    def __init__(self, n: int, num_samples: int, weights: Optional[np.ndarray] = None, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        if n <= 0 or num_samples <= 0:
            raise ValueError(f"sampler needs a non-empty dataset and num_samples > 0; got n={n}, "
                             f"num_samples={num_samples}")
        self.n, self.seed = int(n), int(seed)
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size()
        self.rank = rank if rank is not None else dist.get_rank()
        self.per_rank = math.ceil(num_samples / self.num_replicas)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            if w.size != n or (w < 0).any() or not w.sum() > 0:
                raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
            self.weights = w / w.sum()
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip this rank's first ``start`` samples (resume)."""
        self.epoch, self.start = int(epoch), int(start)

    def global_indices(self) -> np.ndarray:
        """The epoch's draws over all ranks, ``[per_rank * num_replicas]``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.per_rank * self.num_replicas
        if self.weights is not None:
            return rng.choice(self.n, size=total, replace=True, p=self.weights)
        passes = [rng.permutation(self.n) for _ in range(math.ceil(total / self.n))]
        return np.concatenate(passes)[:total]

    def __iter__(self):
        for i in self.global_indices()[self.rank::self.num_replicas][self.start:]:
            yield (int(i), self.epoch)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def build_train_sampler(cfg: Any, labels: np.ndarray) -> Optional[RandomEpochSampler]:
    """The sampler DOWNSTREAM.IMBALANCE / DOWNSTREAM.SAMPLES_PER_EPOCH ask for (None = the engine's full pass).

    Args:
        cfg: config.
        labels: ``[N, L]`` training targets; ``balanced_sampler`` balances the first label.
    """
    n = len(labels)
    num = int(cfg.DOWNSTREAM.SAMPLES_PER_EPOCH) or n
    if cfg.DOWNSTREAM.IMBALANCE == "balanced_sampler":
        return RandomEpochSampler(n, num, balanced_weights(np.asarray(labels)[:, 0]), seed=cfg.SEED)
    if cfg.DOWNSTREAM.SAMPLES_PER_EPOCH:
        return RandomEpochSampler(n, num, None, seed=cfg.SEED)
    return None


# ---------------------------------------------------------------------------------------------
# prediction and validation
def _autocast(device: torch.device, amp: str):
    dtype = _AMP_DTYPES.get(amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def predict_gathered(fn, loader, n_total: int, device: torch.device, amp: str = "none",
                     allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run ``fn(images) -> [B, K]`` over an eval loader on every rank and gather the rows by index.

    Args:
        fn: e.g. ``method.logits`` or ``backbone`` (called under no_grad and autocast).
        loader: an eval loader (``make_loader(train=False)``: each sample on exactly one rank).
        n_total: rows of the dataset.
        device: where the model is.
        amp: TRAIN.AMP.
        allow_missing: under DATA.ON_ERROR skip, skipped rows have no prediction (else an error).

    Returns:
        ``(index [M], values [M, K] float32)`` sorted by index, each index once, on every rank.
    """
    idx_parts, val_parts = [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with _autocast(device, amp):
            out = fn(images)
        idx_parts.append(np.asarray(batch["index"], dtype=np.int64).reshape(-1))
        val_parts.append(out.float().cpu().numpy().reshape(images.shape[0], -1))
    local = (np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64),
             np.concatenate(val_parts) if val_parts else None)
    gathered = dist.all_gather_object(local)
    index = np.concatenate([g[0] for g in gathered])
    values = np.concatenate([g[1] for g in gathered if g[1] is not None])
    uniq, first = np.unique(index, return_index=True)  # a skipped row's replacement appears twice
    if len(uniq) != len(index) and not allow_missing:
        raise RuntimeError(f"evaluation saw {len(index) - len(uniq)} rows more than once; the eval loader "
                           "must shard without padding (engine.dist.make_loader(train=False))")
    if len(uniq) != n_total and not allow_missing:
        raise RuntimeError(f"evaluation covered {len(uniq)} of {n_total} rows")
    return uniq, values[first]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


class ValidationScorer:
    """The trainer's ``evaluator(method, epoch)``: validation loss and AUROC, ``score`` = macro AUROC.

    Runs on every rank: averages the ranks' BatchNorm statistics, predicts the validation set
    (each sample on one rank), gathers the logits by index, and scores them against the manifest.

    Args:
        loader: validation eval loader.
        labels: ``[N, L]`` validation targets (NaN = blank), in dataset order.
        label_names: the L names.
        amp: TRAIN.AMP.
        allow_missing: DATA.ON_ERROR == 'skip'.
    """

    def __init__(self, loader, labels: np.ndarray, label_names: Sequence[str], amp: str = "none",
                 allow_missing: bool = False) -> None:
        self.loader, self.labels = loader, np.asarray(labels, dtype=np.float64)
        self.names, self.amp, self.allow_missing = list(label_names), amp, allow_missing

    def __call__(self, method: Classifier, epoch: int) -> dict:
        from evaluation.metrics import multilabel_metrics
        average_buffers(method)
        was_training = method.training
        method.eval()
        try:
            device = next(method.parameters()).device
            idx, logits = predict_gathered(method.logits, self.loader, len(self.labels), device, self.amp,
                                           self.allow_missing)
        finally:
            method.train(was_training)
        target = self.labels[idx]
        loss = masked_bce(torch.from_numpy(logits), torch.from_numpy(target).float(), method.pos_weight.cpu()
                          if method.pos_weight is not None else None)
        m = multilabel_metrics(target, sigmoid(logits), self.names, n_bootstrap=0)
        row = {"val_loss": float(loss), "val_auroc_macro": m["macro"]["auroc"]}
        if len(self.names) > 1:
            row.update({f"val_auroc_{n}": m[n]["auroc"] for n in self.names})
        row["score"] = m["macro"]["auroc"]
        return row


# ---------------------------------------------------------------------------------------------
# linear probe on cached features (scikit-learn)
class LogisticProbe:
    """Standardised features -> one L2-regularised logistic regression per label (scikit-learn).

    ``C`` is chosen from a small sweep by validation macro AUROC (ties: the smaller C, i.e. the
    stronger regularisation); without validation data (or without a defined validation AUROC) ``C = 1``.

    Args:
        label_names: the L labels.
        Cs: inverse regularisation strengths to try.
        class_weight: ``"balanced"`` (n_neg / n_pos reweighting, as pos_weight) or None.
        seed: solver seed.
    """

    def __init__(self, label_names: Sequence[str], Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0),
                 class_weight: Optional[str] = "balanced", seed: int = 0) -> None:
        self.names, self.Cs = list(label_names), [float(c) for c in Cs]
        self.class_weight, self.seed = class_weight, int(seed)
        self.C: Optional[float] = None
        self.sweep: list[dict] = []
        self.mean = self.scale = None
        self.coef: Optional[np.ndarray] = None  # [L, D]
        self.intercept: Optional[np.ndarray] = None  # [L]

    def _fit_C(self, x: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.linear_model import LogisticRegression
        coef, intercept = [], []
        for j, name in enumerate(self.names):
            keep = ~np.isnan(y[:, j])
            yj = y[keep, j].astype(np.int64)
            if len(np.unique(yj)) < 2:
                raise ValueError(f"label {name!r} has one class only among the training features "
                                 f"({int(yj.sum())} positives of {yj.size}); a classifier needs both")
            clf = LogisticRegression(C=C, class_weight=self.class_weight, max_iter=5000, random_state=self.seed)
            clf.fit(x[keep], yj)
            coef.append(clf.coef_[0])
            intercept.append(clf.intercept_[0])
        return np.stack(coef), np.asarray(intercept)

    def fit(self, train_x: np.ndarray, train_y: np.ndarray, val_x: Optional[np.ndarray] = None,
            val_y: Optional[np.ndarray] = None) -> "LogisticProbe":
        """Fit on ``train_x [N, D]``, ``train_y [N, L]`` (NaN = blank); choose C on validation when given."""
        from evaluation.metrics import multilabel_metrics
        x = np.asarray(train_x, dtype=np.float64)
        y = np.asarray(train_y, dtype=np.float64).reshape(len(x), -1)
        self.mean = x.mean(axis=0)
        self.scale = x.std(axis=0)
        self.scale[self.scale < 1e-8] = 1.0
        xs = (x - self.mean) / self.scale
        if val_x is None:
            self.C = 1.0
            self.coef, self.intercept = self._fit_C(xs, y, self.C)
            return self
        best = -math.inf
        self.sweep, self.C = [], None
        fits = {}
        for C in self.Cs:
            coef, intercept = fits[C] = self._fit_C(xs, y, C)
            self.coef, self.intercept = coef, intercept
            m = multilabel_metrics(np.asarray(val_y, dtype=np.float64).reshape(len(val_x), -1),
                                   self.predict_proba(val_x), self.names, n_bootstrap=0)
            auc = m["macro"]["auroc"]
            self.sweep.append({"C": C, "val_auroc_macro": auc})
            score = -math.inf if auc is None else auc
            if score > best or self.C is None:
                best, self.C, keep = score, C, (coef, intercept)
        if best == -math.inf:  # validation has one class only: no AUROC to choose by
            self.C = 1.0
            keep = fits.get(self.C) or self._fit_C(xs, y, self.C)
        self.coef, self.intercept = keep
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[N, L]``."""
        if self.coef is None:
            raise RuntimeError("LogisticProbe.fit must run first")
        xs = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return xs @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, L]``."""
        return sigmoid(self.decision_function(x))

    def state_dict(self) -> dict:
        """Tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
        return {"mean": torch.from_numpy(self.mean), "scale": torch.from_numpy(self.scale),
                "coef": torch.from_numpy(self.coef), "intercept": torch.from_numpy(self.intercept),
                "C": self.C, "labels": list(self.names)}
