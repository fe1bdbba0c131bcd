"""Runs an ONNX graph in ONNX Runtime on the inputs tests/onnx.rs sends and prints its outputs.

Reads one JSON object from the file named by argv[1]:
  {"model": PATH, "feeds": {NAME: {"dtype": "int32"|"float32", "shape": [...], "data": [...]}}}
and prints {"inputs": [[name, type, shape]...], "outputs": {NAME: nested lists}} as JSON.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

req = json.load(open(sys.argv[1]))
opts = ort.SessionOptions()
opts.log_severity_level = 3
session = ort.InferenceSession(req["model"], opts, providers=["CPUExecutionProvider"])
feeds = {
    name: np.asarray(f["data"], dtype=f["dtype"]).reshape(f["shape"])
    for name, f in req["feeds"].items()
}
names = [o.name for o in session.get_outputs()]
values = session.run(names, feeds)
print(json.dumps({
    "inputs": [[i.name, i.type, i.shape] for i in session.get_inputs()],
    "outputs": {n: v.tolist() for n, v in zip(names, values)},
}))
