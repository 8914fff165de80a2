"""Step `promote`: register the exported model as a version of its model name, then champion/challenger.

A champion is only ever challenged by a model of the same name (project.name) and the same input contract
(InputSpec.same_contract: input shape and class names). A model with the same name and another contract (say,
another data set with the same ten labels) is refused: it belongs under a name of its own (set project.name).

The challenger (this run's model.onnx) and the current champion's model.onnx are both run through ONNX
Runtime on *this run's* test split, so the comparison is on the same images whatever data the champion
was once scored on. Outcomes:

- worse than the champion by more than gate.max_regression: GateFailed, nothing registered or promoted;
- better by at least gate.min_improvement (or no champion yet): registered and promoted to champion;
- otherwise: registered and kept as the challenger, with the numbers that kept it from promotion.

The comparison, the registration and the alias change happen under the registry lock, so the champion
a run beat is still the champion when it takes its place. The alias move is recorded in the registry's event log
(by "pipeline", with this reason and the comparison's numbers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from tuneline.tasks.ship.latency import split_accuracy
from tuneline.core.config.gate import GateConfig
from tuneline.tasks.evaluate.gate import GateFailed, GateVerdict, check_champion_gates, failed
from tuneline.tasks.data.stream import DataAccess, SplitReader
from tuneline.core.errors import StageFailed
from tuneline.tasks.evaluate.report import EvalReport
from tuneline.tasks.ship.export_report import ExportReport
from tuneline.core.onnx_metadata import describe_contract, read_input_spec
from tuneline.core.onnx_session import Device
from tuneline.tasks.ship.registry import Registry
from tuneline.core.registry_layout import MODEL_FILE, VARIANT_FILES
from tuneline.core.registry_reader import sha256_file

log = logging.getLogger(__name__)

CARD_METRICS = ("accuracy", "loss", "n_test", "macro_f1", "ece", "min_class_recall", "per_class")


class PromoteError(StageFailed, RuntimeError):
    """The model cannot be compared with the champion; the message says why and what to do."""


@dataclass(frozen=True)
class PromoteResult:
    version: str
    registered: bool                 # False: this exact model.onnx already was a version; nothing changed
    promoted: bool
    reason: str                      # one line, with the numbers behind the decision
    champion: str | None             # the champion after this step
    verdicts: list[GateVerdict] = field(default_factory=list)   # the champion/challenger gates
    comparison: dict | None = None
    name: str = "model"              # the model name it is registered under
    registered_path: Path | None = None  # the version's model.onnx in the registry



def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _kept_variants(variants_dir: Path | None) -> dict[str, Path]:
    if variants_dir is None:
        return {}
    return {name: Path(variants_dir) / name for name in VARIANT_FILES.values() if (Path(variants_dir) / name).is_file()}


def _compare(registry: Registry, onnx_path: Path, challenger: float, test: SplitReader, cfg: GateConfig,
             device: Device) -> tuple[dict | None, list[GateVerdict]]:
    record = registry.alias("champion")
    if record is None:
        return None, []
    champion_path = registry.model_path(record["version"])  # verified: sha256 of its card, valid ONNX
    ours = read_input_spec(_metadata(onnx_path), str(onnx_path))
    theirs = read_input_spec(_metadata(champion_path), f"champion {record['version']}")
    if not ours.same_contract(theirs):
        raise PromoteError(f"promote: model {registry.name!r}: champion {record['version']} takes "
                           f"{describe_contract(theirs)} but this model takes {describe_contract(ours)}: a champion "
                           "is only challenged by a model of the same input contract; set project.name to register "
                           "this one as a model of its own")
    champion = split_accuracy(champion_path, test, device)
    comparison = {"champion": record["version"], "champion_accuracy": round(champion, 6),
                  "challenger_accuracy": round(challenger, 6), "change": round(challenger - champion, 6),
                  "n_test": len(test)}
    return comparison, check_champion_gates(challenger, champion, cfg)


def run_promote(cfg: GateConfig, registry_dir: Path, onnx_path: Path, prepared_dir: Path, eval_metrics_path: Path,
                export_metrics_path: Path, *, variants_dir: Path | None = None, name: str = "model",
                run_id: str | None = None, device: Device = "cpu", access: DataAccess = DataAccess()) -> PromoteResult:
    """Register `onnx_path` (+ kept variants) as a version of model `name` (project.name) and promote it when it
    beats that model's champion; see the module docstring."""
    registry = Registry(registry_dir, name)
    onnx_path = Path(onnx_path)
    existing = registry.find(sha256_file(onnx_path))
    if existing is not None:
        champion = (registry.alias("champion") or {}).get("version")
        aliases = ", ".join(registry.aliases_of(existing)) or "no alias"
        return PromoteResult(existing, registered=False, promoted=False, champion=champion, name=name,
                             registered_path=registry.layout.version_dir(existing) / MODEL_FILE,
                             reason=f"{onnx_path.name} is already registered as {existing} ({aliases}): unchanged")
    test = SplitReader(prepared_dir, "test", torch.device("cpu"), access)  # resident or streamed: data.resident_max_mb
    test.scoring_stage()
    challenger = split_accuracy(onnx_path, test, device)
    evaluation = EvalReport.read(Path(eval_metrics_path))
    export = ExportReport.read(Path(export_metrics_path))
    metadata = _metadata(onnx_path)
    lineage = {**evaluation.lineage, "params": json.loads(metadata.get("params", "{}"))}
    with registry.locked():
        comparison, verdicts = _compare(registry, onnx_path, challenger, test, cfg, device)
        if failed(verdicts):
            raise GateFailed(verdicts, consequence=f"nothing is registered or promoted; champion "
                                                   f"{comparison['champion']} stays")
        card_metrics = {**evaluation.headline(), **evaluation.details}
        metrics = {**{k: card_metrics[k] for k in CARD_METRICS if k in card_metrics},
                   "onnx_accuracy": round(challenger, 6), "serving": export.serving, "variants": export.variants,
                   "vs_champion": comparison}
        gates = [v.to_dict() for v in (*evaluation.gates, *export.gates, *verdicts)]
        version = registry.register({MODEL_FILE: onnx_path, **_kept_variants(variants_dir)}, name=name,
                                    metrics=metrics, gates=gates, lineage=lineage, run_id=run_id)
        if comparison is None:
            promoted, reason = True, f"{version} promoted to champion: the first model (no champion yet), " \
                                     f"test accuracy {challenger:.4f} on {len(test)} images"
        else:
            improvement = verdicts[1]  # gate.min_improvement
            numbers = (f"test accuracy {challenger:.4f} vs champion {comparison['champion']} "
                       f"{comparison['champion_accuracy']:.4f} on the same {comparison['n_test']} test images "
                       f"(change {improvement.value:+.4f}")
            promoted = improvement.passed
            if promoted:
                reason = f"{version} promoted to champion: {numbers} ≥ gate.min_improvement {cfg.min_improvement:.4f})"
            else:
                reason = (f"{version} kept as challenger, not promoted: {numbers} < gate.min_improvement "
                          f"{cfg.min_improvement:.4f}); champion {comparison['champion']} stays")
        numbers = comparison or {"challenger_accuracy": round(challenger, 6), "n_test": len(test)}
        registry.promote(version, "champion" if promoted else "challenger", by="pipeline", reason=reason,
                         numbers={**numbers, "gate.min_improvement": cfg.min_improvement,
                                  "gate.max_regression": cfg.max_regression})
    log.info("promote: %s", reason)
    champion = (registry.alias("champion") or {}).get("version")
    return PromoteResult(version, registered=True, promoted=promoted, reason=reason, champion=champion,
                         verdicts=verdicts, comparison=comparison, name=name,
                         registered_path=registry.layout.version_dir(version) / MODEL_FILE)
