"""Results as JSON, a Markdown page and two plots; named metrics for ratios and `--check` gates."""

from __future__ import annotations

import json
import re
from pathlib import Path

# The fast-path and serving issues' targets, printed beside the measured ratios (gated only by --check).
TARGETS = [
    ("per_token:engine-int8/per_token:optimum-int8", "<=", 0.25),
    ("per_token:engine-int4/per_token:optimum-int8", "<=", 0.18),
    ("per_token:engine-fp32/per_token:optimum-fp32", "<=", 0.6),
    ("prefill:engine-int8", "<=", 9.0),
    ("per_token@1000:engine-int8/per_token:engine-int8", "<=", 1.7),
    ("prefill@512:engine-int8/prefill@512:pytorch", "<=", 0.5),
    ("throughput@16:engine-int8", ">=", 1000.0),
    ("rss_growth:engine-int8/kv_buffer:engine-int8", "<=", 1.0),
]
CHECK = re.compile(r"^\s*(?P<lhs>[^<>=]+?)\s*(?P<op><=|>=)\s*(?P<value>[0-9.eE+-]+)\s*$")


def metric(results: dict, term: str) -> float | None:
    """`per_token[@L]`, `prefill[@L]`, `throughput@B`, `cold_start`, `peak_rss`, `rss_growth`, `kv_buffer` of a system,
    written `METRIC:SYSTEM`; `floor`: the system's weights per token over the bandwidth measured in the same run
    (ms: the per-token time if streaming weights were all it did); `step`, `products`, `overhead`, `kernel_floor`
    (ms): an engine's one-row step, its weight products alone, its graph's fixed step cost, and the sum of the
    last two, timed in the same alternating rounds (kernel_floor.py); `prompt`, `prompt_products`,
    `prompt_overhead`, `prompt_kernel_floor`: the same for a 32-token prompt;
    `serving@C`: the served system's tokens/s at C concurrent clients; `direct@C`: that system's own tokens/s,
    prompts included, on the same work (C rows) without HTTP or the scheduler. None where not measured."""
    name, _, system = term.partition(":")
    kind, _, at = name.partition("@")
    if kind == "floor":
        weight_mb = results.get("systems", {}).get(system, {}).get("weight_mb_per_token")
        bandwidth = results.get("machine", {}).get("memory_read_gb_per_s")
        return weight_mb / bandwidth if weight_mb and bandwidth else None  # MB / (GB/s) = ms
    if kind.removeprefix("prompt_") in ("step", "prompt", "products", "overhead", "kernel_floor"):
        return results.get("kernel_floor", {}).get(system, {}).get(f"{kind}_ms", {}).get("median")
    serving = results.get("serving") or {}
    if kind == "serving":
        levels = [lv for lv in serving.get("levels", []) if lv["clients"] == int(at or 1)]
        return levels[0]["tokens_per_s"] if levels and serving.get("system") == system else None
    if kind == "direct":
        direct = serving.get("direct") or {}
        same = serving.get("system") == system and direct.get("point", {}).get("batch") == int(at or 1)
        return direct["end_to_end_tokens_per_s"]["median"] if same else None
    if kind in ("per_token", "prefill"):
        rows = results.get("latency", {}).get(system, [])
        rows = [r for r in rows if r["point"]["prompt"] == int(at)] if at else rows[:1]
        if not rows:
            return None
        return rows[0]["per_token_ms"]["p50"] if kind == "per_token" else rows[0]["prefill_ms"]["median"]
    if kind == "throughput":
        rows = [r for r in results.get("throughput", {}).get(system, []) if r["point"]["batch"] == int(at or 1)]
        return rows[0]["decode_tokens_per_s"]["median"] if rows else None
    memory = results.get("memory", {}).get(system, {})
    key = {"cold_start": "cold_start_s", "rss_growth": "rss_growth_long_vs_10_mb", "kv_buffer": "kv_buffer_mb"}.get(kind)
    key = key or {"peak_rss": "peak_rss_mb"}.get(kind)
    return memory.get(key) if key else None


def evaluate(results: dict, expression: str) -> dict:
    """'A/B<=X' or 'A>=X', each side a METRIC:SYSTEM term -> value, and whether it holds (None: not measured)."""
    match = CHECK.match(expression)
    if not match:
        raise ValueError(f"cannot read check {expression!r}; write e.g. 'per_token:engine-int8/per_token:optimum-int8<=0.25'")
    terms = [metric(results, t.strip()) for t in match["lhs"].split("/")]
    value = None if None in terms or len(terms) > 2 else (terms[0] / terms[1] if len(terms) == 2 else terms[0])
    bound = float(match["value"])
    holds = None if value is None else (value <= bound if match["op"] == "<=" else value >= bound)
    return {"check": match["lhs"].strip(), "op": match["op"], "bound": bound, "value": value, "holds": holds}


def write_reports(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plots(results, out)]


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    lines = [f"# gpt2-onnx benchmark: {c['source']}", "",
             f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cpus_allowed']} CPUs, {m['threads']} threads per system, "
             f"{m['memory_gb']} GiB; weights stream at {m['memory_read_gb_per_s']} GB/s (a {m['threads']}-thread "
             f"onnxruntime MatMul over 256 MB). Greedy, EOS ignored, same prompt ids for all; {c['reps']} alternating "
             f"rounds after a warm-up; medians (min–max). Command: `{c['command']}`", ""]
    lines += _latency_table(results) + _throughput_table(results) + _kernel_floor_table(results)
    lines += _serving_table(results) + _memory_table(results)
    lines += _parity_table(results)
    lines += ["## Ratios", "", "| ratio | value | target |", "|---|---|---|"]
    for check in results.get("targets", []) + results.get("checks", []):
        value = "–" if check["value"] is None else f"{check['value']:.3g}"
        verdict = {True: "met", False: "not met", None: "not measured"}[check["holds"]]
        lines.append(f"| `{check['check']}` | {value} | {check['op']} {check['bound']:g} ({verdict}) |")
    if results.get("llamacpp_commands"):
        lines += ["", "## llama.cpp's own tools (rows \"(llama.cpp tools)\" above)", ""]
        lines += [f"    {command}" for command in results["llamacpp_commands"]]
    if results.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {name}: {why}" for name, why in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def agreement_text(agreement: dict) -> str:
    """A `greedy_agreement` entry as a table cell."""
    return "yes" if agreement["identical"] else f"no (from token {agreement['first_difference']})"


def cell(summary: dict | None, key: str, sub: str = "median", digits: int = 1) -> str:
    if not summary or key not in summary:
        return "–"
    s = summary[key]
    if sub in ("p50", "p90"):
        return f"{s[sub]:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _latency_table(results: dict) -> list[str]:
    latency = results.get("latency", {})
    if not latency:
        return []
    prompts = sorted({r["point"]["prompt"] for rows in latency.values() for r in rows})
    first = min(prompts)
    lines = ["## Latency (batch 1)", "",
             f"| system | prefill {first} tok, ms | ms/token p50 / p90 at {first} | "
             + " | ".join(f"ms/token at {p} / prefill ms" for p in prompts[1:]) + " | weights GB/s |",
             "|---" * (3 + len(prompts)) + "|"]
    for name, rows in latency.items():
        by_prompt = {r["point"]["prompt"]: r for r in rows}
        head = by_prompt.get(first, {})
        cells = [cell(head, "prefill_ms"),
                 f"{cell(head, 'per_token_ms', 'p50', 2)} / {cell(head, 'per_token_ms', 'p90', 2)}"]
        cells += [f"{cell(by_prompt[p], 'per_token_ms', 'p50', 2)} / {by_prompt[p]['prefill_ms']['median']:.1f}"
                  if p in by_prompt else "–" for p in prompts[1:]]
        cells.append(_num(head.get("weight_gb_per_s"), 1))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _throughput_table(results: dict) -> list[str]:
    throughput = results.get("throughput", {})
    if not throughput:
        return []
    batches = sorted({r["point"]["batch"] for rows in throughput.values() for r in rows})
    lines = ["## Throughput (decode tokens/s, all rows together)", "",
             "| system | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---" * (1 + len(batches)) + "|"]
    for name, rows in throughput.items():
        by_batch = {r["point"]["batch"]: r for r in rows}
        lines.append(f"| {name} | " + " | ".join(cell(by_batch.get(b), "decode_tokens_per_s", digits=0)
                                                 for b in batches) + " |")
    return lines + [""]


def _kernel_floor_table(results: dict) -> list[str]:
    floors = results.get("kernel_floor")
    if not floors:
        return []
    lines = ["## Floors of a one-row decode step and of a 32-token prompt (ms; the engine's kernels, measured in this run)",
             "", "Weight floor: the weights a step reads over the bandwidth above. Products: the export's weight "
             "products alone (same ops and weights; one row each for a step; for a prompt 32 rows, the LM head one). "
             "Fixed cost: the same graph with every weight product replaced by a stand-in of its output's shape, run "
             "by the engine's decoder on the same cache and positions, less the stand-ins' own time (dispatch, "
             "threads, attention, small ops), both timed cold (each call after a read of twice the last-level cache, "
             "as inside a real pass, whose products empty it). Kernel floor: products + fixed cost. Step and prompt: the engine's own, "
             "timed in the same alternating rounds as the floors.", "",
             "| system | ms/token p50 (latency runs) | weight floor | step | products alone | fixed cost | kernel floor "
             "| step / kernel floor | prompt | its products | its fixed cost | its kernel floor | prompt / kernel floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, floor in floors.items():
        cells = [cell(floor, f"{kind}_ms", digits=2) for kind in ("step", "products", "overhead", "kernel_floor")]
        prompt = [cell(floor, f"prompt{kind}_ms", digits=2) for kind in ("", "_products", "_overhead", "_kernel_floor")]
        lines.append(f"| {name} | {_num(metric(results, f'per_token:{name}'), 2)} | "
                     f"{_num(metric(results, f'floor:{name}'), 2)} | {' | '.join(cells)} | "
                     f"{_num(_over(floor, 'step', 'kernel_floor'), 2)} | {' | '.join(prompt)} | "
                     f"{_num(_over(floor, 'prompt', 'prompt_kernel_floor'), 2)} |")
    return lines + [""]


def _over(floor: dict, top: str, bottom: str) -> float | None:
    numerator, denominator = (floor.get(f"{k}_ms", {}).get("median") for k in (top, bottom))
    return numerator / denominator if numerator and denominator else None


def _serving_table(results: dict) -> list[str]:
    serving = results.get("serving")
    if not serving:
        return []
    lines = [f"## Serving ({serving['system']} behind `gpt2-onnx serve`, OpenAI completions over HTTP)", "",
             "| concurrent clients | requests | prompt / new tokens | tokens/s | latency p50 s | latency p99 s |",
             "|---|---|---|---|---|---|"]
    for level in serving["levels"]:
        lines.append(f"| {level['clients']} | {level['requests']} | {level['prompt_tokens']} / {level['new_tokens']} | "
                     f"{level['tokens_per_s']:.0f} | {level['latency_s']['p50']:.2f} | {level['latency_s']['p99']:.2f} |")
    direct = serving.get("direct")
    if direct:
        point = direct["point"]
        lines += ["", f"The engine alone on the same work ({point['batch']} rows of {point['prompt']} + {point['new_tokens']} "
                  f"tokens, prompts included, no HTTP or scheduler): {cell(direct, 'end_to_end_tokens_per_s', digits=0)} "
                  f"tokens/s ({cell(direct, 'decode_tokens_per_s', digits=0)} counting decode steps only)."]
    return lines + [""]


def _memory_table(results: dict) -> list[str]:
    memory, systems = results.get("memory", {}), results.get("systems", {})
    if not systems:
        return []
    lines = ["## Size and memory (each system in its own process)", "",
             "| system | folder MB | weights read per token MB | cold start to first token, s | peak RSS MB | "
             "RSS growth, long run vs 10 tokens, MB | KV buffer of the long run, MB |", "|---|---|---|---|---|---|---|"]
    for name, facts in systems.items():
        probe = memory.get(name, {})
        lines.append(f"| {name} | {facts['folder_mb']:.1f} | {facts['weight_mb_per_token']:.1f} | "
                     f"{_num(probe.get('cold_start_s'), 2)} | {_num(probe.get('peak_rss_mb'), 0)} | "
                     f"{_num(probe.get('rss_growth_long_vs_10_mb'), 1)} | {_num(probe.get('kv_buffer_mb'), 1)} |")
    return lines + [""]


def _parity_table(results: dict) -> list[str]:
    parity = results.get("parity", {})
    if not parity:
        return []
    greedy, engines = parity.get("greedy_vs_pytorch", {}), parity.get("engine", {})
    lines = ["## Parity with PyTorch fp32", "",
             "| system | greedy tokens = PyTorch's | max abs Δlogit | top-1 agreement | mean KL | perplexity ratio |",
             "|---|---|---|---|---|---|"]
    for name in results.get("systems", {}):
        g, e = greedy.get(name), engines.get(name, {})
        same = "–" if g is None else agreement_text(g)
        q = e.get("quality", {})
        lines.append(f"| {name} | {same} | {_num(e.get('logits', {}).get('max_abs_logit_diff'), 2, 'e')} | "
                     f"{_num(q.get('top1_agreement'), 4)} | {_num(q.get('mean_kl'), 5)} | {_num(q.get('perplexity_ratio'), 4)} |")
    return lines + [""]


def _num(value, digits: int, style: str = "f") -> str:
    return "–" if value is None else f"{value:.{digits}{style}}"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, x_of, y_of, xlabel, ylabel, name in [
        ("latency", lambda r: r["point"]["prompt"], lambda r: r["per_token_ms"]["p50"], "context (prompt tokens)",
         "ms per token (p50)", "latency_vs_context.png"),
        ("throughput", lambda r: r["point"]["batch"], lambda r: r["decode_tokens_per_s"]["median"], "batch size",
         "decode tokens/s", "throughput_vs_batch.png"),
    ]:
        series = {system: [r for r in rows if "per_token_ms" in r] for system, rows in results.get(key, {}).items()}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        colors = plt.get_cmap("tab20").colors  # 20 distinct colours: one per system of a full run
        for i, (system, rows) in enumerate(series.items()):
            # this engine solid, peers dashed, llama.cpp's own tools dotted
            style = ":" if system.endswith("(llama.cpp tools)") else "-" if system.startswith("engine-") else "--"
            ax.plot([x_of(r) for r in rows], [y_of(r) for r in rows], marker="o", linestyle=style,
                    color=colors[i % len(colors)], label=system, linewidth=2.2 if style == "-" else 1.4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{results['config']['source']}, {results['machine']['threads']} threads, {results['machine']['cpu']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written
