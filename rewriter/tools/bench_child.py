"""One `rewriter bench` measurement point in a fresh interpreter: the parent's runner and the child.

The parent runs `python bench_child.py SPEC_JSON` with a timeout; the child prints one JSON line
(`extra_peak_mib`, `seconds`, `cpu_seconds`) and exits 0. A child killed by a signal (the kernel's
out-of-memory killer sends SIGKILL), one that fails, and one that runs out of time are reported as
`ChildFailed` with a one-line reason, so a sweep can record the point and go on.

The file runs as a script, not as `rewriter.tools.bench_child`: importing the `rewriter` package imports
torch (seconds per child), which an ONNX Runtime point does not need. It loads its two helpers,
`tools/measure.py` and `verify.py` (numpy, onnx only), from the package folder. A torch point imports
`rewriter` itself.

Spec keys: `kind` ("onnx" | "torch"), `threads`; for "onnx": `path`, `dims` (symbolic input dim
sizes), `warmup_dims`; for "torch": `factory` ("module:callable"), `length`, `rewritten`,
`training`, `sys_path` (the parent's, so the child imports what the parent could).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys

__all__ = ["ChildFailed", "run_json_child", "run_point"]

logger = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_HERE)


class ChildFailed(RuntimeError):
    """A child process gave no measurement; the message says why in one line."""


def run_json_child(command: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run `command`, which prints one JSON object as its last stdout line, and return that object."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"timed out after {timeout_s:g} s") from None
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (out of memory?)" if proc.returncode == -signal.SIGKILL else ""
        raise ChildFailed(f"killed by {name}{hint}")
    if proc.returncode != 0:
        last_line = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ChildFailed(last_line)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = None
    if not isinstance(result, dict):
        raise ChildFailed(f"printed no measurement (last stdout line: {lines[-1] if lines else 'none'!r})")
    return result


def run_point(spec: dict, timeout_s: float) -> dict:
    """Measure the point `spec` describes in a fresh interpreter (see the module docstring)."""
    env = dict(os.environ)
    if spec["kind"] == "torch":
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in spec["sys_path"])
    return run_json_child([sys.executable, os.path.abspath(__file__), json.dumps(spec)], timeout_s, env)


# --------------------------------------------------------------------------- the child


def _sibling(path: str):
    """rewriter/<path>.py loaded from its file, without importing the `rewriter` package."""
    name = path.replace("/", "_")
    spec = importlib.util.spec_from_file_location(f"_bench_child_{name}", os.path.join(_PACKAGE, f"{path}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up while building classes
    spec.loader.exec_module(module)
    return module


def _onnx_call(spec: dict):
    """An ORT session at `threads`, warmed up at `warmup_dims`; its run at `dims` is measured."""
    import onnx
    import onnxruntime

    random_inputs = _sibling("verify").random_inputs
    model = onnx.load(spec["path"], load_external_data=False)  # only the inputs are read
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = spec["threads"], 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])
    session.run(None, random_inputs(model, spec["warmup_dims"]))  # kernels, thread pool: not the arena
    feeds = random_inputs(model, spec["dims"])
    return lambda: session.run(None, feeds)


def _torch_call(spec: dict):
    """The factory's module at `length` (rewritten or eager), run once; the next run is measured."""
    import torch

    import rewriter
    from rewriter.tools.model_source import call_factory

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    module, inputs = call_factory(spec["factory"], spec["length"])
    module = module.eval()
    if spec["rewritten"]:
        module, _ = rewriter.optimize_module(module, inputs, dynamic_shapes=None)  # one length per child

    def forward():
        with torch.no_grad():
            module(*inputs)

    def training_step():
        outputs = module(*inputs)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()).backward()

    call = training_step if spec["training"] else forward
    call()  # warm-up on the same inputs: torch.export specialised the rewritten module to them
    return call


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    measure_call = _sibling("tools/measure").measure_call
    measured = measure_call(_onnx_call(spec) if spec["kind"] == "onnx" else _torch_call(spec))
    print(json.dumps({"extra_peak_mib": measured.extra_peak_mib, "seconds": measured.seconds,
                      "cpu_seconds": measured.cpu_seconds}))
    return 0


if __name__ == "__main__":
    if _HERE in sys.path:  # the script's directory would shadow top-level modules with rewriter's
        sys.path.remove(_HERE)
    sys.exit(_main(sys.argv[1:]))
