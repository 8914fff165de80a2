"""paths: where each stage writes, relative to the project (dvc.yaml templates its paths from these)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from tuneline.core.config.base import Section


@dataclass(frozen=True)
class ProjectPaths:
    """Every path of a project, absolute. Most are one run's stage outputs; a few belong to the project.

    Project-scoped paths (`PROJECT_SCOPED`) accumulate across runs and must be shared by every run of the
    project, wherever a run's outputs are written: the model registry (and its lock), the Optuna study
    storage (continued by every rerun) and the training checkpoints (a crashed run resumes from them).
    """

    raw: Path
    prepared: Path
    model: Path
    history: Path
    metrics: Path
    confusion: Path
    onnx: Path
    summary: Path
    confusion_png: Path
    train_curves_png: Path
    variants: Path
    export_metrics: Path
    tuning: Path
    registry: Path
    checkpoints: Path    # epoch checkpoints of the train stage (resume); next to the model by default
    study_db: Path       # the default SQLite study storage (tune.storage / TUNELINE_TUNE_STORAGE win)

    PROJECT_SCOPED: ClassVar[frozenset[str]] = frozenset({"registry", "checkpoints", "study_db"})

    def run_outputs(self) -> dict[str, Path]:
        """The paths one run writes as its stage outputs (everything not project-scoped)."""
        return {k: v for k, v in vars(self).items() if k not in self.PROJECT_SCOPED}

    def project_scoped(self) -> dict[str, Path]:
        return {k: v for k, v in vars(self).items() if k in self.PROJECT_SCOPED}



class PathsConfig(Section):
    """Where each stage writes, relative to the project folder (dvc.yaml templates its paths from these)."""

    raw: str = Field("data/raw", description="fetched source data (IDX files or class folders), a DVC output")
    prepared: str = Field("data/prepared", description="validated, split uint8 tensors + manifest.json")
    model: str = Field("models/model.pt", description="self-describing checkpoint (model args, config, lineage)")
    history: str = Field("metrics/train_history.csv", description="per-epoch training curve (DVC plot)")
    metrics: str = Field("metrics/eval.json", description="test metrics + gate verdicts (DVC metrics)")
    confusion: str = Field("metrics/confusion.csv", description="actual/predicted pairs (DVC confusion plot)")
    onnx: str = Field("models/model.onnx", description="one self-contained ONNX file with metadata")
    summary: str = Field("reports/run_summary.md", description="the run summary (markdown), also a Prefect artifact")
    confusion_png: str = Field("metrics/confusion.png", description="the confusion matrix as a picture (DVC image plot)")
    train_curves_png: str = Field("metrics/train_curves.png", description="loss and accuracy per epoch as a picture (DVC image plot)")
    variants: str = Field("models/variants", description="kept FP16/INT8 variants + variants.json (each one's accuracy drop, kept or not)")
    export_metrics: str = Field("metrics/export.json", description="parity, latency, throughput, size, variants, serving gates (DVC metrics)")
    tuning: str = Field("tuning", description="tune stage: best_params.json, trials.csv, plots; study.db (the default RDB)")
    registry: str = Field("registry", description="model registry: versions/<id>/ + aliases/ (the server reads it)")

    def resolve(self, root: Path, project: Path | None = None) -> ProjectPaths:
        """Absolute paths (the one place they are joined): a run's outputs under `root`, the project-scoped
        ones under `project` (default `root`): a run in a workspace of its own shares them with the checkout."""
        root, project = Path(root), Path(project if project is not None else root)
        absolute = {name: (root / value).resolve() for name, value in self.model_dump().items()}
        absolute["registry"] = (project / self.registry).resolve()
        return ProjectPaths(**absolute, checkpoints=(project / self.model).resolve().parent / "checkpoints",
                            study_db=(project / self.tuning).resolve() / "study.db")

