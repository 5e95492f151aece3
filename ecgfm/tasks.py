"""FineTuneTask: a pretrained backbone + one or more task heads as a LightningModule, driven from YAML recipes."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from ecgfm.adapters import LeadDropout, create_adapter
from ecgfm.backbones import create_backbone
from ecgfm.backbones.registry import InputSpec
from ecgfm.data.shards import atomic_write_text
from ecgfm.distillation import cache_record, head_signature, load_teacher, match_heads, teacher_target
from ecgfm.heads import Head, create_head
from ecgfm.leads import STANDARD_LEADS, lead_indices, parse_leads
from ecgfm.signal import build_preprocessing, to_millivolts

SPLIT_NAMES = ("train", "val", "test")


class FineTuneTask(L.LightningModule):
    """Fine-tune (or linear-probe) a backbone with heads; logs ``{split}/{head}/{metric}``.

    Args:
        backbone: a registered backbone name (``ecgfm list-backbones``).
        pretrained: path of a checkpoint in the backbone's native format (e.g. ECGFounder's ``.pth``), or of a
            FineTuneTask ``.ckpt`` whose backbone starts this model (its heads are left out), or None.
        backbone_kwargs: constructor overrides for the backbone.
        heads: the heads; in YAML each is ``{class_path: ecgfm.heads.MultiLabelHead, init_args: {...}}``.
        preprocessing: name or ``{name: ..., **options}`` of the on-device preprocessing chain; None uses the
            backbone's own (ECGFounder's chain for Net1D).
        finetune: ``full`` trains everything; ``linear_probe`` freezes the backbone (and the lead adapter) and trains
            the heads.
        lr, weight_decay: AdamW settings.
        backbone_lr_scale: the backbone's learning rate is ``lr * backbone_lr_scale`` (lower for pretrained weights).
        scheduler: ``cosine`` (over the whole run), ``plateau`` (on ``monitor``) or ``none``.
        monitor: metric the plateau scheduler follows, e.g. ``val/loss``.
        leads: the leads the model reads from the data, by name or subset (``["I"]``, ``"limb"``); None = the
            backbone's own leads.
        adapter: the lead adapter (``ecgfm.adapters``), a name or ``{name: ..., **options}``; None = ``identity``
            when ``leads`` are the backbone's leads, ``zero_fill`` otherwise.
        lead_dropout: in training, each present lead of each sample is zeroed and masked out with this probability
            (at least one lead is kept), so that one model serves several lead subsets.
        teacher: a fine-tuned FineTuneTask checkpoint to distil from (e.g. a 12-lead model for a lead-I student).
            It is loaded only when fitting (so a student checkpoint reloads without it), frozen, in eval mode, kept
            out of the student's parameters, state_dict and optimizer, and reads its own leads from the batch. Each
            student head with a teacher head of the same name (same kind, target and labels, or an error) adds
            ``distill_weight * head.distillation_loss(student, teacher, distill_temperature)`` to the training
            loss, over every sample, labelled or not; the label loss stays. ``{train,val}/<head>/distill_loss`` are
            logged; ``val/loss`` stays the label loss, comparable with a run without a teacher.
        teacher_cache: read the teacher's outputs from the shards (target ``teacher_<head>``, written by
            ``ecgfm distill-cache``) instead of running it; the cache must come from ``teacher`` (same sha256).
        distill_weight: weight of each head's distillation loss in the training loss.
        distill_temperature: softmax/sigmoid temperature T of the distillation losses (scaled by T^2; not used by
            regression heads).
    """

    def __init__(
        self,
        backbone: str = "net1d-small",
        pretrained: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        heads: list[Head] | None = None,
        preprocessing: str | dict[str, Any] | None = None,
        finetune: Literal["full", "linear_probe"] = "full",
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        backbone_lr_scale: float = 1.0,
        scheduler: Literal["cosine", "plateau", "none"] = "cosine",
        monitor: str = "val/loss",
        leads: str | list[str] | None = None,
        adapter: str | dict[str, Any] | None = None,
        lead_dropout: float = 0.0,
        teacher: str | None = None,
        teacher_cache: bool = False,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
    ):
        super().__init__()
        if teacher_cache and not teacher:
            raise ValueError("teacher_cache needs teacher: the checkpoint that the cached outputs came from")
        if not distill_temperature > 0 or not distill_weight >= 0:
            raise ValueError(
                f"distill_temperature must be > 0 and distill_weight >= 0, got {distill_temperature}, {distill_weight}"
            )
        heads = [create_head(h) for h in (heads or [])]
        if not heads:
            raise ValueError("FineTuneTask needs at least one head (model.heads in the recipe)")
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names must be unique, got {names}")
        self.save_hyperparameters(ignore=["heads"])
        self.hparams["heads"] = [h.config() for h in heads]

        self.backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        self.leads: tuple[str, ...] = parse_leads(list(self.backbone.input_spec.lead_names) if leads is None else leads)
        self.adapter = create_adapter(adapter, self.leads, self.backbone)  # may resize the backbone's first conv
        # Weights the forward pass never reads (kept so released checkpoints load) are frozen: DDP then needs no
        # find_unused_parameters, and the optimizer keeps no state for them.
        for param in getattr(self.backbone, "parameters_unused_by_features", list)():
            param.requires_grad_(False)
        self.lead_dropout = LeadDropout(lead_dropout)
        self.input_spec: InputSpec = self.backbone.input_spec
        self.register_buffer("input_leads", torch.tensor(lead_indices(self.leads, STANDARD_LEADS)), persistent=False)
        self.preprocessing = build_preprocessing(preprocessing or self.input_spec.preprocessing)
        self.heads = nn.ModuleDict({h.name: h for h in heads})
        for head in heads:
            if head.labels is not None:
                head.build(self.backbone.num_features, head.labels)
        self.metrics = nn.ModuleDict()
        self._label_columns: dict[str, list[int] | None] = {}
        self._pretrained_loaded = False
        # The teacher sits in a plain list: not a submodule, so not in state_dict(), parameters() or the optimizer.
        self._teacher: list[FineTuneTask] = []
        self._distill: dict[str, dict[str, Any]] = {}  # matched head -> the teacher head's distillation_reference()
        self._teacher_info: dict[str, Any] | None = None
        if finetune == "linear_probe":
            self.backbone.requires_grad_(False)
            self.adapter.requires_grad_(False)

    # ----------------------------------------------------------------- building from the data
    def setup(self, stage: str) -> None:
        """Give unbuilt heads their label names from the data, and load pretrained weights for a new run."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        specs = getattr(datamodule, "target_specs", {}) if datamodule is not None else {}
        for i, head in enumerate(self.heads.values()):
            if not head.is_built:
                if head.target not in specs:
                    raise KeyError(
                        f"head {head.name!r} learns target {head.target!r}, which the data does not have "
                        f"(targets: {list(specs)})"
                    )
                head.build(self.backbone.num_features, specs[head.target].names)
                self.hparams["heads"][i]["init_args"]["labels"] = head.labels
            elif head.target in specs:
                unknown = [lab for lab in head.labels if lab not in specs[head.target].names]
                if unknown:
                    raise KeyError(
                        f"head {head.name!r}: labels {unknown} are not in target {head.target!r} of the data"
                    )
        self._label_columns = {}
        for name, h in self.heads.items():  # resolved once here, so the training step only indexes
            columns = [specs[h.target].names.index(lab) for lab in h.labels] if h.target in specs else None
            identity = columns is not None and columns == list(range(len(specs[h.target].names)))
            self._label_columns[name] = None if identity else columns
        self._build_metrics()
        restoring = self._trainer is not None and self.trainer.ckpt_path is not None
        if stage == "fit" and not restoring:
            self._fit_head_statistics(datamodule)
        if self.hparams.pretrained and not restoring and not self._pretrained_loaded:
            # weights in the backbone's native layout: the adapter folds e.g. a 12-lead first conv to k leads
            self.backbone.load_pretrained(self.hparams.pretrained, state_filter=self.adapter.adapt_state_dict)
            self._pretrained_loaded = True
        if stage == "fit" and self.hparams.teacher and self._teacher_info is None:
            self._setup_teacher(datamodule, specs)

    def _setup_teacher(self, datamodule: Any, specs: dict[str, Any]) -> None:
        """Load the teacher (or find its cached outputs) and pair its heads with the student's, by name."""
        from ecgfm.zoo import sha256sum

        path = Path(self.hparams.teacher)
        if self.hparams.teacher_cache:
            manifest = getattr(datamodule, "manifest", None)
            if manifest is None:
                raise TypeError("teacher_cache reads the teacher's outputs from the shards: fit with a ShardDataModule")
            root = getattr(datamodule, "root", "")
            record = cache_record(manifest, root)
            if path.is_file():
                digest = sha256sum(path)
                if digest != record["sha256"]:
                    raise ValueError(
                        f"the teacher outputs cached in {root} come from {record['checkpoint']} (sha256 "
                        f"{record['sha256'][:12]}), not from {path} (sha256 {digest[:12]}): the cache is stale; run "
                        f"`ecgfm distill-cache --teacher {path} --root {root}` again"
                    )
            else:
                warnings.warn(
                    f"teacher checkpoint {path} not found: using the outputs cached in {root} from "
                    f"{record['checkpoint']} without checking them against it",
                    stacklevel=2,
                )
                digest = record["sha256"]
            teachers = record["heads"]
            matched = match_heads(self.heads, teachers, f"cached from {record['checkpoint']}")
            missing = [teacher_target(name) for name in matched if teacher_target(name) not in specs]
            if missing:
                raise KeyError(f"the data does not load the cached teacher outputs {missing}: add them to data.targets")
            self._distill = {name: teachers[name].get("reference") or {} for name in matched}
        else:
            teacher = load_teacher(path).to(self.device)
            digest = sha256sum(path)
            matched = match_heads(self.heads, {n: head_signature(h) for n, h in teacher.heads.items()}, str(path))
            self._teacher = [teacher]
            self._distill = {name: teacher.heads[name].distillation_reference() for name in matched}
        self._teacher_info = {
            "checkpoint": str(path),
            "sha256": digest,
            "cached": bool(self.hparams.teacher_cache),
            "heads": matched,
        }

    def _fit_head_statistics(self, datamodule: Any) -> None:
        """Heads that standardise or weight by the training split learn those constants once, before training."""
        heads = [h for h in self.heads.values() if h.uses_statistics and not bool(h.statistics_fitted)]
        if not heads:
            return
        summary_of = getattr(datamodule, "target_summary", None)
        if summary_of is None:
            raise TypeError(f"heads {[h.name for h in heads]} learn from the training split; the datamodule has none")
        summaries: dict[str, Any] = {}
        for head in heads:
            if head.target not in summaries:
                summaries[head.target] = summary_of(head.target)
            names = datamodule.target_specs[head.target].names
            head.fit_statistics(summaries[head.target].select([names.index(lab) for lab in head.labels]))
            head.statistics_fitted.fill_(True)

    def _build_metrics(self) -> None:
        if len(self.metrics):
            return
        for split in SPLIT_NAMES:
            for name, head in self.heads.items():
                self.metrics[f"{split}_{name}"] = head.metrics()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pretrained_loaded = True  # the checkpoint's weights win over the pretrained file in a later setup
        if all(h.is_built for h in self.heads.values()):
            self._build_metrics()

    def train(self, mode: bool = True) -> FineTuneTask:
        super().train(mode)
        if self.hparams.finetune == "linear_probe":
            self.backbone.eval()  # frozen: keep BatchNorm statistics and dropout fixed
            self.adapter.eval()
        for teacher in getattr(self, "_teacher", ()):
            teacher.eval()
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FineTuneTask:
        """``.to()``, ``.cuda()``, ``.half()``, ... move the teacher with the student (it is not a submodule)."""
        super()._apply(fn, *args, **kwargs)
        for teacher in getattr(self, "_teacher", ()):
            teacher._apply(fn, *args, **kwargs)
        return self

    def on_fit_start(self) -> None:
        for teacher in self._teacher:
            teacher.to(self.device)

    # ----------------------------------------------------------------- forward
    def prepare_signal(self, signal: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        """int16 µV [B, 12, T] -> the input leads (float mV, lead dropout in training, preprocessed) -> the adapter.

        Preprocessing runs on the k input leads, before the adapter: the filters are per lead and the z-score
        masked, so for zero_fill this equals preprocessing the zero-filled leads, at k/12 of the cost, and a learned
        adapter's output (missing-lead embedding, projection) is not zeroed by the masked z-score.
        """
        x = to_millivolts(signal) if signal.dtype == torch.int16 else signal.float()
        x, lead_mask = x[:, self.input_leads], lead_mask[:, self.input_leads]
        x, lead_mask = self.lead_dropout(x, lead_mask)
        return self.adapter(self.preprocessing(x, lead_mask), lead_mask)

    def forward(self, signal: Tensor, lead_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Raw batch signal -> ``{head: output}``."""
        if lead_mask is None:
            lead_mask = torch.ones(signal.shape[:2], dtype=torch.bool, device=signal.device)
        x, _ = self.prepare_signal(signal, lead_mask)
        features = self.backbone.forward_features(x)
        return {name: head(features) for name, head in self.heads.items()}

    def _head_targets(self, batch: dict[str, Any], name: str) -> tuple[Tensor, Tensor]:
        head = self.heads[name]
        target, mask = batch["targets"][head.target], batch["target_masks"][head.target]
        columns = self._label_columns.get(name)
        if columns is not None:
            target, mask = target[:, columns], mask[:, columns]
        return target.float(), mask

    def _teacher_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The teacher's raw outputs of the matched heads: cached in the batch, or the teacher run on the full batch."""
        if self.hparams.teacher_cache:
            return {name: batch["targets"][teacher_target(name)] for name in self._distill}
        teacher = self._teacher[0]
        teacher.eval()
        with torch.no_grad():
            outputs = teacher(batch["signal"], batch["lead_mask"])
        return {name: outputs[name] for name in self._distill}

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        outputs = self(batch["signal"], batch["lead_mask"])
        teacher_outputs = self._teacher_outputs(batch) if self._distill and split in ("train", "val") else {}
        total = torch.zeros((), device=self.device)
        batch_size = batch["signal"].shape[0]
        for name, head in self.heads.items():
            target, mask = self._head_targets(batch, name)
            loss = head.loss(outputs[name], target, mask)
            total = total + head.loss_weight * loss
            self.log(f"{split}/{name}/loss", loss, batch_size=batch_size, on_epoch=True, on_step=False)
            head.update_metrics(self.metrics[f"{split}_{name}"], outputs[name].detach(), target, mask)
            if name in teacher_outputs:
                distill = head.distillation_loss(
                    outputs[name], teacher_outputs[name], self.hparams.distill_temperature, self._distill[name]
                )
                self.log(f"{split}/{name}/distill_loss", distill, batch_size=batch_size, on_epoch=True, on_step=False)
                if split == "train":
                    total = total + self.hparams.distill_weight * distill
        self.log(
            f"{split}/loss",
            total,
            batch_size=batch_size,
            on_epoch=True,
            on_step=split == "train",
            prog_bar=True,
        )
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        outputs = self(batch["signal"], batch["lead_mask"])
        predictions: dict[str, Any] = {"record_id": batch["record_id"], "patient_id": batch["patient_id"]}
        for name, head in self.heads.items():
            for key, value in head.postprocess(outputs[name]).items():
                predictions[f"{name}/{key}"] = value.cpu()
        return predictions

    def _log_epoch_metrics(self, split: str) -> None:
        for name, head in self.heads.items():
            metrics = self.metrics[f"{split}_{name}"]
            values = head.compute_metrics(metrics)
            self.log_dict({f"{split}/{name}/{k}": v.float() for k, v in values.items()}, sync_dist=False)
            if split != "train" and not self.trainer.sanity_checking:
                if split == "val":
                    head.calibrate(metrics)
                self._write_tables(split, name, head.tables(metrics))
            metrics.reset()

    def _write_tables(self, split: str, head: str, tables: dict[str, list[dict[str, Any]]]) -> None:
        """``<log dir>/tables/<split>-<head>-<table>.csv``, rewritten each epoch, by the first rank only."""
        log_dir = self.trainer.log_dir  # every rank asks: some loggers broadcast the directory from rank 0
        if not tables or self.trainer.global_rank != 0:
            return
        folder = Path(log_dir or self.trainer.default_root_dir) / "tables"
        folder.mkdir(parents=True, exist_ok=True)
        for table, rows in tables.items():
            if rows:
                text = io.StringIO()
                writer = csv.DictWriter(text, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
                atomic_write_text(folder / f"{split}-{head}-{table}.csv", text.getvalue())

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        new_params = [*self.heads.parameters(), *self.adapter.parameters()]
        groups = [{"params": [p for p in new_params if p.requires_grad], "lr": hp.lr}]
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": hp.lr * hp.backbone_lr_scale})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return {"optimizer": optimizer}
        if hp.scheduler == "plateau":
            mode = "min" if hp.monitor.endswith(("loss", "mae", "rmse")) else "max"
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": hp.monitor}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ecgfm"] = {
            "input_spec": self.input_spec.to_dict(),
            "leads": list(self.leads),
            "adapter": self.adapter.config(),
            "preprocessing": self.preprocessing.config(),
            "heads": {name: {"target": h.target, "labels": h.labels} for name, h in self.heads.items()},
        }
        if self._teacher_info is not None:  # provenance only: the student's weights never need the teacher
            checkpoint["ecgfm"]["teacher"] = self._teacher_info
