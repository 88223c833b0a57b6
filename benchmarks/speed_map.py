"""Where lfnnify's pipelines win on samples/s, and where they do not: every link rate, a model that fits each host
and one that must be split, from ``benchmarks.multihost`` results of one commit.

- **fits**: each host could hold the whole model, so every method measured is a choice: the DDP variants (plain, the
  fp16 hook, PowerSGD, local SGD), the exact schedules, FSDP. Their best at each rate is the baseline.
- **split**: the model must be split over the hosts, so only methods that split it are choices: torch's exact
  schedules (``bp_*``) and FSDP. Their best at each rate is the baseline.

In both cases the LFNN-ℓ pipelines (``lfnn_pipeline*``) and the replay pipelines (``replay_pipeline*``: delayed
end-to-end gradients, weight stashing) are set against that baseline: the best of each family at that rate (over
the send dtypes measured), their ratio of medians, and whether their ranges are apart ("A beats B" only then).
Files measured at several commits are merged only where git shows the same lfnnify/ and benchmarks/ code at each.
Every cell is measured on the two-host testbed (10 Mbit/s to an unshaped link); nothing here is projected.
Samples/s only: the pipelines' gradients are not backprop's, and what that costs in accuracy per second is the
time-to-accuracy benchmark's question.

Reproduce (root; the files of one commit):
  python -m benchmarks.multihost --rates unshaped 1gbit --methods ddp ddp_fp16 ddp_powersgd_r1 local_sgd_h16 \\
      bp_1f1b_m2 bp_interleaved_zb_m2 lfnn_pipeline lfnn_pipeline_int8 replay_pipeline replay_pipeline_int8 \\
      --steps 16 --warmup 3 --repeats 3 --no-projection --name multihost-map-fast-...
  python -m benchmarks.multihost --rates 100mbit 10mbit --methods ddp_powersgd_r1 local_sgd_h16 bp_1f1b_m2 \\
      bp_interleaved_zb_m2 lfnn_pipeline lfnn_pipeline_int8 replay_pipeline replay_pipeline_int8 ... --name ...-slow-...
  python -m benchmarks.speed_map results/multihost-map-fast-....json results/multihost-map-slow-....json
(plain DDP and its fp16 hook are left out below 1 Gbit/s: at 100 Mbit/s they ran 12x and 6x slower than PowerSGD
in the hooks table, and at 10 Mbit/s one plain DDP step takes over a minute.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import RESULTS, same_measured_code, write_json

FAMILIES = {"LFNN-ℓ": "lfnn_pipeline", "replay": "replay_pipeline"}
CASES = ("fits", "split")
RATE_ORDER = ["10mbit", "100mbit", "1gbit", "10gbit", "unshaped"]
RATE_NAMES = {"10mbit": "10 Mbit/s", "100mbit": "100 Mbit/s", "1gbit": "1 Gbit/s", "10gbit": "10 Gbit/s",
              "unshaped": "unshaped"}


def is_pipeline(name: str) -> bool:
    return name.startswith(tuple(FAMILIES.values()))


def is_choice(name: str, case: str) -> bool:
    """Whether a user in ``case`` could pick method ``name`` instead of lfnnify."""
    if is_pipeline(name):
        return False
    return case == "fits" or name.startswith("bp_") or name == "fsdp"


def merge(payloads: list[dict]) -> tuple[dict, str]:
    """Every rate's cells from results files of one commit, or of commits whose measured code is the same
    (:func:`same_measured_code`); refuses any other mix, a dirty or unknown commit, and a rate measured twice (which
    of the two would the map show?)."""
    commits = sorted({p["env_before"]["commit"] for p in payloads})
    clean = not any(c.endswith("+dirty") or c == "unknown" for c in commits)
    if not clean or (len(commits) > 1 and not same_measured_code(commits)):
        raise SystemExit(f"speed_map.py: the files come from commits {', '.join(commits)}; a map comes from one clean "
                         f"commit (or commits whose lfnnify/ and benchmarks/ code is the same): measure every rate "
                         f"there")
    rows: dict[str, dict] = {}
    for p in payloads:
        for rate, row in p["results"].items():
            if rate in rows:
                raise SystemExit(f"speed_map.py: {rate} is measured in two of the files; give each rate once")
            rows[rate] = {m: c for m, c in row.items() if "samples_per_s" in c}
    return rows, ", ".join(commits)


def _best(row: dict, names) -> str | None:
    return max((m for m in names if m in row), key=lambda m: row[m]["samples_per_s"], default=None)


def verdict(a: dict, b: dict, name_a: str, name_b: str) -> str:
    if min(len(a["runs"]), len(b["runs"])) < 3:
        return "fewer than 3 runs each: too few to say"
    if a["samples_per_s_range"][0] > b["samples_per_s_range"][1]:
        return f"{name_a} wins (ranges apart)"
    if a["samples_per_s_range"][1] < b["samples_per_s_range"][0]:
        return f"{name_b} wins (ranges apart)"
    return "level (ranges overlap)"


def speed_map(rows: dict) -> dict:
    """rate -> case -> the baseline (best choice measured) and each pipeline family's best, ratio and verdict."""
    out = {}
    for rate in [r for r in RATE_ORDER if r in rows]:
        row = rows[rate]
        out[rate] = {}
        for case in CASES:
            other = _best(row, [m for m in row if is_choice(m, case)])
            if other is None:
                continue
            cell = {"baseline": other, "baseline_samples_per_s": row[other]["samples_per_s"],
                    "baseline_range": row[other]["samples_per_s_range"],
                    "choices": sorted(m for m in row if is_choice(m, case)), "families": {}}
            for family, prefix in FAMILIES.items():
                best = _best(row, [m for m in row if m.startswith(prefix)])
                if best is None:
                    continue
                a, b = row[best], row[other]
                cell["families"][family] = {
                    "method": best, "samples_per_s": a["samples_per_s"], "range": a["samples_per_s_range"],
                    "ratio": a["samples_per_s"] / b["samples_per_s"], "verdict": verdict(a, b, best, other)}
            out[rate][case] = cell
    return out


def _cell(value: float, spread: list[float]) -> str:
    return f"{value:.1f} ({spread[0]:.1f}–{spread[1]:.1f})"


def markdown(payload: dict) -> str:
    lines = [f"Samples/s on two hosts of one core ({payload['device']}), resnet18 (CIFAR variant, 32 px), batch "
             f"{payload['batch']}, the median of 3 runs (their range), commit {payload['commit']}. fits: the best of "
             "every method measured; split: the best of the exact schedules and FSDP measured. Each pipeline family: "
             "its best send dtype there.", "",
             "| link | case | best baseline | LFNN-ℓ (best) | ratio | replay (best) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for rate, cases in payload["map"].items():
        for case, c in cases.items():
            fam = c["families"]
            cells = []
            for family in FAMILIES:
                f = fam.get(family)
                cells += ([f"{f['method']} {_cell(f['samples_per_s'], f['range'])}",
                           f"{f['ratio']:.2f}× ({f['verdict']})"] if f else ["–", "–"])
            baseline = f"{c['baseline']} {_cell(c['baseline_samples_per_s'], c['baseline_range'])}"
            lines.append(f"| {RATE_NAMES[rate]} | {case} | {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(payload["map"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, case in zip(axes, CASES):
        xs = range(len(rates))
        series = {"best baseline": [payload["map"][r].get(case, {}).get("baseline_samples_per_s") for r in rates]}
        for family in FAMILIES:
            series[f"best {family}"] = [payload["map"][r].get(case, {}).get("families", {}).get(family, {})
                                        .get("samples_per_s") for r in rates]
        for (label, values), style in zip(series.items(), ("k-o", "C0-s", "C1-^")):
            ax.plot([x for x, v in zip(xs, values) if v], [v for v in values if v], style, label=label)
        ax.set_xticks(list(xs), [RATE_NAMES[r] for r in rates])
        ax.set_title({"fits": "the model fits each host", "split": "the model must be split"})
        ax.set_xlabel("link between the two hosts")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("samples/s (median of 3 runs)")
    axes[0].legend()
    fig.suptitle(f"Where the pipelines win on samples/s ({payload['device']}, commit {payload['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+", help="benchmarks.multihost result files of one commit")
    parser.add_argument("--name", default=None, help="result file stem (default: speed_map-<first file's stem>)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    payloads = [json.loads(f.read_text()) for f in args.files]
    rows, commit = merge(payloads)
    payload = {"experiment": "speed_map", "sources": [f.name for f in args.files], "commit": commit,
               "device": payloads[0]["env"]["device"], "batch": payloads[0]["settings"]["batch"],
               "map": speed_map(rows),
               "command": "python -m benchmarks.speed_map " + " ".join(str(f) for f in args.files)}
    stem = args.name or f"speed_map-{args.files[0].stem}"
    path = write_json(args.out / f"{stem}.json", payload)
    (args.out / f"{stem}.md").write_text(markdown(payload) + "\n")
    chart(payload, args.out / f"{stem}.png")
    print(markdown(payload) + f"\nwrote {path}")


if __name__ == "__main__":
    main()
