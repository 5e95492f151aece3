"""FineTuneTask: a pretrained backbone + one or more task heads as a LightningModule, driven from YAML recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ecgfm.adapters import LeadDropout, create_adapter
from ecgfm.backbones import create_backbone
from ecgfm.backbones.config import ContractError, InputContract, ModelConfig
from ecgfm.backbones.precomputed import check_feature_data
from ecgfm.checkpointing import check_lightning_checkpoint
from ecgfm.data.shards import MANIFEST_NAME, Manifest
from ecgfm.evaluation.log_keys import head_key, unit_named_monitor
from ecgfm.evaluation.tables import SplitTables
from ecgfm.finetune.distillation import Distiller
from ecgfm.finetune.peft import BackbonePeft
from ecgfm.finetune.schedule import (
    BlockFreezer,
    check_lr_structure,
    cosine_with_warmup,
    param_groups,
    schedule_callbacks,
    warmup_length,
)
from ecgfm.heads import Head, create_head
from ecgfm.leads import STANDARD_LEADS, lead_indices, parse_leads
from ecgfm.signal import create_preprocessing, to_millivolts

SPLIT_NAMES = ("train", "val", "test")
#: Version of the ``checkpoint["ecgfm"]`` block: 2 stores the backbone's model config and the full input contract.
CONTRACT_VERSION = 2


class FineTuneTask(L.LightningModule):
    """Fine-tune (or linear-probe) a backbone with heads; logs ``{split}/segment/{head}/{metric}`` (per 10-s segment).

    The model's contract (the backbone's model config, the leads, the lead adapter and the preprocessing chain with
    every parameter) is spelled out in the hyper-parameters and in ``checkpoint["ecgfm"]``, and a checkpoint is
    always rebuilt from it (:meth:`on_load_checkpoint`), never from today's defaults. Data whose manifest disagrees
    with it (rate, segment length, leads) is refused when a run sets up (:meth:`check_data`).

    Args:
        backbone: a registered backbone name (``ecgfm list backbones``).
        pretrained: path of a checkpoint in the backbone's native format (e.g. ECGFounder's ``.pth``), or of a
            FineTuneTask ``.ckpt`` whose backbone starts this model (its heads are left out), or None.
        backbone_kwargs: constructor overrides for the backbone (architecture options, ``lead_names``, ``input``).
        heads: the heads; in YAML each is ``{class_path: ecgfm.heads.MultiLabelHead, init_args: {...}}`` or
            ``{kind: multilabel, name: ..., ...}`` (the form checkpoints store).
        preprocessing: name or ``{name: ..., **options}`` of the on-device preprocessing chain; None uses the
            backbone's own, from its model config (ECGFounder's chain for Net1D).
        finetune: ``full`` trains everything; ``linear_probe`` freezes the backbone (and the lead adapter) and trains
            the heads; ``lp_ft`` linear-probes for ``lp_epochs`` epochs, then trains everything (one run, resumable
            in either phase; ``ecgfm.finetune.schedule``).
        lp_epochs: epochs of linear probing of ``lp_ft``.
        lr, weight_decay: AdamW settings.
        backbone_lr_scale: the backbone's learning rate is ``lr * backbone_lr_scale`` (lower for pretrained weights).
        layer_decay: layer-wise learning-rate decay over the backbone's blocks (its model config's ``blocks``): the
            last block trains at ``lr * backbone_lr_scale``, each earlier one at ``layer_decay`` times the next;
            backbone parameters in no block go with the first. None: one rate for the whole backbone.
        warmup_steps: optimizer steps (or a fraction of the run, 0 < f < 1) of linear warm-up before the cosine.
        unfreeze_schedule: gradual unfreezing from the top: ``{epoch: n}`` (from that epoch the last ``n`` blocks
            train, ``all`` for every one) or ``[e1, e2, ...]`` (one more block at each); before the first epoch
            listed only the heads train. Frozen blocks keep BatchNorm and dropout in eval mode.
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
        peft: parameter-efficient fine-tuning (``ecgfm.finetune.peft``, docs/peft.md): ``{method: lora | loha |
            lokr, r: 8, alpha: 16, dropout: 0.0, target: [module names] or a regex}``; the target defaults to the
            backbone family's layers. Only the adapters, heads and lead adapter train; checkpoints hold just those
            plus the sha256 of ``pretrained``, the base weights they need and reload first.
    """

    def __init__(
        self,
        backbone: str = "net1d-small",
        pretrained: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        heads: list[Head | dict[str, Any]] | None = None,
        preprocessing: str | dict[str, Any] | None = None,
        finetune: Literal["full", "linear_probe", "lp_ft"] = "full",
        lp_epochs: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        backbone_lr_scale: float = 1.0,
        layer_decay: float | None = None,
        warmup_steps: int | float = 0,
        unfreeze_schedule: dict[int, int | Literal["all"]] | list[int] | None = None,
        scheduler: Literal["cosine", "plateau", "none"] = "cosine",
        monitor: str = "val/loss",
        leads: str | list[str] | None = None,
        adapter: str | dict[str, Any] | None = None,
        lead_dropout: float = 0.0,
        teacher: str | None = None,
        teacher_cache: bool = False,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        peft: dict[str, Any] | None = None,
    ):
        super().__init__()
        if peft and (finetune == "linear_probe" or not pretrained):
            raise ValueError(
                "peft trains adapters on pretrained backbone weights: it needs model.pretrained (the base weights "
                f"file) and finetune other than linear_probe (got pretrained={pretrained!r}, finetune={finetune!r})"
            )
        monitor, renamed = unit_named_monitor(monitor)
        if renamed:
            rank_zero_warn(f"model.monitor: the loop logs per-segment metrics as {monitor!r}; following that key")
        self.block_freezer = BlockFreezer()  # which backbone blocks the unfreeze schedule (or LP-FT) holds frozen
        if teacher_cache and not teacher:
            raise ValueError("teacher_cache needs teacher: the checkpoint that the cached outputs came from")
        if not distill_temperature > 0 or not distill_weight >= 0:
            raise ValueError(
                f"distill_temperature must be > 0 and distill_weight >= 0, got {distill_temperature}, {distill_weight}"
            )
        heads = [create_head(h) for h in (heads or [])]  # none: the heads of the checkpoint it is evaluated from
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names must be unique, got {names}")
        # The distiller holds the teacher outside the module tree: not in state_dict(), parameters() or the optimizer.
        self.distiller = Distiller(teacher, teacher_cache, distill_weight, distill_temperature) if teacher else None
        self.save_hyperparameters(ignore=["heads"])

        self.lead_dropout = LeadDropout(lead_dropout)
        self._build_input_side(create_backbone(backbone, **(backbone_kwargs or {})), leads, adapter, preprocessing)
        check_lr_structure(self)
        self.heads = nn.ModuleDict({h.name: h for h in heads})
        for head in heads:
            if head.labels is not None:
                head.build(self.backbone.num_features, head.labels)
        self.metrics = nn.ModuleDict()
        #: tables of the last evaluation epoch per split and head; the SplitTables callback writes them
        self.split_tables: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
        self._label_columns: dict[str, list[int] | None] = {}
        self._pretrained_loaded = False
        self._record_contract()

    # ----------------------------------------------------------------- the model contract
    def _build_input_side(
        self,
        backbone: nn.Module,
        leads: str | list[str] | None,
        adapter: str | dict[str, Any] | None,
        preprocessing: str | dict[str, Any] | None,
    ) -> None:
        """Backbone, leads, lead adapter and preprocessing: everything the input contract is made of."""
        native: ModelConfig = backbone.model_config  # before the adapter, which may resize the first convolution
        self.backbone_config = native
        self.backbone = backbone
        self.leads: tuple[str, ...] = parse_leads(list(native.input.lead_names) if leads is None else leads)
        self.adapter = create_adapter(adapter, self.leads, self.backbone)
        # Weights the forward pass never reads (kept so released checkpoints load) are frozen: DDP then needs no
        # find_unused_parameters, and the optimizer keeps no state for them.
        for param in getattr(self.backbone, "parameters_unused_by_features", list)():
            param.requires_grad_(False)
        if self.hparams.finetune == "linear_probe":
            self.backbone.requires_grad_(False)
            self.adapter.requires_grad_(False)
        # peft adapters go into the backbone's layers (after the lead adapter resized them) and freeze the rest of it
        self.peft = BackbonePeft.build(self.hparams.get("peft"), self.backbone)
        self.preprocessing = create_preprocessing(
            native.input.preprocessing if preprocessing is None else preprocessing
        )
        chain = self.preprocessing.config()
        if "fs" in chain and float(chain["fs"]) != native.input.fs:
            raise ContractError(
                f"preprocessing {chain['name']!r} is set for {float(chain['fs']):g} Hz but the backbone "
                f"{native.name!r} reads {native.input.fs:g} Hz"
            )
        self.input_contract = InputContract(
            native.input.fs, native.input.n_samples, self.leads, native.input.units, chain
        )
        self.use_data_leads(STANDARD_LEADS)

    def use_data_leads(self, data_leads: tuple[str, ...] | list[str]) -> None:
        """Take the model's leads, by name, from batches whose signal holds ``data_leads`` in this order."""
        self.data_leads = tuple(data_leads)
        old = getattr(self, "input_leads", None)
        device = old.device if isinstance(old, Tensor) else None
        index = torch.tensor(lead_indices(self.leads, self.data_leads), device=device)
        self.register_buffer("input_leads", index, persistent=False)

    def _record_contract(self) -> None:
        """Hyper-parameters spelled out as built, so a checkpoint's hyper-parameters never depend on defaults."""
        self.hparams["backbone"] = self.backbone_config.name
        self.hparams["backbone_kwargs"] = {
            **self.backbone_config.architecture,
            "input": self.backbone_config.input.to_dict(),
        }
        self.hparams["leads"] = list(self.leads)
        self.hparams["adapter"] = self.adapter.config()
        self.hparams["preprocessing"] = self.preprocessing.config()
        self.hparams["heads"] = [h.config() for h in self.heads.values()]
        self.hparams["peft"] = None if self.peft is None else self.peft.spec.to_dict()

    def contract(self) -> dict[str, Any]:
        """What every checkpoint stores in ``checkpoint["ecgfm"]`` and loading rebuilds the model from."""
        out = {
            "version": CONTRACT_VERSION,
            "backbone": self.backbone_config.to_dict(),
            "input": self.input_contract.to_dict(),
            "adapter": self.adapter.config(),
            "heads": {name: h.config() for name, h in self.heads.items()},
        }
        if self.distiller is not None and self.distiller.info is not None:
            out["teacher"] = self.distiller.info  # provenance only: the student's weights never need the teacher
        if self.peft is not None:
            out["peft"] = self.peft.stored()  # the adapters and the base weights (file, sha256) they need
        return out

    def check_data(self, manifest: Manifest, source: str | Path) -> None:
        """Refuse data whose rate, segment length or leads disagree with the model; read its leads by name.

        Raises:
            ContractError: one line naming the data (``source``) and the model.
        """
        if check_feature_data(self.backbone, manifest, source):  # `ecgfm embed` features: size and model checked
            return
        self.input_contract.check_data(
            manifest.fs,
            manifest.n_samples,
            manifest.lead_names,
            str(source),
            repr(self.backbone_config.name),
            self.leads,
        )
        self.use_data_leads(tuple(lead.strip() for lead in manifest.lead_names))

    def _check_datamodule(self, datamodule: Any) -> None:
        manifest = getattr(datamodule, "manifest", None)
        if isinstance(manifest, Manifest):
            self.check_data(manifest, Path(getattr(datamodule, "root", ".")) / MANIFEST_NAME)
        if hasattr(datamodule, "use_image_model"):  # image files: pages at the model's size, its preprocessing
            if not hasattr(self.backbone, "forward_page_features"):
                raise ContractError(
                    f"the data are image files ({getattr(datamodule, 'root', '?')}) but the backbone "
                    f"{self.backbone_config.name!r} reads signals; use an image-* backbone (ecgfm list backbones)"
                )
            if self.distiller is not None:
                raise ContractError("distillation reads signals; it does not run on image files")
            datamodule.use_image_model(self.backbone.page_size, self.backbone.image_preprocessing.config())

    @classmethod
    def load_frozen(cls, path: str | Path) -> FineTuneTask:
        """A checkpoint on the CPU, frozen and in eval mode, as a teacher is used (its own teacher is never loaded)."""
        path = Path(path)
        check_lightning_checkpoint(path)  # one line naming the file for a missing, corrupt or unsafe one
        model = cls.load_from_checkpoint(path, map_location="cpu", teacher=None, teacher_cache=False)
        model.requires_grad_(False)
        return model.eval()

    # ----------------------------------------------------------------- building from the data
    def setup(self, stage: str) -> None:
        """Check the data against the model and its heads, give unbuilt heads their labels, load pretrained weights."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self._check_datamodule(datamodule)
        if not self.heads:
            return  # evaluating a checkpoint's own heads: on_load_checkpoint builds them (checked when a loop starts)
        restoring = self._trainer is not None and self.trainer.ckpt_path is not None
        self._setup_heads(datamodule, stage)
        if stage == "fit" and not restoring:
            self._fit_head_statistics(datamodule)
        if self.hparams.pretrained and not restoring and not self._pretrained_loaded:
            # weights in the backbone's native layout: the adapter folds e.g. a 12-lead first conv to k leads
            if self.peft is not None:  # into the layers under the adapters, recording the file's sha256
                self.peft.load_base(self.hparams.pretrained, self.adapter.adapt_state_dict)
            else:
                self.backbone.load_pretrained(self.hparams.pretrained, state_filter=self.adapter.adapt_state_dict)
            self._pretrained_loaded = True
        if stage == "fit" and self.distiller is not None:
            specs = getattr(datamodule, "target_specs", {}) if datamodule is not None else {}
            self.distiller.setup(self.heads, datamodule, list(specs), type(self).load_frozen)

    def _setup_heads(self, datamodule: Any, stage: str | None) -> None:
        """Check each head against its target in the data (present, of a kind it can learn, with its labels), give
        unbuilt heads their label names, and resolve each head's columns once, so the training step only indexes.

        ``predict`` needs no targets: a folder of new recordings may have none.
        """
        specs = getattr(datamodule, "target_specs", None) if datamodule is not None else None
        specs = specs or {}
        needs_targets = datamodule is not None and stage != "predict"
        for head in self.heads.values():
            spec = specs.get(head.target)
            if spec is None:
                if needs_targets or not head.is_built:
                    raise KeyError(
                        f"head {head.name!r} learns target {head.target!r}, which the data does not have "
                        f"(its targets: {', '.join(specs) or 'none'})"
                    )
                continue
            if head.target_kinds and spec.kind not in head.target_kinds:
                raise ContractError(
                    f"head {head.name!r} is a {head.kind} head, which learns {' or '.join(head.target_kinds)} "
                    f"targets, but its target {head.target!r} is {spec.kind}; use a head of that kind"
                )
            if not head.is_built:
                head.build(self.backbone.num_features, spec.names)
            unknown = [lab for lab in head.labels if lab not in spec.names]
            if unknown:
                raise KeyError(f"head {head.name!r}: labels {unknown} are not in target {head.target!r} of the data")
        self.hparams["heads"] = [h.config() for h in self.heads.values()]
        self._label_columns = {}
        for name, h in self.heads.items():
            columns = [specs[h.target].names.index(lab) for lab in h.labels] if h.target in specs else None
            identity = columns is not None and columns == list(range(len(specs[h.target].names)))
            self._label_columns[name] = None if identity else columns
        self._build_metrics()

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
        """Rebuild backbone, leads, adapter and preprocessing from what the checkpoint stores, never from defaults.

        A model built from a recipe (``ecgfm test --ckpt_path``) whose contract differs is rebuilt, with a warning
        that names the difference; its data is checked again against the checkpoint's contract.
        """
        self._pretrained_loaded = True  # the checkpoint's weights win over the pretrained file in a later setup
        stored = checkpoint.get("ecgfm") or {}
        if stored.get("version") == CONTRACT_VERSION:
            self._rebuild_from(stored)
        elif "preprocessing" in stored:  # a checkpoint from before model configs: its chain, leads and adapter
            self._rebuild_from(
                {
                    "backbone": self.backbone_config.to_dict(),
                    "input": {**self.input_contract.to_dict(), "lead_names": stored.get("leads", list(self.leads))},
                    "adapter": stored.get("adapter", self.adapter.config()),
                    "legacy_preprocessing": stored["preprocessing"],
                }
            )
        if stored.get("version") == CONTRACT_VERSION:
            self._heads_from(stored["heads"])
        if self.heads and all(h.is_built for h in self.heads.values()):
            self._build_metrics()
        if self.peft is not None:  # the checkpoint holds the adapters: the base weights come from their file first
            self.peft.base = (stored.get("peft") or {}).get("base")
            source = str(self.trainer.ckpt_path) if self._trainer is not None and self.trainer.ckpt_path else None
            state, pretrained = checkpoint["state_dict"], self.hparams.pretrained
            self.peft.restore_base(state, self.adapter.adapt_state_dict, pretrained, source or "the checkpoint")

    def _heads_from(self, stored: dict[str, dict[str, Any]]) -> None:
        """The checkpoint's heads when the recipe names none; else the recipe's, which must be the checkpoint's."""
        if not self.heads:
            heads = [create_head(config) for config in stored.values()]
            for head in heads:
                head.build(self.backbone.num_features, head.labels)
            self.heads = nn.ModuleDict({h.name: h for h in heads})
            self.hparams["heads"] = [h.config() for h in heads]
            if self._trainer is not None:  # the trainer's setup ran before the checkpoint was read
                self._setup_heads(getattr(self.trainer, "datamodule", None), self.trainer.state.fn)
            return
        check_recipe_heads(list(self.heads.values()), stored)

    def _rebuild_from(self, stored: dict[str, Any]) -> None:
        backbone = ModelConfig.from_dict(stored["backbone"])
        contract = dict(stored["input"])
        chain = stored.get("legacy_preprocessing", contract["preprocessing"])
        differences = []
        if (backbone.architecture, backbone.input) != (self.backbone_config.architecture, self.backbone_config.input):
            differences.append(
                f"backbone {backbone.name} {backbone.architecture} (recipe: {self.backbone_config.name})"
            )
        if list(contract["lead_names"]) != list(self.leads):
            differences.append(f"leads {contract['lead_names']} (recipe: {list(self.leads)})")
        if stored["adapter"] != self.adapter.config():
            differences.append(f"adapter {stored['adapter']} (recipe: {self.adapter.config()})")
        if chain != self.preprocessing.config():
            differences.append(f"preprocessing {chain} (recipe: {self.preprocessing.config()})")
        peft = {k: v for k, v in (stored.get("peft") or {}).items() if k != "base"} or None
        if peft != self.hparams.get("peft"):
            differences.append(f"peft {peft} (recipe: {self.hparams.get('peft')})")
        if not differences:
            return
        if self._trainer is not None and self.trainer.strategy.restore_checkpoint_after_setup:
            raise ContractError(
                f"the checkpoint's model differs from the recipe's ({'; '.join(differences)}) and this strategy "
                "restores checkpoints after wrapping the model: set the recipe to the checkpoint's values"
            )
        rank_zero_warn(
            f"using the checkpoint's model contract, which differs from the recipe's: {'; '.join(differences)}"
        )
        data_leads = self.data_leads
        self.hparams["peft"] = peft
        self._build_input_side(create_backbone(backbone), contract["lead_names"], stored["adapter"], chain)
        self.use_data_leads(data_leads)
        for head in self.heads.values():
            if head.is_built and head.in_features != self.backbone.num_features:
                head.build(self.backbone.num_features, head.labels)
        self._record_contract()
        if self._trainer is not None:
            self._check_datamodule(getattr(self.trainer, "datamodule", None))

    def train(self, mode: bool = True) -> FineTuneTask:
        super().train(mode)
        if self.hparams.finetune == "linear_probe":
            self.backbone.eval()  # frozen: keep BatchNorm statistics and dropout fixed
            self.adapter.eval()
        self.block_freezer.eval_frozen()  # blocks that the unfreeze schedule (or LP-FT's probe phase) holds frozen
        if getattr(self, "peft", None) is not None:
            self.peft.freeze_statistics()  # BatchNorm statistics belong to the frozen base weights
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Lightning sets each submodule's mode itself (at fit start, after every validation) without calling
        :meth:`train`: re-apply it, so a frozen backbone (linear probe, peft base, frozen blocks) keeps its BatchNorm
        statistics and dropout fixed instead of training on batch statistics."""
        frozen = self.hparams.finetune == "linear_probe" or getattr(self, "peft", None) is not None
        if frozen and (self.backbone.training or self.adapter.training and self.hparams.finetune == "linear_probe"):
            self.train(True)

    def _require_heads(self) -> None:
        if not self.heads:
            raise ValueError(
                "FineTuneTask needs at least one head: model.heads in the recipe (only test, validate and predict "
                "with --ckpt_path can leave them out, to evaluate the checkpoint's own heads)"
            )

    def on_fit_start(self) -> None:
        self._require_heads()
        if self.peft is not None:  # how many parameters train, and their share: the point of peft
            self.peft.report(self, self.loggers)

    def on_validation_start(self) -> None:
        self._require_heads()

    def on_test_start(self) -> None:
        self._require_heads()

    def on_predict_start(self) -> None:
        self._require_heads()

    def configure_callbacks(self) -> list[L.Callback]:
        """The per-split tables (per-label AUROC, per-lab errors, ...) go to CSV files after each evaluation; an
        unfreeze schedule or LP-FT freezes and unfreezes backbone blocks by epoch."""
        return [SplitTables(), *schedule_callbacks(self)]

    # ----------------------------------------------------------------- forward
    def prepare_signal(self, signal: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        """int16 µV [B, L_data, T] -> the input leads (float mV, lead dropout in training, preprocessed) -> the adapter.

        Preprocessing runs on the k input leads, before the adapter: the filters are per lead and the z-score
        masked, so for zero_fill this equals preprocessing the zero-filled leads, at k/12 of the cost, and a learned
        adapter's output (missing-lead embedding, projection) is not zeroed by the masked z-score.
        """
        if getattr(self.backbone, "reads_features", False):  # `ecgfm embed` features [B, D]: no leads, no filters
            return signal, lead_mask
        if (
            signal.dim() != 3
            or signal.shape[1] != len(self.data_leads)
            or signal.shape[-1] != self.input_contract.n_samples
        ):
            raise ContractError(
                f"a batch of shape {tuple(signal.shape)} reached the model {self.backbone_config.name!r}, which reads "
                f"[batch, {len(self.data_leads)} leads ({', '.join(self.data_leads)}), "
                f"{self.input_contract.n_samples} samples at {self.input_contract.fs:g} Hz]"
            )
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

    def forward_images(self, image: Tensor) -> dict[str, Tensor]:
        """Pages ``[B, 3, H, W]`` in [0, 1] (image files through the backbone's image preprocessing) -> outputs."""
        features = self.backbone.forward_page_features(image)
        return {name: head(features) for name, head in self.heads.items()}

    def _batch_outputs(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], int]:
        """``({head: output}, batch size)`` of a batch of signals or, from image files, of pages."""
        if "image" in batch:
            return self.forward_images(batch["image"]), batch["image"].shape[0]
        return self(batch["signal"], batch["lead_mask"]), batch["signal"].shape[0]

    def _head_targets(self, batch: dict[str, Any], name: str) -> tuple[Tensor, Tensor]:
        head = self.heads[name]
        target, mask = batch["targets"][head.target], batch["target_masks"][head.target]
        columns = self._label_columns.get(name)
        if columns is not None:
            target, mask = target[:, columns], mask[:, columns]
        return target.float(), mask

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        outputs, batch_size = self._batch_outputs(batch)
        distiller = self.distiller
        distilling = distiller is not None and distiller.heads and split in ("train", "val")
        teacher_outputs = distiller.outputs(batch) if distilling else {}
        total = torch.zeros((), device=self.device)
        for name, head in self.heads.items():
            target, mask = self._head_targets(batch, name)
            loss = head.loss(outputs[name], target, mask)
            total = total + head.loss_weight * loss
            self.log(head_key(split, name, "loss"), loss, batch_size=batch_size, on_epoch=True, on_step=False)
            head.update_metrics(self.metrics[f"{split}_{name}"], outputs[name].detach(), target, mask)
            if name in teacher_outputs:
                distill = distiller.loss(head, outputs[name], teacher_outputs[name])
                self.log(
                    head_key(split, name, "distill_loss"), distill, batch_size=batch_size, on_epoch=True, on_step=False
                )
                if split == "train":
                    total = total + distiller.weight * distill
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
        outputs, _ = self._batch_outputs(batch)
        predictions: dict[str, Any] = {"record_id": batch["record_id"], "patient_id": batch["patient_id"]}
        for name, head in self.heads.items():
            for key, value in head.postprocess(outputs[name]).items():
                predictions[f"{name}/{key}"] = value.cpu()
        return predictions

    def _log_epoch_metrics(self, split: str) -> None:
        tables = {}
        for name, head in self.heads.items():
            metrics = self.metrics[f"{split}_{name}"]
            values = head.compute_metrics(metrics)
            self.log_dict({head_key(split, name, k): v.float() for k, v in values.items()}, sync_dist=False)
            if split != "train" and not self.trainer.sanity_checking:
                if split == "val":
                    head.calibrate(metrics)
                tables[name] = head.tables(metrics)
            metrics.reset()
        if tables:
            self.split_tables[split] = tables

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self)  # per block with layer_decay; blocks a schedule freezes are in them from the start
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return {"optimizer": optimizer}
        if hp.scheduler == "plateau":
            mode = "min" if hp.monitor.endswith(("loss", "mae", "rmse")) else "max"
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": hp.monitor}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = cosine_with_warmup(optimizer, total, warmup_length(hp.get("warmup_steps", 0), total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ecgfm"] = self.contract()
        if self.peft is not None:  # adapters, heads, lead adapter: the frozen base weights stay in their file
            checkpoint["state_dict"] = self.peft.strip(checkpoint["state_dict"])

    def merge_peft(self) -> FineTuneTask:
        """Fold the peft adapters into the backbone's weights (peft's ``merge_and_unload``), in place: a plain model
        from then on, with the same outputs, whose checkpoints hold every weight (publishing merges on its own)."""
        if self.peft is not None:
            self.peft.merge()
            self.peft = None
            self.hparams["peft"] = None
        return self

    def save_pretrained(self, folder: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Publish this model as a folder (``config.yaml`` + ``model.safetensors`` + ``labels.json`` + ``card.md``)
        that ``ecgfm.load(folder)`` reads back with no pickle and no training code."""
        from ecgfm.pretrained import ECGModel  # the published model holds heads and backbone, as this task does

        return ECGModel.from_task(self, card).save_pretrained(folder)


def check_recipe_heads(recipe: list[Head | dict[str, Any]], stored: dict[str, dict[str, Any]]) -> None:
    """Refuse a recipe whose heads are not the checkpoint's (``stored``: ``checkpoint["ecgfm"]["heads"]``), listing
    both: evaluating a checkpoint with other heads would report numbers of a model nobody trained."""
    heads = [create_head(h) for h in recipe]
    differences = _head_differences({h.name: h.config() for h in heads}, stored)
    if differences:
        raise ContractError(
            f"the recipe's heads differ from the checkpoint's ({'; '.join(differences)}); leave model.heads out "
            f"of the recipe to evaluate the checkpoint's own heads ({_describe_heads(stored)})"
        )


def _describe_heads(configs: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{name}: {c.get('kind')} on {c.get('target')!r} with {len(c.get('labels') or [])} labels"
        for name, c in configs.items()
    )


def _head_differences(recipe: dict[str, dict[str, Any]], stored: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between two sets of head configs: names, then per head every argument both record."""
    if set(recipe) != set(stored):
        return [f"heads {sorted(recipe)} in the recipe, {sorted(stored)} in the checkpoint"]
    out = []
    for name, mine in recipe.items():
        theirs = stored[name]
        for key in sorted(set(mine) & set(theirs)):
            if key == "labels" and mine[key] is None:
                continue
            if mine[key] != theirs[key]:
                shown = (
                    f"{len(v)} labels" if key == "labels" and len(v or []) > 6 else repr(v)
                    for v in (mine[key], theirs[key])
                )
                out.append(f"{name}.{key}: {next(shown)} in the recipe, {next(shown)} in the checkpoint")
    return out
