#!/usr/bin/python3
"""Generate Tern's golden fixtures from torchvision's MobileNetV3.

Run from the repository root with Debian's interpreter (which has torch 1.13 / torchvision 0.14):

    /usr/bin/python3 tests/golden/make_fixtures.py

Writes tests/golden/<config>.safetensors, state_dict_small.txt and state_dict_large.txt.
See README.md in this directory for the file layout.
"""
import json
import math
import os
import struct
import sys
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import mobilenetv3 as mv3

OUT_DIR = os.path.dirname(os.path.abspath(__file__))

# Widths reduced from the original plan (small_bn 0.5, large_bn 0.25) to keep all fixtures
# under ~6 MB; non-round multipliers also exercise _make_divisible rounding.
CONFIGS = {
    "small_bn": dict(arch="mobilenet_v3_small", width_mult=0.3, in_channels=1, norm="batch",
                     height=32, width=32, batch=4, num_classes=10, label_smoothing=0.1,
                     lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True, seed=1),
    "large_bn": dict(arch="mobilenet_v3_large", width_mult=0.2, in_channels=3, norm="batch",
                     height=40, width=40, batch=3, num_classes=7, label_smoothing=0.0,
                     lr=0.05, momentum=0.9, weight_decay=0.0, nesterov=False, seed=2),
    "small_gn": dict(arch="mobilenet_v3_small", width_mult=0.25, in_channels=3, norm="group",
                     height=33, width=33, batch=2, num_classes=5, label_smoothing=0.0,
                     lr=0.1, momentum=0.0, weight_decay=5e-4, nesterov=False, seed=3),
}

# ---------------------------------------------------------------------------------------------
# safetensors writer / reader (no safetensors package available)

_DT = {torch.float32: ("F32", np.float32), torch.int64: ("I64", np.int64)}
_NP = {"F32": np.float32, "I64": np.int64}


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, tensor) in the order they are laid out."""
    header = {}
    blobs = []
    off = 0
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        code, npdt = _DT[t.dtype]
        raw = t.numpy().astype(np.dtype(npdt).newbyteorder("<"), copy=False).tobytes()
        assert name not in header, name
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((-len(hj)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    expect = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = info["data_offsets"]
        assert b == expect, (name, b, expect)  # contiguous, no holes
        expect = e
        arr = np.frombuffer(data[base + b:base + e], dtype=np.dtype(_NP[info["dtype"]]).newbyteorder("<"))
        out[name] = torch.from_numpy(arr.copy().reshape(info["shape"]))
    assert base + expect == len(data)
    return out, meta


# ---------------------------------------------------------------------------------------------


def build_model(arch, width_mult, in_channels, num_classes, norm):
    if norm == "batch":
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
    elif norm == "group":
        norm_layer = lambda c: nn.GroupNorm(math.gcd(32, c), c)  # noqa: E731
    else:
        raise ValueError(norm)
    setting, last_channel = mv3._mobilenet_v3_conf(arch, width_mult=width_mult)
    model = mv3.MobileNetV3(setting, last_channel, num_classes=num_classes, dropout=0.0,
                            norm_layer=norm_layer)
    if in_channels != 3:
        old = model.features[0][0]
        conv = nn.Conv2d(in_channels, old.out_channels, 3, stride=2, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")
        model.features[0][0] = conv
    return model


def randomise_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.num_batches_tracked.fill_(3)


def clone_sd(model):
    return [(k, v.detach().clone()) for k, v in model.state_dict().items()]


def make_config(name, c):
    torch.manual_seed(c["seed"])
    model = build_model(c["arch"], c["width_mult"], c["in_channels"], c["num_classes"], c["norm"])
    randomise_norms(model)
    init_sd = clone_sd(model)

    x = torch.randn(c["batch"], c["in_channels"], c["height"], c["width"], dtype=torch.float32)
    labels = torch.randint(0, c["num_classes"], (c["batch"],), dtype=torch.int64)

    model.eval()
    with torch.no_grad():
        logits_eval = model(x.clone()).clone()

    model.train()
    logits_train = model(x.clone())
    loss = F.cross_entropy(logits_train, labels, label_smoothing=c["label_smoothing"])
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [(n, p.grad.detach().clone()) for n, p in model.named_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=c["momentum"],
                          weight_decay=c["weight_decay"], nesterov=c["nesterov"])
    opt.step()
    after_sd = clone_sd(model)

    # Sanity: reloading init.* into a fresh model reproduces logits_eval exactly.
    fresh = build_model(c["arch"], c["width_mult"], c["in_channels"], c["num_classes"], c["norm"])
    fresh.load_state_dict(dict(init_sd))
    fresh.eval()
    with torch.no_grad():
        again = fresh(x.clone())
    assert torch.equal(again, logits_eval), "init reload does not reproduce logits_eval"

    tensors = [("init." + k, v) for k, v in init_sd]
    tensors += [("input", x), ("labels", labels), ("logits_eval", logits_eval),
                ("logits_train", logits_train.detach()), ("loss", loss.detach().reshape(()))]
    tensors += [("grad." + n, g) for n, g in grads]
    tensors += [("after." + k, v) for k, v in after_sd]
    meta = dict(arch=c["arch"], width_mult=repr(c["width_mult"]), in_channels=c["in_channels"],
                num_classes=c["num_classes"], norm=c["norm"], height=c["height"], width=c["width"],
                batch=c["batch"], label_smoothing=repr(c["label_smoothing"]), lr=repr(c["lr"]),
                momentum=repr(c["momentum"]), weight_decay=repr(c["weight_decay"]),
                nesterov="1" if c["nesterov"] else "0", seed=c["seed"],
                torch_version=torch.__version__, torchvision_version=torchvision.__version__)
    path = os.path.join(OUT_DIR, name + ".safetensors")
    write_safetensors(path, tensors, meta)

    # Re-parse and spot-check.
    back, bmeta = read_safetensors(path)
    assert len(back) == len(tensors)
    for k, v in tensors:
        assert back[k].dtype == v.dtype and tuple(back[k].shape) == tuple(v.shape), k
        assert torch.equal(back[k], v), k
    assert back["loss"].shape == () and back["labels"].dtype == torch.int64
    nbt = [k for k in back if k.endswith("num_batches_tracked")]
    for k in nbt:
        assert back[k].shape == () and back[k].dtype == torch.int64
        assert int(back[k]) == (3 if k.startswith("init.") else 4), k
    assert bmeta["arch"] == c["arch"] and bmeta["torch_version"] == torch.__version__

    nparams = sum(p.numel() for p in model.parameters())
    print(f"{name}: {os.path.getsize(path)} bytes, {nparams} params, {len(init_sd)} state_dict "
          f"entries, loss {loss.item():.6f}")
    return os.path.getsize(path)


def write_state_dict_listing(arch, fname):
    torch.manual_seed(0)
    model = build_model(arch, 1.0, 3, 1000, "batch")
    nparams = sum(p.numel() for p in model.parameters())
    lines = [f"# params {nparams}"]
    for k, v in model.state_dict().items():
        dt = {torch.float32: "F32", torch.int64: "I64"}[v.dtype]
        shape = ",".join(str(s) for s in v.shape) if v.dim() else "scalar"
        lines.append(f"{k} {dt} {shape}")
    with open(os.path.join(OUT_DIR, fname), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{fname}: {arch} {nparams} params, {len(lines) - 1} state_dict entries")
    return nparams


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")

    total = 0
    for name, c in CONFIGS.items():
        total += make_config(name, c)
    print(f"total fixture bytes: {total}")

    ns = write_state_dict_listing("mobilenet_v3_small", "state_dict_small.txt")
    nl = write_state_dict_listing("mobilenet_v3_large", "state_dict_large.txt")
    assert ns == 2542856 and nl == 5483032, (ns, nl)


if __name__ == "__main__":
    sys.exit(main())
