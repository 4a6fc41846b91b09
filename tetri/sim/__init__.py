"""tetri-sim: a discrete-event simulator of a tetri-serve cluster, and tetri-plan.

It drives the server's own request lifecycle, the real `tetri.sched.front.FrontScheduler`
(dispatch, chunk packing, handoff, predictor, flips; through `front_adapter.py`), and the
role cores' policies (decode admission/batching) under a simulated clock, costs every forward pass with
a roofline model (`costmodel`, calibrated against the real engine by `tetri-sim profile`),
and reports exactly like tetri-bench.

    costmodel.py   hardware/model presets, the roofline step cost
    calibrate.py   fit the cost model to measured step times
    profiling.py   measure the real engine (CPU) and check the fit
    requests.py    simulated requests, predictor noise, records
    workers.py     event loop, worker step cycle, shared decode batching
    colocated.py   vLLM-v0.2 (colocated) and Sarathi (colocated-chunked) workers
    disagg.py      prefill/decode/mixed workers (disagg = DistServe, tetri = TetriInfer, auto)
    prefill_side.py  a worker's prefill role: the front's ChunkPlans (and a mixed worker's own prompts)
    front_adapter.py every call into the real FrontScheduler, its messages delivered to the workers
    cluster.py     workers by mode, the requests, SetRole
    simulator.py   simulate() and the report
    cli.py         tetri-sim;  plan.py  tetri-plan;  profile_cli.py  tetri-sim profile
"""
