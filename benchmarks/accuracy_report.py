"""Aggregation, markdown and plots for ``bench_accuracy.py`` (everything from the measured rows)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean, median

FAMILY_ORDER = (
    "full", "squeezed-flat", "squeezed-hier", "squeezed-sq", "kvpress-none", "kvpress-snapkv", "kvpress-streamingllm",
    "kvpress-expected_attention", "kvpress-knorm", "rag-minilm", "rag-bm25",
)
SQUEEZED = ("squeezed-flat", "squeezed-hier", "squeezed-sq")
JUDGE_THRESHOLD = 0.6  # lengths where full KV scores at least this are the ones the targets judge


def _acc(rows) -> float | None:
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


def _family_key(f: str) -> tuple:
    return (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f)


def summarize(result: dict) -> dict:
    rows = result["rows"]
    by_system = defaultdict(list)
    for r in rows:
        by_system[r["system"]].append(r)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    kinds = sorted({r["kind"] for r in rows})
    full = [r for r in rows if r["family"] == "full"]
    judged = [L for L in lengths if (_acc([r for r in full if r["length"] == L]) or 0) >= JUDGE_THRESHOLD]
    systems = {}
    for name, rs in by_system.items():
        peak = [r["peak_rss"] for r in rs if r.get("peak_rss") is not None]
        bpeak = [r["build_peak_rss"] for r in rs if r.get("build_peak_rss") is not None]
        timed = [r for r in rs if r.get("timed", True)] or rs
        systems[name] = {
            "family": rs[0]["family"],
            "kv_budget": rs[0]["kv_budget"],
            "n": len(rs),
            "accuracy": _acc(rs),
            "accuracy_judged": _acc([r for r in rs if r["length"] in judged]),
            "n_judged": sum(r["length"] in judged for r in rs),
            "by_length": {str(L): _acc([r for r in rs if r["length"] == L]) for L in lengths},
            "by_depth": {f"{d:g}": _acc([r for r in rs if r["depth"] == d]) for d in depths},
            "by_kind": {k: _acc([r for r in rs if r["kind"] == k]) for k in kinds},
            "kept_fraction": mean(r["kept_fraction"] for r in rs if r.get("kept_fraction") is not None),
            "build_seconds_mean": mean(r["build_seconds"] for r in rs),
            "n_timed": len(timed),
            "time_per_question_mean": mean(r["total_time"] for r in timed),
            "time_per_question_median": median(r["total_time"] for r in timed),
            "time_to_first_token_mean": mean(r["time_to_first_token"] for r in timed),
            "completion_tokens_mean": mean(r["completion_tokens"] for r in rs),
            "kv_bytes_held_mean": mean(r["kv_bytes_held"] for r in rs),
            "kv_bytes_read_mean": mean(r["kv_bytes_read"] for r in rs),
            "peak_rss_max": max(peak) if peak else None,
            "build_peak_rss_max": max(bpeak) if bpeak else None,
        }
    summary = {"lengths": lengths, "depths": depths, "kinds": kinds, "judged_lengths": judged, "systems": systems}
    summary["targets"] = targets(systems)
    val = result.get("kvpress_validation") or []
    summary["kvpress_validation"] = {"n": len(val), "equal": sum(v["equal"] for v in val)}
    chk = result.get("rag_prefix_checks") or []
    summary["rag_prefix_checks"] = {"n": len(chk), "equal": sum(c["equal"] for c in chk)}
    return summary


def targets(systems: dict) -> list[dict]:
    """Issue 5's targets, judged on the lengths where full KV scores >= 60%."""
    def acc(name):
        s = systems.get(name)
        return None if s is None else s["accuracy_judged"]

    out = []
    full = acc("full@1")
    for budget, slack in ((0.25, 0.02), (0.125, 0.05)):
        for fam in SQUEEZED:
            a = acc(f"{fam}@{budget:g}")
            if a is not None and full is not None:
                out.append({"target": f"{fam}@{budget:g} within {slack * 100:g} points of full KV",
                            "value": a, "reference": full, "met": a >= full - slack - 1e-9})
    budgets = sorted({s["kv_budget"] for s in systems.values() if s["family"].startswith("squeezed")})
    for fam in SQUEEZED:
        for b in budgets:
            mine = acc(f"{fam}@{b:g}")
            if mine is None:
                continue
            for other in sorted(systems):
                s = systems[other]
                if s["kv_budget"] != b or not (s["family"].startswith("kvpress-") or s["family"].startswith("rag-")):
                    continue
                if s["family"] == "kvpress-none":
                    continue
                kind = "every kvpress press" if s["family"].startswith("kvpress-") else "chunked retrieval"
                out.append({"target": f"{fam}@{b:g} above {other} ({kind})", "value": mine,
                            "reference": s["accuracy_judged"], "met": mine > s["accuracy_judged"]})
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _sorted_systems(systems: dict) -> list[str]:
    return sorted(systems, key=lambda n: (_family_key(systems[n]["family"]), -systems[n]["kv_budget"]))


def markdown(result: dict) -> str:
    s = result["summary"]
    systems = s["systems"]
    hw, v = result["hardware"], result["versions"]
    judged = ", ".join(f"{L}" for L in s["judged_lengths"]) or "none"
    lines = [
        f"# Accuracy benchmark: needle-in-a-haystack, {result['model']}",
        "",
        f"- Date: {result['date']}; wall time {result['wall_seconds'] / 60:.1f} min; CPU time "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in (result.get("cpu_seconds") or {}).items() if v is not None) + ".",
        *([f"- Merged from {len(result['merged_from'])} runs over disjoint cases (`--shard`, `--merge`), run at the same "
           "time on this machine: " + "; ".join(f"{m['name']} ({m['n_cases']} cases, {m['wall_seconds'] / 60:.1f} min)"
                                                 for m in result["merged_from"]) + "."] if result.get("merged_from") else []),
        f"- Hardware: {hw['cpu']}, {hw['cores']} cores, {(hw['memory_bytes'] or 0) / 2**30:.0f} GiB, {hw['accelerator']}; "
        f"torch threads per process: {result['torch_threads']}.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + ("; kvpress env: " + ", ".join(f"{k} {val}" for k, val in result["kvpress_versions"].items()) if result.get("kvpress_versions") else ""),
        f"- Cases: {result['n_cases']} (lengths {s['lengths']} tokens x depths {[f'{d:g}' for d in s['depths']]} x kinds {s['kinds']}, "
        f"seed {result['settings']['seed']}); greedy, at most {result['settings']['max_new_tokens']} new tokens per needle kind; "
        "correct = the answer contains the expected value.",
        f"- Judged lengths (full KV >= {JUDGE_THRESHOLD:.0%}): {judged}. \"Acc (judged)\" is on those lengths only.",
        "",
        "## Accuracy and cost per system",
        "",
        "| system | budget | acc (judged) | acc (all) | " + " | ".join(f"{L}" for L in s["lengths"])
        + " | kept | build s | s/question | TTFT s | KV read MB | build RSS MB | answer RSS MB |",
        "|---|---|---|---|" + "---|" * len(s["lengths"]) + "---|---|---|---|---|---|---|",
    ]
    for name in _sorted_systems(systems):
        x = systems[name]
        lines.append(
            f"| {x['family']} | {x['kv_budget']:g} | {_pct(x['accuracy_judged'])} | {_pct(x['accuracy'])} | "
            + " | ".join(_pct(x["by_length"][str(L)]) for L in s["lengths"])
            + f" | {x['kept_fraction']:.3f} | {x['build_seconds_mean']:.1f} | {x['time_per_question_mean']:.2f} | "
            f"{x['time_to_first_token_mean']:.2f} | {_mb(x['kv_bytes_read_mean'])} | {_mb(x['build_peak_rss_max'])} | {_mb(x['peak_rss_max'])} |"
        )
    lines += ["", "## Accuracy by depth and by needle kind (all lengths)", "",
              "| system | budget | " + " | ".join(f"d={d:g}" for d in s["depths"]) + " | " + " | ".join(s["kinds"]) + " |",
              "|---|---|" + "---|" * (len(s["depths"]) + len(s["kinds"]))]
    for name in _sorted_systems(systems):
        x = systems[name]
        lines.append(f"| {x['family']} | {x['kv_budget']:g} | " + " | ".join(_pct(x["by_depth"][f"{d:g}"]) for d in s["depths"])
                     + " | " + " | ".join(_pct(x["by_kind"][k]) for k in s["kinds"]) + " |")
    if s["targets"]:
        lines += ["", "## Targets (issue 5), on the judged lengths", "", "| target | value | reference | met |", "|---|---|---|---|"]
        for t in s["targets"]:
            lines.append(f"| {t['target']} | {_pct(t['value'])} | {_pct(t['reference'])} | {'yes' if t['met'] else 'NO'} |")
    if result.get("fidelity"):
        lines += ["", "## Fidelity on held-out essay text (vs full KV)", "",
                  "| corpus | system | budget | tokens | top-1 agreement | mean KL (nats) |", "|---|---|---|---|---|---|"]
        for f in sorted(result["fidelity"], key=lambda f: (f["name"], _family_key(f["system"]), -f["kv_budget"])):
            if f["system"] == "full":
                continue
            lines.append(f"| {f['name']} | {f['system']} | {f['kv_budget']:g} | {f['tokens']} | {f['top1_agreement']:.3f} | {f['mean_kl']:.4f} |")
    val = s["kvpress_validation"]
    if val["n"]:
        lines += ["", f"kvpress fan-out check: {val['equal']}/{val['n']} answers identical to kvpress's own pipeline "
                  "(one pipeline prefill per press and budget, no early stop) on the shortest cases."]
    chk = s.get("rag_prefix_checks", {"n": 0})
    if chk["n"]:
        lines += ["", f"RAG prefix-sharing check: {chk['equal']}/{chk['n']} answers identical with and without the shared prefill "
                  "(timed cases: the first case of each length)."]
    lines += [
        "",
        "## How it was measured",
        "",
        "- Every system gets the same prompt token ids: the engine's chat layout (system prompt, the haystack as one "
        "document, then the question). Full KV is the engine at kv_budget=1.0 (exact full-KV reuse).",
        "- Squeezed: one corpus build per case (prefill + K-means + calibration, level-1 centroids included) serves "
        "every budget, flat and hierarchical. `kept` is the measured fraction of corpus keys read. Answers run "
        "without the source measure (`SqueezeConfig(sources=False)`).",
        "- RAG: chunks of about 256 tokens (the size that splits the haystack into 2^m equal chunks; smaller when the "
        "budget is under one chunk), top-k by MiniLM (all-MiniLM-L6-v2) or BM25 with k*chunk = budget*context tokens, "
        "in rank order, answered with plain attention. "
        "`build s` = chunking + indexing; s/question includes retrieval. Budgets that use the same chunk size share "
        "one ranking; the top-k context is then a prefix of the top-K one, so one prefill serves them all except in "
        "the timed cases (the first of each length), which prefill each budget on its own and give RAG's timings.",
        "- Decoding stops at end of turn, at the token limit, or once the expected value appears (which cannot change "
        "a contains-the-value score). s/question is the measured wall time of one answer; TTFT the time to the "
        "first generated token. build/answer RSS MB = the largest growth of this process's resident memory during "
        "one build / one answer (sampled every 10 ms; freed memory the allocator keeps is not counted again; not "
        "available for the kvpress subprocess, whose whole-process peak is "
        f"{_mb((result.get('process_peak_rss_bytes') or {}).get('kvpress'))} MB). KV read MB = bytes of corpus KV "
        "attended per step (squeezed: measured kept fraction x corpus KV bytes).",
        "- The CPU is shared: times are indicative, accuracies are exact.",
    ]
    if result.get("kvpress_versions"):
        lines.insert(-1, (
            "- kvpress: presses through kvpress's pipeline (`KVPressTextGenerationPipeline.forward` on the same ids) in its "
            "own venv (transformers<5.3). One prefill per case serves every press and budget: kvpress prunes a layer "
            "after that layer's prefill attention, so each press's inputs are those of the uncompressed model; the fan-out "
            "calls each press's own `compress` (SnapKV, ExpectedAttention and KNorm, whose scores do not depend on the "
            "ratio: their `score` once per layer, then `compress`'s top-k per budget). Checked against the pipeline "
            "itself (see the check above). The presses do not see the question (kvpress's default). `build s` = that "
            "shared prefill + the press's own compression time (its scoring charged to every budget)."
        ))
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    systems = s["systems"]
    families = sorted({x["family"] for x in systems.values()} - {"full", "kvpress-none"}, key=_family_key)
    full = systems.get("full@1")
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "accuracy_judged", f"judged lengths {s['judged_lengths']}"), (axes[1], "accuracy", "all lengths")):
        for fam in families:
            pts = sorted((x["kv_budget"], x[key]) for x in systems.values() if x["family"] == fam and x[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=fam)
        if full and full[key] is not None:
            ax.axhline(100 * full[key], color="black", linestyle="--", label="full KV")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV budget (fraction of context tokens)")
        ax.set_title(f"NIAH accuracy, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    p = out / f"{name}_vs_budget.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    budgets = sorted({x["kv_budget"] for x in systems.values() if x["family"].startswith("squeezed")})
    focus = 0.125 if 0.125 in budgets else (budgets[0] if budgets else None)
    chosen = (["full@1"] if full else []) + [f"{fam}@{focus:g}" for fam in families if f"{fam}@{focus:g}" in systems]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, xs, label in ((axes[0], "by_length", s["lengths"], "context length (tokens)"),
                               (axes[1], "by_depth", s["depths"], "needle depth")):
        for name_ in chosen:
            x = systems[name_]
            ys = [x[key][str(v) if key == "by_length" else f"{v:g}"] for v in xs]
            ax.plot(xs, [100 * y for y in ys], marker="o", label=name_, linestyle="--" if name_ == "full@1" else "-")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title(f"accuracy by length (budget {focus:g})")
    axes[1].set_title(f"accuracy by depth, all lengths (budget {focus:g})")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    p = out / f"{name}_by_length_depth.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def short_table(result: dict) -> str:
    s = result["summary"]
    systems = s["systems"]
    budgets = sorted({x["kv_budget"] for x in systems.values()}, reverse=True)
    fams = sorted({x["family"] for x in systems.values()}, key=_family_key)
    key = "accuracy_judged" if s["judged_lengths"] else "accuracy"
    head = f"NIAH accuracy ({'judged lengths ' + str(s['judged_lengths']) if s['judged_lengths'] else 'all lengths'}), {result['n_cases']} cases"
    lines = [head, f"{'system':<28}" + "".join(f"{b:>8g}" for b in budgets) + f"{'s/q':>8}"]
    for fam in fams:
        cells, times = [], []
        for b in budgets:
            x = systems.get(f"{fam}@{b:g}")
            cells.append(f"{_pct(x[key]) if x else '':>8}")
            if x:
                times.append(x["time_per_question_mean"])
        lines.append(f"{fam:<28}" + "".join(cells) + f"{mean(times):>8.2f}")
    met = [t for t in s["targets"]]
    if met:
        lines.append(f"targets met: {sum(t['met'] for t in met)}/{len(met)}")
    return "\n".join(lines)
