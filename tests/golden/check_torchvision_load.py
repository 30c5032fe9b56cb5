#!/usr/bin/python3
"""Checks that a model file written by Tern loads into torchvision and computes what Tern does.

usage: /usr/bin/python3 tests/golden/check_torchvision_load.py TERN_BIN

Trains one step with `tern step` from a fixture's initial weights (so running statistics and
num_batches_tracked have moved), loads the written file into torchvision's MobileNetV3 with
load_state_dict(strict=True), and compares torchvision's eval-mode logits with `tern forward`
on the same file. Needs Debian's python3-torch and python3-torchvision (not CI).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import build_model, read_safetensors, write_safetensors  # noqa: E402


def main():
    tern = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("small_bn", "large_bn", "small_gn"):
        tensors, meta = read_safetensors(os.path.join(here, f"{name}.safetensors"))
        with tempfile.TemporaryDirectory() as d:
            w = os.path.join(d, "w.safetensors")
            x = os.path.join(d, "x.safetensors")
            lab = os.path.join(d, "l.safetensors")
            w2 = os.path.join(d, "w2.safetensors")
            y = os.path.join(d, "y.safetensors")
            write_safetensors(w, [(k[5:], v) for k, v in tensors.items() if k.startswith("init.")], {})
            write_safetensors(x, [("input", tensors["input"])], {})
            write_safetensors(lab, [("labels", tensors["labels"])], {})
            args = ["--arch", meta["arch"], "--width-mult", meta["width_mult"],
                    "--in-channels", meta["in_channels"], "--num-classes", meta["num_classes"],
                    "--norm", meta["norm"]]
            subprocess.run([tern, "step", *args, "--weights", w, "--input", x, "--labels", lab,
                            "--lr", "0.1", "--momentum", "0.9", "--output", w2], check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run([tern, "forward", "--weights", w2, "--input", x, "--output", y],
                           check=True)
            state, _ = read_safetensors(w2)
            model = build_model(meta["arch"], float(meta["width_mult"]), int(meta["in_channels"]),
                                int(meta["num_classes"]), meta["norm"])
            model.load_state_dict(state, strict=True)
            model.eval()
            with torch.no_grad():
                want = model(tensors["input"]).numpy()
            got = read_safetensors(y)[0]["logits"].numpy()
            err = float(np.abs(got - want).max() / np.abs(want).max())
            print(f"{name}: torchvision loaded Tern's file (strict); logits relative error {err:.2e}")
            assert err < 1e-4, err


if __name__ == "__main__":
    main()
