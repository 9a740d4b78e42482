"""The children of benchmarks/real_models.py: one measurement (or one ONNX export) per fresh process.

Each child gets a JSON spec and prints one JSON object as its last stdout line:

    torch   build the family's model and inputs at length n, run the same pipeline once at
            WARMUP_N (kernels, thread pool, the export machinery's lazy imports), cap further
            allocation at `limit_gib` (`rewriter.tools.measure.limit_extra_memory`), then measure
            one call: the forward (inference under no_grad, or forward + last_hidden_state.sum()
            .backward()); for mode "rewritten" the call is `rewriter.optimize_module` at length n
            followed by that forward, and the optimise call's own peak and time are also reported.
    export  export the family's eager model with `torch.onnx.export(dynamo=True)` at EXPORT_N with
            a dynamic sequence axis, `rewriter.optimize_onnx` it (target auto), check the two files
            agree on ONNX Runtime with a padded mask at a length past Mistral's window, and write both
            (no measurement).
    onnx    an ONNX Runtime CPU session of one file, warmed up at WARMUP_N, its run at n measured.

"extra_peak_mib" is the peak RSS during the measured call above RSS just before it (model, inputs
and session already built); "seconds"/"cpu_seconds" are the forward's wall and CPU time. A call
that fails to allocate under the cap reports {"note": "out of memory (> X GiB) ..."} instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from hf_families import NoSuchImplementation, build_model, padding_mask, sliding_window_for, token_ids

__all__ = ["WARMUP_N", "EXPORT_N", "run_child"]

logger = logging.getLogger(__name__)

WARMUP_N = 128
EXPORT_N = 128
ONNX_CHECK_MARGIN = 300  # the files are compared at the window + this (within the shortest length), padding included
ONNX_CHECK_TOLERANCE = 1e-4


def _inputs(batch: int, n: int) -> tuple:
    return token_ids(batch, n), padding_mask(batch, n)


def _measured(call, limit_gib: float, marks: dict) -> dict:
    """Measure `call` under an allocation cap of `limit_gib`; `marks` holds what the call recorded."""
    from rewriter.tools.measure import is_out_of_memory, limit_extra_memory, measure_call

    limit_extra_memory(int(limit_gib * 2**30))
    try:
        measured = measure_call(call)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        where = f" in {marks['stage']}" if "stage" in marks else ""
        return {"note": f"out of memory (> {limit_gib:g} GiB){where}"}
    result = {"extra_peak_mib": measured.extra_peak_mib, "call_seconds": measured.seconds,
              "seconds": marks.pop("forward_seconds", measured.seconds),
              "cpu_seconds": marks.pop("forward_cpu_seconds", measured.cpu_seconds)}
    if "optimize_peak_bytes" in marks:
        result["optimize_extra_mib"] = (marks.pop("optimize_peak_bytes") - measured.baseline_bytes) / 2**20
    marks.pop("stage", None)
    return {**result, **marks}


def _torch_call(spec: dict, n: int):
    """The call to measure at length n for `spec`, and the dict it records its marks in."""
    import torch

    import rewriter
    from rewriter.tools.measure import peak_rss_bytes

    implementation = "sdpa" if spec["mode"] == "sdpa" else "eager"
    model = build_model(spec["family"], implementation, spec["max_length"], sliding_window_for(n, spec["window"]))
    ids, mask = (torch.from_numpy(array) for array in _inputs(spec["batch"], n))
    marks: dict = {}

    def forward(module):
        if spec["backward"]:
            module(ids, attention_mask=mask).last_hidden_state.sum().backward()
        else:
            with torch.no_grad():
                module(ids, attention_mask=mask)

    def call():
        module = model
        if spec["mode"] == "rewritten":
            marks["stage"] = "the optimise call"
            start = time.perf_counter()
            module, report = rewriter.optimize_module(model, (ids,), example_kwargs={"attention_mask": mask},
                                                      dynamic_shapes=None)  # at this length, as a user would
            marks.update(optimize_peak_bytes=peak_rss_bytes(), optimize_seconds=time.perf_counter() - start,
                         blocks=f"{report.rewritten_count} of {len(report.matches)}")
        marks["stage"] = "the forward"
        start, cpu_start = time.perf_counter(), time.process_time()
        forward(module)
        marks.update(forward_seconds=time.perf_counter() - start, forward_cpu_seconds=time.process_time() - cpu_start)

    return call, marks


def torch_point(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        warm_up, _ = _torch_call(spec, WARMUP_N)
    except NoSuchImplementation as error:
        return {"note": f"n/a ({error})"}
    warm_up()
    del warm_up
    call, marks = _torch_call(spec, spec["n"])
    return _measured(call, spec["limit_gib"], marks)


def export_family(spec: dict) -> dict:
    """Write `<dir>/<family>.onnx` (as exported) and `<family>.optimized.onnx`; what was rewritten."""
    import onnx
    import torch

    import rewriter
    from rewriter.verify import verify_onnx

    window = sliding_window_for(spec["min_length"], spec["window"])
    model = build_model(spec["family"], "eager", spec["max_length"], window)
    ids, mask = (torch.from_numpy(array) for array in _inputs(spec["batch"], EXPORT_N))
    seq = torch.export.Dim("seq", min=2, max=spec["max_length"])
    exported = os.path.join(spec["dir"], f"{spec['family']}.onnx")
    program = torch.onnx.export(model, (ids,), kwargs={"attention_mask": mask}, dynamo=True, verbose=False,
                                input_names=["input_ids", "attention_mask"],
                                dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    program.save(exported)
    optimized, report = rewriter.optimize_onnx(exported)
    path = os.path.join(spec["dir"], f"{spec['family']}.optimized.onnx")
    onnx.save(optimized, path)
    check_n = min(spec["min_length"], window + ONNX_CHECK_MARGIN)  # past Mistral's window, so that it is checked too
    ids, mask = _inputs(spec["batch"], check_n)
    check = verify_onnx(onnx.load(exported), optimized, feeds={"input_ids": ids, "attention_mask": mask},
                        rtol=ONNX_CHECK_TOLERANCE, atol=ONNX_CHECK_TOLERANCE)
    return {"exported": exported, "optimized": path, "ok": check.ok, "check": check.message, "check_n": check_n,
            "window": window,
            "blocks": f"{report.rewritten_count} of {len(report.matches)}",
            "targets": sorted({m.target for m in report.matches if m.rewritten})}


def onnx_point(spec: dict) -> dict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = spec["threads"], 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])

    def feeds(n):
        ids, mask = _inputs(spec["batch"], n)
        return {"input_ids": ids, "attention_mask": mask}

    session.run(None, feeds(WARMUP_N))  # kernels and thread pool; ORT's arena still grows in the measured run
    measured_feeds = feeds(spec["n"])
    return _measured(lambda: session.run(None, measured_feeds), spec["limit_gib"], {})


def run_child(spec_json: str) -> int:
    """Run the child `spec_json` describes and print its JSON result as the last stdout line."""
    spec = json.loads(spec_json)
    result = {"torch": torch_point, "export": export_family, "onnx": onnx_point}[spec["kind"]](spec)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0
