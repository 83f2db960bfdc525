"""The methods by name: each pretraining objective, the view its batches come from, its evaluator.

Entry scripts, benchmarks and tests look a method up here instead of wiring class and view by hand::

    method = get_method("dino")
    pretrain(cfg, method.cls, method.build_view, evaluator=method.evaluator(cfg))

Adding a method is one file and one line: its objective in ``methods/<name>.py`` (an ``nn.Module``
built as ``cls(cfg, backbone)`` whose ``forward(batch)`` returns ``{"loss": ...}``, its view in
``data/views/`` when no existing one fits) and its :class:`Method` in :data:`METHODS`.

The downstream job trains a classifier on :data:`DOWNSTREAM_VIEW` (one ROI crop); its model is built
by the job from the labels, so it is not a :class:`Method`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from data.views import AliceViews, DINOViews, SimCLRViews, SingleView
from evaluation.knn import KNNMonitor
from methods.alice import Alice
from methods.dino import DINO
from methods.mae import MAE
from methods.simclr import SimCLR

ViewBuilder = Callable[[Any, bool], Callable]  # (cfg, train) -> view(hu, meta, rng) -> dict
Evaluator = Callable[[nn.Module, int], dict]  # (method, epoch) -> metrics, called by the trainer


def single_view(cfg, train: bool) -> SingleView:
    """One ROI-sized crop: augmented for training, centred and deterministic for evaluation."""
    return SingleView(cfg, train=train)


def dino_views(cfg, train: bool) -> DINOViews:
    """Multi-crop views (training and validation alike); on CUDA the resizing and windowing run
    batched on the GPU (``device_stage`` + ``device_resize``: the workers hand over the head and the
    crop boxes, DINO.forward cuts, resizes and windows them)."""
    cuda = torch.cuda.is_available()
    return DINOViews(cfg, device_stage=cuda, device_resize=cuda)


def simclr_views(cfg, train: bool) -> SimCLRViews:
    """Pairs of views; on CUDA blur, noise, windowing and histogram shift run batched on the GPU
    (``device_stage``: the workers hand over float16 HU views, SimCLR.forward finishes them)."""
    return SimCLRViews(cfg, train=train, device_stage=torch.cuda.is_available())


def alice_views(cfg, train: bool) -> AliceViews:
    """A query crop of a scan and an anchor crop of the same anatomy in another scan of the manifest
    (matched through the DATA.TEMPLATE registrations of the cache), training and validation alike."""
    return AliceViews(cfg)


def knn_monitor(cfg) -> Optional[KNNMonitor]:
    """k-NN AUROC of DINO's teacher features every DINO.KNN_EVERY epochs; None when it is 0."""
    return KNNMonitor(cfg) if cfg.DINO.KNN_EVERY > 0 else None


@dataclass(frozen=True)
class Method:
    """A pretraining method.

    Attributes:
        name: what entry scripts, benchmarks and ``--method`` flags call it.
        cls: the objective, built as ``cls(cfg, backbone)``.
        build_view: ``build_view(cfg, train)``, the view of the training (``True``) and validation sets.
        build_evaluator: ``build_evaluator(cfg)`` -> an :data:`Evaluator` for the trainer, or None.
    """

    name: str
    cls: Callable[[Any, nn.Module], nn.Module]
    build_view: ViewBuilder
    build_evaluator: Optional[Callable[[Any], Optional[Evaluator]]] = None

    def evaluator(self, cfg) -> Optional[Evaluator]:
        """The evaluator this config asks for (None when the method has none or the config turns it off)."""
        return self.build_evaluator(cfg) if self.build_evaluator is not None else None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("mae", MAE, single_view),
    Method("dino", DINO, dino_views, knn_monitor),
    Method("simclr", SimCLR, simclr_views),
    Method("alice", Alice, alice_views, knn_monitor),
)}

DOWNSTREAM_VIEW: ViewBuilder = single_view  # the downstream job's view (fine-tune, linear, few-shot)


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        ValueError: naming the unknown method and the registered ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None
