"""Benchmark: SST-2 sentiment, Tuneline's text recipe vs a bag-of-bigrams logistic regression, side by side.

Both read the same prepared data: the GLUE SST-2 release in ../shared/data/sst2 fetched and prepared by Tuneline's
own stages (train.tsv less a validation share, dev.tsv as the test split: 872 sentences).

(a) baseline: scikit-learn's CountVectorizer over word unigrams and bigrams (binary counts) and LogisticRegression
    (C chosen on the validation split from 0.25, 1, 4), the classic linear reference for SST-2 (about 80-82% on dev);
(b) Tuneline: the `sst2` example's model and training recipe (flows/init.py EXAMPLES["sst2"]) through run_train,
    with seeds given by --seeds.

Printed: each arm's test accuracy and seconds (fit or train, on this machine's cores), Tuneline's median over the
seeds, and the ratio of accuracies. `--json PATH` writes the numbers.

    python bench/bench_text.py                       # 3 seeds
    python bench/bench_text.py --seeds 0 --limit-train 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def example_overrides() -> dict:
    """The sst2 example's params as dotted overrides (what `tuneline init --example sst2` writes)."""
    from tuneline.flows.init import EXAMPLES

    flat = {}
    for section, values in EXAMPLES["sst2"].items():
        if section in ("project", "tune", "gate"):
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def baseline(texts: dict[str, list[str]], labels: dict[str, list[int]]) -> dict:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    vectorizer = CountVectorizer(ngram_range=(1, 2), binary=True, token_pattern=r"(?u)\b\w+\b|[^\w\s]")
    train = vectorizer.fit_transform(texts["train"])
    best = None
    for c in (0.25, 1.0, 4.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(train, labels["train"])
        val = model.score(vectorizer.transform(texts["val"]), labels["val"])
        if best is None or val > best[0]:
            best = (val, c, model)
    val, c, model = best
    accuracy = model.score(vectorizer.transform(texts["test"]), labels["test"])
    return {"test_accuracy": round(float(accuracy), 4), "val_accuracy": round(float(val), 4), "C": c,
            "features": len(vectorizer.vocabulary_), "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="Tuneline's seeds (none: the baseline alone, beside `tuneline run`'s own numbers)")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import numpy as np

    from tuneline.core.config.params import build_params
    from tuneline.tasks.data.fetch import run_fetch
    from tuneline.tasks.data.prepare import run_prepare
    from tuneline.tasks.data.shards import SplitShards
    from tuneline.tasks.evaluate.evaluate import run_evaluate
    from tuneline.tasks.lineage import Lineage
    from tuneline.tasks.train.loop import run_train

    overrides = {**example_overrides(), "data.text_files": str(args.data), "data.limit_train": args.limit_train,
                 "gate.min_accuracy": 0.0, "gate.min_class_recall": 0.0, "gate.max_ece": 1.0}
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        work = Path(tmp)
        params = build_params({}, overrides)
        run_fetch(params.data, work / "raw")
        prepared = run_prepare(params.data, work / "raw", work / "prepared")
        # The baseline reads the very rows Tuneline trains, validates and tests on (the raw texts of the same split).
        from tuneline.tasks.data.prepare_records import _splits
        from tuneline.tasks.data.records import RECORDS_FILE
        from tuneline.tasks.data.shards import gather_rows

        records = json.loads((work / "raw" / RECORDS_FILE).read_text())
        raw = {s: SplitShards(work / "raw", s, records) for s in records["splits"]}
        plan = _splits(params.data, dict(raw), len(records["classes"]))
        texts, labels = {}, {}
        for split, (source, rows) in plan.items():
            x, y = gather_rows(raw[source], rows)
            texts[split] = [bytes(r).decode("utf-8") for r in x]
            labels[split] = y.tolist()
        base = baseline(texts, labels)
        print(f"baseline  bag-of-bigrams logistic regression: test {base['test_accuracy']:.4f} "
              f"(val {base['val_accuracy']:.4f}, C={base['C']}, {base['features']} features) in {base['seconds']} s",
              flush=True)
        runs = []
        for seed in args.seeds:
            seeded = build_params({}, {**overrides, "train.seed": seed})
            out = work / f"seed{seed}"
            out.mkdir()
            start = time.perf_counter()
            run_train(seeded.model, seeded.train, work / "prepared", out / "model.pt", out / "history.csv",
                      Lineage("bench", "bench", "bench"), show_progress=False)
            seconds = time.perf_counter() - start
            result = run_evaluate(out / "model.pt", work / "prepared", out / "eval.json", out / "confusion.csv",
                                  seeded.gate, seeded.train, enforce=False)
            accuracy = json.loads((out / "eval.json").read_text())["accuracy"]
            runs.append({"seed": seed, "test_accuracy": round(accuracy, 4), "train_seconds": round(seconds, 1)})
            print(f"tuneline  {seeded.model.arch} seed {seed}: test {accuracy:.4f}, trained in {seconds:.0f} s", flush=True)
            del result
    median = statistics.median(r["test_accuracy"] for r in runs) if runs else None
    if runs:
        print(f"tuneline median {median:.4f} over {len(runs)} seed(s); baseline {base['test_accuracy']:.4f}; "
              f"ratio {median / base['test_accuracy']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                         "counts": prepared.counts, "baseline": base, "tuneline": runs,
                                         "tuneline_median": median}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
