"""What one search is: the run's settings, validated once, and the identity a resumed study must keep."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["SearchConfig", "SAMPLERS", "BACKENDS", "PRECISIONS", "default_study_name"]

SAMPLERS = ("tpe", "nsga2", "random")
BACKENDS = ("optuna", "ray")
PRECISIONS = ("auto", "fp32", "bf16")  # of training; search.train.resolve_precision says what auto means


def default_study_name(model: str, dataset: str, budget_mflops: float | None, budget_mparams: float | None,
                       budget_ms: float | None = None, *, data: str = "") -> str:
    """<model>-<dataset>[-<data>]-<budgets>; ``data`` tells apart two image folders (their name and fingerprint)."""
    parts = [model.replace(":", "-").replace(".", "-"), dataset]
    if data:
        parts.append(data)
    if budget_mflops is not None:
        parts.append(f"{budget_mflops:g}mflops")
    if budget_mparams is not None:
        parts.append(f"{budget_mparams:g}mparams")
    if budget_ms is not None:
        parts.append(f"{budget_ms:g}ms")
    return "-".join(parts)


def _positive(name: str, value: float | None, *, allow_none: bool = True, integer: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"--{name} is required")
        return
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--{name} must be a positive {'integer' if integer else 'number'}, got {value:g}")


@dataclass(frozen=True)
class SearchConfig:
    """All settings of a search run (the command line, as one value)."""

    budget_mflops: float | None = None
    budget_mparams: float | None = None
    budget_ms: float | None = None  # ms at batch 1 on the run's device, torch (search.latency_table predicts it)
    model: str = "resnet18"
    dataset: str = "fashion-mnist"
    teacher: Path | None = None
    data_dir: Path | None = None
    trials: int = 16
    timeout: float | None = None
    finetune_steps: int = 150
    teacher_steps: int = 600
    max_train_images: int | None = None
    max_eval_images: int | None = 2000
    val_images: int | None = None  # None: 10% of the training images, at most 5,000 (search.data)
    image_size: int | None = None  # imagefolder only; None there: 64
    weights: str | None = None  # torchvision's pretrained weights for a new teacher (e.g. DEFAULT)
    data_fingerprint: str = ""  # derived: search.data.dataset_fingerprint (imagefolder's files)
    batch_size: int = 32
    sampler: str = "tpe"
    study_name: str = ""
    storage: str | None = None
    out: Path = Path()
    device: str = "auto"
    precision: str = "auto"  # of training (search.train.resolve_precision): auto, fp32 or bf16
    seed: int = 0
    preset: str = "default"
    skip: tuple[str, ...] = ()
    prune_margin: float = 0.10
    long_finetunes: int = 2  # of --trials: the frontier's leaders fine-tuned again, 4x as long (search.study)
    cache_dir: Path | None = None
    workers: int = 1
    backend: str = "optuna"
    ray_address: str | None = None
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0

    def __post_init__(self) -> None:
        if self.budget_mflops is None and self.budget_mparams is None and self.budget_ms is None:
            raise ValueError("give a budget: --budget-mflops X (millions of MACs), --budget-mparams Y and/or "
                             "--budget-ms Z (any combination)")
        _positive("budget-mflops", self.budget_mflops)
        _positive("budget-mparams", self.budget_mparams)
        _positive("budget-ms", self.budget_ms)
        for name in ("trials", "finetune_steps", "teacher_steps", "batch_size", "val_images", "image_size", "workers"):
            value = getattr(self, name)
            if value is None or (name in ("finetune_steps",) and value == 0):
                continue  # None: derived from the data; 0 fine-tune steps: evaluate right after decomposition
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 <= self.long_finetunes <= self.trials:
            raise ValueError(f"--long-finetunes must be in [0, --trials {self.trials}], got {self.long_finetunes}")
        for name in ("max_train_images", "max_eval_images", "timeout"):
            _positive(name.replace("_", "-"), getattr(self, name))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown --sampler {self.sampler!r}: allowed {', '.join(SAMPLERS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown --backend {self.backend!r}: allowed {', '.join(BACKENDS)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"unknown --device {self.device!r}: allowed auto, cpu, cuda (or cuda:N)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}: allowed {', '.join(PRECISIONS)}")
        if not 0 <= self.prune_margin <= 1:
            raise ValueError(f"--prune-margin must be in [0, 1], got {self.prune_margin:g}")
        if self.weights is not None and self.teacher is not None:
            raise ValueError(f"--weights {self.weights} starts a new teacher from torchvision's pretrained weights, "
                             f"--teacher {self.teacher} is a trained one: give one of them")
        if self.dataset == "imagefolder":
            if self.image_size is None:
                from search.data import IMAGE_SIZE
                object.__setattr__(self, "image_size", IMAGE_SIZE)
            if not self.data_fingerprint:
                from search.data import dataset_fingerprint  # a stat per file: before any data is decoded
                object.__setattr__(self, "data_fingerprint", dataset_fingerprint(self.dataset, self.data_dir))
        elif self.image_size is not None:
            raise ValueError(f"--image-size applies to --dataset imagefolder only, not {self.dataset}")
        if not self.study_name:
            data = ""
            if self.data_fingerprint:
                from search.data import default_data_dir
                folder = (self.data_dir or default_data_dir()).expanduser().resolve().name
                data = f"{re.sub(r'[^A-Za-z0-9._]+', '_', folder)}-{self.data_fingerprint[:8]}".lstrip("-_")
            object.__setattr__(
                self, "study_name",
                default_study_name(self.model, self.dataset, self.budget_mflops, self.budget_mparams, self.budget_ms,
                                   data=data),
            )
        if self.out == Path():
            object.__setattr__(self, "out", Path("runs") / self.study_name)

    @property
    def objective(self) -> str:
        """The cost the study minimizes: "mflops" unless only a parameter budget is given (with only an ms budget:
        MACs, the cost that the latency prediction follows most closely)."""
        return "mparams" if self.budget_mparams is not None and self.budget_mflops is None else "mflops"

    @property
    def budget(self) -> dict[str, float]:
        """The budgets as keyword arguments for ``spaces`` (``mflops=``, ``mparams=``, ``ms=``)."""
        out = {}
        if self.budget_mflops is not None:
            out["mflops"] = self.budget_mflops
        if self.budget_mparams is not None:
            out["mparams"] = self.budget_mparams
        if self.budget_ms is not None:
            out["ms"] = self.budget_ms
        return out

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    def identity(self) -> dict[str, Any]:
        """The settings a resumed or joined study must share with the run that created it: what defines the
        space (model, dataset, budget, preset, skip list) and how a trial is evaluated (data split, fine-tune
        length, batch size, seed, which images). The teacher and the space themselves are added by ``search.study``."""
        return {
            "model": self.model, "dataset": self.dataset, "budget_mflops": self.budget_mflops,
            "budget_mparams": self.budget_mparams, "budget_ms": self.budget_ms, "preset": self.preset,
            "skip": list(self.skip),
            "finetune_steps": self.finetune_steps, "batch_size": self.batch_size, "seed": self.seed,
            "max_train_images": self.max_train_images, "max_eval_images": self.max_eval_images,
            **self._data_identity(),
        }

    def _data_identity(self) -> dict[str, Any]:
        """The data's settings beyond its name; keys that older studies lack are only there when set, and
        ``val_images`` once known (``search.run.Prepared`` fills in the default from the data's size)."""
        keys = {"val_images": self.val_images, "weights": self.weights, "data_fingerprint": self.data_fingerprint,
                "image_size": self.image_size}
        return {key: value for key, value in keys.items() if value}

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key, value in doc.items():
            if isinstance(value, Path):
                doc[key] = str(value)
        doc["skip"] = list(self.skip)
        return doc
