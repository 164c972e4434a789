"""P/D placement in the simulator: the same trace under each placement rule (``RouterPolicy.pd_placement``), and
the CPU P/D c8 run of ``bench.vs_vllm_cpu`` (``python -m bench.router_sim --c8``)."""
from __future__ import annotations

import time
from dataclasses import replace

from duet.bench.router_sim import SimConfig, Simulation
from duet.bench.sim_trace import make_trace
from duet.engine.router.scoring import PD_PLACEMENTS, RouterPolicy


def simulate_placements(cfg: SimConfig, base_policy: RouterPolicy,
                        placements: tuple[str, ...] = PD_PLACEMENTS) -> list[dict]:
    """Run the same trace under each P/D placement rule; one row per rule."""
    trace = make_trace(cfg)
    rows = []
    for placement in placements:
        t0 = time.perf_counter()
        row = {"pd_placement": placement, **Simulation(cfg, replace(base_policy, pd_placement=placement), trace).run()}
        row["local_share"] = row["local_prefill"] / max(row["requests"], 1)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows



# The CPU P/D c8 run of bench.vs_vllm_cpu (28M model, 2 cores): one prefill + one decode server, 8 closed-loop
# clients, 512-token prompts, 64 output tokens, threshold 0. Costs are the engine's measured on this box
# (bench/NOTES.md): prefill of one 512-token prompt ~0.16 s, a 2048-token step ~0.75 s; decode step at batch 8
# ~25 ms; the prefill server batches up to the engine's 2048-token step budget.
C8 = SimConfig(num_prefill=1, num_decode=1, slow_fraction=0.0, num_clients=8, requests_per_client=16,
               client_prompt_len=512, client_output_len=64, prefill_batch_tokens=2048, prefill_a_s=0.02,
               prefill_b_s_per_token=2.5e-4, prefill_c_s_per_token2=3e-8, prefill_noise=0.05,
               decode_step_s=0.012, decode_step_s_per_seq=0.0015, decode_step_s_per_token=1e-7,
               transfer_s_per_token=2e-6, transfer_latency_s=0.004, ttft_budget_s=30.0, max_tokens=64,
               prefill_blocks=1024, decode_blocks=1024)
C8_POLICY = RouterPolicy(disagg_threshold_tokens=0)



def main_c8(cfg: SimConfig, record: bool = False) -> None:
    rows = simulate_placements(cfg, C8_POLICY)
    from duet.bench.report import write_results  # imports torch; keep it out of the simulator proper

    def plot(ax) -> None:
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [100 * r["local_share"] for r in rows], 0.4, label="prefilled on decode (%)")
        ax.bar([x + 0.2 for x in xs], [r["tpot_p90_ms"] for r in rows], 0.4, label="TPOT p90 (ms)")
        ax.set_xticks(list(xs), [r["pd_placement"] for r in rows])
        ax.legend(fontsize=8)

    columns = ["pd_placement", "requests", "disaggregated", "local_prefill", "local_share", "decisions", "ttft_p50_s",
               "ttft_p90_s", "tpot_p50_ms", "tpot_p90_ms", "prefill_util", "ttft_pred_rel_err_p50"]
    write_results("router_sim_c8", rows, columns, device="cpu", plot=plot,
                  extra={"config": cfg.__dict__, "policy": C8_POLICY.__dict__}, record=record)
