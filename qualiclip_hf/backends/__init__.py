"""What runs the model for bulk scoring, beside the model's own PyTorch forward: each is a *scorer* that
`qualiclip_hf.scoring.score_images` calls as `scorer(**processor_outputs)`.

| module | what |
| --- | --- |
| `fusion` | the fp32 speed layer: BatchNorms folded into convolutions, CPU batches in chunks |
| `precision` | choosing and preparing a number format and runtime (`prepare_scorer`, `--precision`, `--backend`) |
| `auto_precision` | `--precision auto`: formats measured on the probe set for the weights in hand, verdicts cached |
| `onnx` | the ONNX export and `OnnxQualiCLIP`, which runs it with ONNX Runtime or OpenVINO |
| `quantization` | int8 with ONNX Runtime static quantization, calibrated on photos |
"""
