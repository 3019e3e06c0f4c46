"""bench/spec_decode.py's tables and verdicts: throughput and acceptance per checkpoint, the steady-state step
costs with the break-even acceptance they imply, and PASS/FAIL lines for exactness and bookkeeping."""

from __future__ import annotations

from typing import Any


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_throughput(results: list[dict[str, Any]], name: str, repeats: int) -> None:
    how = "sampled" if any(r.get("sampled") for r in results) else "greedy"
    print(f"\n[{name}] {how}, medians of {repeats} run(s); acceptance summed over runs")
    hdr = (f"{'batch':>5} {'k':>2} {'tok/s':>7} {'vs k=0':>6} {'steps':>5} {'drafted':>7} {'accepted':>8} "
           f"{'accept':>6} {'tok/verify':>10}  {'accept by draft position':<24} {'== k=0':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        by_pos = "/".join(pct(a) for a in r["acceptance_by_position"]) or "-"
        mal = "-" if r["mean_acceptance_length"] is None else f"{r['mean_acceptance_length']:.2f}"
        eq = "yes" if r["greedy_equal_k0"] else "NO " + ",".join(map(str, r["mismatched_sequences"]))
        print(f"{r['batch']:>5} {r['k']:>2} {r['tok_s']:>7.1f} {r['speedup_vs_k0']:>5.2f}x {r['steps_per_run']:>5.0f} "
              f"{r['drafted_per_run']:>7.0f} {r['accepted_per_run']:>8.0f} {pct(r['acceptance_rate']):>6} "
              f"{mal:>10}  {by_pos:<24} {eq:>6}")


def print_step_costs(results: list[dict[str, Any]]) -> None:
    print("\nStep cost after prefill (median over steady steps: k=0 plain decode, k>0 verify of k drafts per sequence)."
          "\nstep = wall of engine.step(): forward (target model + logits) + MTP drafting of the next k drafts + "
          "accept/rollback + scheduling/sampling.\nbreak-even tok/step = step ratio: the mean acceptance length "
          "speculation needs to win; alpha = the per-draft\nacceptance rate that gives it (i.i.d. model, "
          "(1-a^(k+1))/(1-a)); 'never' = ratio above k+1, the most a step can emit.")
    hdr = (f"{'checkpoint':<10} {'batch':>5} {'k':>2} {'n':>4} {'step ms':>8} {'ratio':>6} {'fwd ms':>7} "
           f"{'fwd ratio':>9} {'draft ms':>8} {'accept ms':>9}  {'break-even tok/step':>19} {'alpha':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if r["k"]:
            be = f"{r['break_even_length']:.2f} (max {r['k'] + 1})"
            alpha = "never" if r["break_even_alpha"] is None else pct(r["break_even_alpha"])
        else:
            be, alpha = "-", "-"
        print(f"{r['checkpoint']:<10} {r['batch']:>5} {r['k']:>2} {r['steady_steps']:>4} {r['step_ms']:>8.1f} "
              f"{r['step_ratio']:>5.2f}x {r['forward_ms']:>7.1f} {r['forward_ratio']:>8.2f}x {r['draft_ms']:>8.1f} "
              f"{r['verify_ms']:>9.1f}  {be:>19} {alpha:>6}")


def print_verdicts(results: list[dict[str, Any]]) -> None:
    print()
    if any(r.get("sampled") and not r.get("seeded") for r in results):
        print("  info  unseeded sampling: tokens differ from k=0's by design (the same distribution, other draws)")
    else:  # greedy, or seeded sampling (coupled verification): the tokens of plain decoding
        what = "seeded sampled" if any(r.get("sampled") for r in results) else "greedy"
        bad = [r for r in results if not r["greedy_equal_k0"]]
        print(f"  {'PASS' if not bad else 'FAIL'}  {what} tokens at every k == k=0 tokens (same checkpoint, batch)"
              + ("" if not bad else ": " + ", ".join(f"{r['checkpoint']} b{r['batch']} k{r['k']}" for r in bad)))
    bad = [r for r in results if not (r["request_counters_agree"] and r["pools_free"])]
    print(f"  {'PASS' if not bad else 'FAIL'}  per-request counters sum to engine.spec.counters; blocks/slots freed"
          + ("" if not bad else ": " + ", ".join(f"{r['checkpoint']} b{r['batch']} k{r['k']}" for r in bad)))
    aligned = [r for r in results if r["checkpoint"] == "aligned" and r["k"]]
    if aligned:
        full = all(r["acceptance_rate"] == 1.0 for r in aligned)
        print(f"  {'PASS' if full else 'MISS'}  aligned checkpoint accepts every draft "
              f"(rates {', '.join(pct(r['acceptance_rate']) for r in aligned)})")
    rnd = [r for r in results if r["checkpoint"] == "random" and r["k"]]
    if rnd:
        print(f"  info  random checkpoint acceptance {', '.join(pct(r['acceptance_rate']) for r in rnd)} "
              "(expected ~0: random weights)")
