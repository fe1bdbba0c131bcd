"""Runs an ONNX graph in ONNX Runtime on the inputs tests/onnx.rs sends and prints its outputs.

Reads one JSON object from the file named by argv[1]:
  {"model": PATH, "fp16": bool,
   "feeds": {NAME: {"dtype": "int32"|"float32", "shape": [...], "data": [...]}}}
and prints {"inputs": [[name, type, shape]...], "outputs": {NAME: nested lists}} as JSON.
With "fp16", the graph is first converted as clip-as-service converts it on a GPU
(onnxconverter-common's convert_float_to_float16_model_path, which clip_server's pinned
onnxmltools re-exports): every float tensor, cast and input becomes float16.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

req = json.load(open(sys.argv[1]))
model = req["model"]
if req.get("fp16"):
    import warnings

    import onnx
    from onnxconverter_common.float16 import convert_float_to_float16_model_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16_model_path(model)
    model = model + ".f16.onnx"
    onnx.save_model(converted, model)
opts = ort.SessionOptions()
opts.log_severity_level = 3
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
types = {i.name: i.type for i in session.get_inputs()}
feeds = {
    name: np.asarray(f["data"], dtype="float16" if types[name] == "tensor(float16)" else f["dtype"])
    .reshape(f["shape"])
    for name, f in req["feeds"].items()
}
names = [o.name for o in session.get_outputs()]
values = session.run(names, feeds)
print(json.dumps({
    "inputs": [[i.name, i.type, i.shape] for i in session.get_inputs()],
    "outputs": {n: v.astype(np.float32).tolist() for n, v in zip(names, values)},
}))
