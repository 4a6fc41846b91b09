"""tetri-sim: a discrete-event simulator of a tetri-serve cluster, and tetri-plan.

It drives the very policy objects of `tetri.sched` (chunk packer, dispatchers, decode
admission/batching, predictor, flip) under a simulated clock, costs every forward pass with
a roofline model (`costmodel`, calibrated against the real engine by `tetri-sim profile`),
and reports exactly like tetri-bench.

    costmodel.py   hardware/model presets, the roofline step cost
    calibrate.py   fit the cost model to measured step times
    profiling.py   measure the real engine (CPU) and check the fit
    requests.py    simulated requests, predictor noise, records
    workers.py     event loop, worker step cycle, shared decode batching
    colocated.py   vLLM-v0.2 (colocated) and Sarathi (colocated-chunked) workers
    disagg.py      prefill/decode workers (disagg = DistServe, tetri = TetriInfer)
    cluster.py     dispatch, prediction, flips
    simulator.py   simulate() and the report
    cli.py         tetri-sim;  plan.py  tetri-plan;  profile_cli.py  tetri-sim profile
"""
