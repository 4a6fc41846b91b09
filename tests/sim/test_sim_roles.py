"""Mode auto in the simulator: the pure RolePolicy's decisions change the simulated deployment,
and a mixed worker is the chunked colocated worker."""

from __future__ import annotations

from tetri.bench.records import Slo
from tetri.sim.config import SimConfig
from tetri.sim.simulator import simulate


def test_role_decisions_reshape_the_deployment_and_pay(h200_cost, make_requests):
    # long prompts, short answers: one prefill worker of four is swamped, three decode workers idle
    reqs = make_requests(300, 30.0, (2000, 3000), (10, 60), seed=2)
    fixed = simulate(reqs, SimConfig(mode="tetri", num_gpus=4, num_prefill=1, num_decode=3, num_blocks=3000),
                     h200_cost)
    auto = simulate(reqs, SimConfig(mode="auto", num_gpus=4, num_prefill=1, num_decode=3, num_blocks=3000,
                                    check_invariants=True), h200_cost)
    assert fixed.stats["roles_final"] == {"decode": 3, "prefill": 1} and fixed.stats["role_decisions"] == []
    decisions = auto.stats["role_decisions"]
    assert decisions and auto.stats["flips"] == len(decisions)
    assert decisions[0]["from"] == "decode" and decisions[0]["to"] == "mixed"
    assert decisions[0]["reason"].startswith("prefill starved")
    assert auto.stats["roles_final"].get("mixed", 0) >= 1
    assert all(r.ok for r in auto.records)
    mean = lambda res: sum(r.ttft_s for r in res.records) / len(res.records)  # noqa: E731
    assert mean(auto) < 0.5 * mean(fixed)
    slo = Slo(ttft_s=1.0, tpot_s=0.05)
    assert sum(map(slo.met_by, auto.records)) > sum(map(slo.met_by, fixed.records))
    served = {r.decode_worker for r in auto.requests} - {None}
    mixed_ids = {d["worker"] for d in decisions if d["to"] == "mixed"}
    assert served & mixed_ids  # the workers it made mixed decoded requests


def test_an_all_mixed_deployment_without_flips_is_colocated_chunked(h200_cost, make_requests):
    reqs = make_requests(150, 20.0, (20, 1500), (5, 200), seed=4)
    chunked = simulate(reqs, SimConfig(mode="colocated-chunked", num_gpus=3), h200_cost)
    # (held forever: no move, not even the light-load split toward prefill + decode, which this
    # light load would otherwise make)
    auto = simulate(reqs, SimConfig(mode="auto", num_gpus=3, role_dwell_s=1e9), h200_cost)
    assert auto.stats["flips"] == 0 and auto.stats["roles_final"] == {"mixed": 3}
    assert [r.ttft_s for r in auto.records] == [r.ttft_s for r in chunked.records]
    assert [r.e2e_s for r in auto.records] == [r.e2e_s for r in chunked.records]


def test_the_declared_tpot_reaches_the_policy(h200_cost, make_requests):
    reqs = make_requests(200, 40.0, (1500, 2500), (40, 120), seed=6)
    loose = simulate(reqs, SimConfig(mode="auto", num_gpus=4, num_prefill=3, num_decode=1), h200_cost)
    tight = simulate(reqs, SimConfig(mode="auto", num_gpus=4, num_prefill=3, num_decode=1, role_tpot_s=0.01),
                     h200_cost)
    assert loose.stats["role_decisions"] != tight.stats["role_decisions"]
    assert loose.stats["role_decisions"] == []  # 1 decode worker's slots and blocks have room
    assert tight.stats["role_decisions"][0]["reason"].startswith("decode starved")  # its pace does not
