"""Promotion on live evidence: the server's live window of the challenger, judged by gate.live_*.

The server (`tuneline serve` with serve.challenger shadow or canary) keeps a live window per model and answers it
as JSON at `GET /v2/live/<model>`:

    {"model": "mnist", "mode": "shadow" | "canary" | "off",
     "champion":   {"version": "v0001", "requests": n, "errors": n, "error_rate": x,
                    "latency_ms": {"p50": x, "p99": x}, "mean_confidence": x, "class_counts": {"0": n, ...}},
     "challenger": {...the same, + "agreement": x, "compared": n, "dropped": n,
                    optionally "labelled_accuracy": x, "labelled": n} | null,
     "drift": {"score": x, "threshold": t, "window": n, "drifted": bool}}

`LiveWindow.from_dict` is the one reader of that document here (promote --live and the drift watch use it).

The registry's `challenger` alias becomes champion only when (a) its offline gates held: every blocking gate its
model card records passed (quality, serving cost, no regression vs the champion; gate.min_improvement is the
offline bar that kept it a challenger, and live evidence is what replaces it), (b) the server's window is of
these two versions, and (c) the window meets every gate.live_* threshold. `decide_live` is that decision, a pure
function; `run_live_promote` reads the registry, decides and moves the alias (recorded by "live" in the event log).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tuneline.core.config.gate import GateConfig
from tuneline.core.errors import StageFailed
from tuneline.tasks.evaluate.gate import GateVerdict, gate_max, gate_min
from tuneline.tasks.ship.registry import Registry

log = logging.getLogger(__name__)

MODES = ("shadow", "canary", "off")


class LiveError(StageFailed, RuntimeError):
    """The server's live window could not be read (unreachable, not found, not the /v2/live format)."""


@dataclass(frozen=True)
class VersionWindow:
    """One version's numbers in the server's live window."""

    version: str
    requests: int
    errors: int
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    mean_confidence: float | None = None
    class_counts: dict[str, int] = field(default_factory=dict)
    agreement: float | None = None            # challenger in shadow mode: share of compared requests that agree
    compared: int | None = None
    dropped: int | None = None                # shadow requests dropped because the shadow queue was full
    labelled_accuracy: float | None = None    # on requests that got a feedback label
    labelled: int | None = None

    @classmethod
    def from_dict(cls, data: object, where: str) -> "VersionWindow":
        if not isinstance(data, dict):
            raise LiveError(f"{where}: expected an object, got {str(data)[:60]!r}")
        latency = data.get("latency_ms") or {}
        try:
            return cls(version=str(data["version"]), requests=int(data["requests"]), errors=int(data.get("errors", 0)),
                       error_rate=float(data.get("error_rate", 0.0)), p50_ms=_number(latency.get("p50")),
                       p99_ms=_number(latency.get("p99")), mean_confidence=_number(data.get("mean_confidence")),
                       class_counts={str(k): int(v) for k, v in (data.get("class_counts") or {}).items()},
                       agreement=_number(data.get("agreement")), compared=_integer(data.get("compared")),
                       dropped=_integer(data.get("dropped")), labelled_accuracy=_number(data.get("labelled_accuracy")),
                       labelled=_integer(data.get("labelled")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LiveError(f"{where}: not a live window ({type(exc).__name__}: {exc}): expected version, requests, "
                            "errors, error_rate, latency_ms {p50, p99}") from None


@dataclass(frozen=True)
class DriftWindow:
    score: float
    threshold: float
    window: int
    drifted: bool


@dataclass(frozen=True)
class LiveWindow:
    """The server's /v2/live/<model> summary (module docstring)."""

    model: str
    mode: str
    champion: VersionWindow | None
    challenger: VersionWindow | None
    drift: DriftWindow | None

    @classmethod
    def from_dict(cls, data: object, where: str = "live summary") -> "LiveWindow":
        if not isinstance(data, dict) or "model" not in data:
            raise LiveError(f"{where}: not a /v2/live summary (no 'model'): is the server Tuneline's, with live "
                            "statistics?")
        mode = data.get("mode", "off")
        if mode not in MODES:
            raise LiveError(f"{where}: mode {mode!r}, expected one of {', '.join(MODES)}")
        drift = data.get("drift")
        try:
            drifted = None if not drift else DriftWindow(score=float(drift["score"]), threshold=float(drift["threshold"]),
                                                        window=int(drift.get("window", 0)), drifted=bool(drift["drifted"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LiveError(f"{where}: drift block malformed ({type(exc).__name__}: {exc}): expected score, "
                            "threshold, window, drifted") from None
        champion, challenger = data.get("champion"), data.get("challenger")
        return cls(model=str(data["model"]), mode=mode,
                   champion=None if champion is None else VersionWindow.from_dict(champion, f"{where}: champion"),
                   challenger=None if challenger is None else VersionWindow.from_dict(challenger, f"{where}: challenger"),
                   drift=drifted)


def _number(value) -> float | None:
    return None if value is None else float(value)


def _integer(value) -> int | None:
    return None if value is None else int(value)


def live_url(server: str, model: str) -> str:
    return f"{server.rstrip('/')}/v2/live/{urllib.parse.quote(model, safe='')}"


def read_live(server: str, model: str, token: str | None = None, timeout: float = 10.0) -> LiveWindow:
    """GET the server's live window of `model`; LiveError with what to do when it cannot be had."""
    url = live_url(server, model)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        hint = {404: f"the server serves no model {model!r} or has no live statistics",
                401: "send the server's token (TUNELINE_SERVE_TOKEN)"}.get(exc.code, "see the server's log")
        raise LiveError(f"GET {url}: HTTP {exc.code}: {hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LiveError(f"GET {url}: {reason}: start the server (`tuneline serve`) or name it (--server URL)") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise LiveError(f"GET {url}: the answer is not JSON ({body[:60]!r})") from None
    return LiveWindow.from_dict(data, f"GET {url}")


# --- the decision ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineVerdict:
    held: bool
    reason: str   # "offline gates held (6 blocking)" or which one failed


def offline_verdict(card: dict) -> OfflineVerdict:
    """Whether a version's offline gates held, from its model card: every blocking gate it records passed.

    gate.min_improvement is not blocking (missing it is what keeps a model a challenger) and is not asked for
    here: the live window is the evidence that replaces it. A card that records no gate has no offline evidence."""
    version = card.get("version", "?")
    try:
        verdicts = [GateVerdict.from_dict(g) for g in card.get("gates") or []]
    except TypeError as exc:
        return OfflineVerdict(False, f"{version}'s card records gates in an unknown form ({exc})")
    blocking = [v for v in verdicts if v.blocking]
    if not blocking:
        return OfflineVerdict(False, f"{version}'s card records no offline gates: register it with a run "
                                     "(`tuneline run` or `tuneline models register`)")
    failed = [v for v in blocking if not v.passed]
    if failed:
        return OfflineVerdict(False, f"offline {failed[0].describe()}")
    return OfflineVerdict(True, f"offline gates held ({len(blocking)} blocking)")


def check_live_gates(window: VersionWindow, cfg: GateConfig) -> list[GateVerdict]:
    """The gate.live_* verdicts of the challenger's window; a threshold that is set and a number the window does
    not have fails (the gate cannot be judged), a threshold set to null is not checked."""
    missing = float("nan")  # fails both >= and <=, and prints as nan

    def value(x):
        return missing if x is None else x

    verdicts = [gate_min("gate.live_min_requests", "live requests", window.requests, cfg.live_min_requests)]
    if cfg.live_min_agreement is not None:
        verdicts.append(gate_min("gate.live_min_agreement", "agreement with the champion (shadow)",
                                 value(window.agreement), cfg.live_min_agreement))
    if cfg.live_min_accuracy is not None:
        verdicts.append(gate_min("gate.live_min_accuracy", "accuracy on labelled live requests",
                                 value(window.labelled_accuracy), cfg.live_min_accuracy))
    verdicts.append(gate_max("gate.live_max_error_rate", "live error rate", window.error_rate, cfg.live_max_error_rate))
    verdicts.append(gate_max("gate.live_max_p99_ms", "live p99 latency, ms", value(window.p99_ms), cfg.live_max_p99_ms))
    return verdicts


@dataclass(frozen=True)
class LiveDecision:
    ok: bool
    reason: str                       # one line: what failed or that everything held, with the numbers
    verdicts: list[GateVerdict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)


def _show(v: GateVerdict) -> str:
    if v.name == "gate.live_min_requests":
        return f"requests {v.value:.0f} {'≥' if v.passed else '<'} {v.threshold:.0f}"
    sign = ("≥" if v.passed else "<") if v.direction == "min" else ("≤" if v.passed else ">")
    metric = {"gate.live_min_agreement": "agreement", "gate.live_min_accuracy": "labelled accuracy",
              "gate.live_max_error_rate": "error rate", "gate.live_max_p99_ms": "p99 ms"}[v.name]
    shown = "missing" if v.value != v.value else f"{v.value:.4g}"  # nan: the window lacks the number
    return f"{metric} {shown} {sign} {v.threshold:.4g}"


def decide_live(window: LiveWindow, cfg: GateConfig, offline: OfflineVerdict, champion: str | None,
                challenger: str) -> LiveDecision:
    """Promote `challenger` over `champion` on this live window? (ok, one-line reason, verdicts, numbers)."""
    numbers: dict = {"mode": window.mode, "champion": champion, "challenger": challenger}
    live = window.challenger
    if window.mode == "off" or live is None:
        return LiveDecision(False, f"the server has no live window of a challenger (mode {window.mode}): serve it "
                                   "with serve.challenger shadow or canary first", numbers=numbers)
    if live.version != challenger:
        return LiveDecision(False, f"the server's live window is of {live.version}, the registry's challenger is "
                                   f"{challenger}: wait for the server to load it and gather a new window",
                            numbers=numbers)
    if champion is not None and window.champion is not None and window.champion.version != champion:
        return LiveDecision(False, f"the server's window compares with champion {window.champion.version}, the "
                                   f"registry's champion is {champion}: wait for a window against it",
                            numbers=numbers)
    verdicts = check_live_gates(live, cfg)
    numbers.update({"requests": live.requests, "compared": live.compared, "dropped": live.dropped,
                    "agreement": live.agreement, "labelled_accuracy": live.labelled_accuracy,
                    "labelled": live.labelled, "error_rate": live.error_rate, "p99_ms": live.p99_ms,
                    **{v.name: v.threshold for v in verdicts}})
    shown = ", ".join(_show(v) for v in verdicts)
    failed = [v for v in verdicts if not v.passed]
    if failed:
        names = ", ".join(v.name for v in failed)
        return LiveDecision(False, f"live gate {names} not met ({window.mode}): {shown}; {offline.reason}",
                            verdicts, numbers)
    if not offline.held:
        return LiveDecision(False, f"{offline.reason} ({window.mode}: {shown})", verdicts, numbers)
    return LiveDecision(True, f"live gates held ({window.mode}): {shown}; {offline.reason}", verdicts, numbers)


# --- the step --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LivePromoteResult:
    name: str
    promoted: bool
    reason: str                       # one line with the numbers
    challenger: str | None
    champion: str | None              # the champion after this step
    numbers: dict = field(default_factory=dict)


def run_live_promote(cfg: GateConfig, registry_dir: Path, name: str, window: LiveWindow) -> LivePromoteResult:
    """Promote model `name`'s challenger to champion if `decide_live` says so; the move is recorded by "live".
    The aliases are read and moved under the registry lock, so the versions judged are the versions moved."""
    registry = Registry(Path(registry_dir), name)

    def refused(reason: str, challenger: str | None, champion: str | None, numbers: dict | None = None):
        line = f"{name} {challenger or 'challenger'} not promoted" + (f" (champion {champion} stays)" if champion else "")
        return LivePromoteResult(name, False, f"{line}: {reason}", challenger, champion, numbers or {})

    if window.model != name:
        return refused(f"the live window is of model {window.model!r}, not {name!r}", None, None)
    with registry.locked():
        challenger, champion = registry.alias_version("challenger"), registry.alias_version("champion")
        if challenger is None:
            return refused("the registry has no challenger (a run keeps a model that does not beat the champion as "
                           "challenger; or `tuneline models promote VERSION --alias challenger`)", None, champion)
        if challenger == champion:
            return refused(f"{challenger} is the champion already", challenger, champion)
        decision = decide_live(window, cfg, offline_verdict(registry.card(challenger)), champion, challenger)
        if not decision.ok:
            return refused(decision.reason, challenger, champion, decision.numbers)
        reason = (f"{challenger} promoted to champion on live evidence"
                  + (f" (was {champion})" if champion else "") + f": {decision.reason}")
        registry.promote(challenger, "champion", by="live", reason=reason, numbers=decision.numbers)
    log.info("promote --live: %s", reason)
    return LivePromoteResult(name, True, f"{name} {reason}", challenger, challenger, decision.numbers)
