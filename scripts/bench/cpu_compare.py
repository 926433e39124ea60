"""Times the UNet step our CPU path ran (`latent-gen bench unet --cpu --dump`) in PyTorch and ONNX Runtime on
the CPU: the same weights (the diffusers folder `latent-gen bench write-model` wrote), the same inputs, the
same thread count; checks each output against ours, then prints a table and writes JSON.

Development tool (needs torch, diffusers, onnx, onnxruntime; scripts/bench-cpu installs the last two into
$PYTHON if missing). scripts/bench-cpu runs it.
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from safetensors.numpy import load_file


def timed(run, repeat):
    run()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        out = run()
    return (time.perf_counter() - t) * 1e3 / repeat, out


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the diffusers folder of `latent-gen bench write-model`")
    ap.add_argument("--io", required=True, help="the --dump of `latent-gen bench unet --cpu`")
    ap.add_argument("--ours", required=True, help="the --json of `latent-gen bench unet --cpu`")
    ap.add_argument("--work", required=True, help="a folder for the ONNX export")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    io = load_file(args.io)
    ours = json.load(open(args.ours))
    sample, context = torch.from_numpy(io["sample"]), torch.from_numpy(io["context"])
    t = torch.tensor([float(io["timestep"][0])] * sample.shape[0])
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet"), torch_dtype=torch.float32).eval()

    def torch_step():
        with torch.inference_mode():
            return unet(sample, t, encoder_hidden_states=context).sample

    torch_ms, torch_out = timed(torch_step, args.repeat)
    torch_err = rel_err(io["out"], torch_out.numpy())
    print(f"PyTorch {torch.__version__}: {torch_ms:.0f} ms, ours vs PyTorch rel {torch_err:.2e}", flush=True)

    # The export (weights as external data files beside it) is made once per latent size.
    onnx_dir = os.path.join(args.work, f"onnx-{sample.shape[2]}")
    onnx_path = os.path.join(onnx_dir, "unet.onnx")
    if not os.path.exists(onnx_path):
        os.makedirs(onnx_dir, exist_ok=True)
        print("exporting the UNet to ONNX (minutes)", flush=True)
        with torch.inference_mode():
            torch.onnx.export(
                unet, (sample, t, context), onnx_path, input_names=["sample", "timestep", "context"],
                output_names=["out"], opset_version=17, dynamo=False,
            )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    feed = {"sample": io["sample"], "timestep": t.numpy(), "context": io["context"]}
    ort_ms, ort_out = timed(lambda: sess.run(None, feed)[0], args.repeat)
    ort_err = rel_err(io["out"], ort_out)
    print(f"ONNX Runtime {ort.__version__}: {ort_ms:.0f} ms, ours vs ONNX Runtime rel {ort_err:.2e}", flush=True)

    ms = ours["unet_cfg_step_ms"]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "threads": args.threads,
        "size": ours["width"],
        "ours_ms": ms,
        "pytorch_ms": torch_ms,
        "onnxruntime_ms": ort_ms,
        "ours_over_pytorch": ms / torch_ms,
        "ours_over_onnxruntime": ms / ort_ms,
        "rel_err_vs_pytorch": torch_err,
        "rel_err_vs_onnxruntime": ort_err,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }
    json.dump(result, open(args.json, "w"), indent=2)
    print(f"\n{result['machine']}")
    print(f"\n| SD 1.5 UNet CFG step, {ours['width']}x{ours['height']}, f32, {args.threads} threads | ms | ours / it |")
    print("|---|---|---|")
    print(f"| ours (CPU path, candle) | {ms:.0f} | 1.00 |")
    print(f"| PyTorch {torch.__version__} | {torch_ms:.0f} | {ms / torch_ms:.2f} |")
    print(f"| ONNX Runtime {ort.__version__} | {ort_ms:.0f} | {ms / ort_ms:.2f} |")


if __name__ == "__main__":
    main()
