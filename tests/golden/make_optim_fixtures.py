#!/usr/bin/python3
"""Generate tests/golden/optim.safetensors: torch.optim and lr_scheduler reference values.

Run from the repository root with Debian's interpreter (torch 1.13):

    /usr/bin/python3 tests/golden/make_optim_fixtures.py

Model-free: one parameter vector of N floats is stepped with a fixed sequence of STEPS gradient
vectors by each optimizer configuration (single-tensor code paths, foreach=False). Tern keeps
hyper-parameters as float32, so every hyper-parameter given to torch here is the float32
value Tern will see (torch then does its scalar arithmetic in double, as Tern does).
Before step LR_CHANGE_STEP the learning rate is halved, to check that a changed lr takes effect.

Tensors (all little-endian):
  param0                 F32 [N]         initial parameters
  grads                  F32 [STEPS, N]  gradient fed to step s
  <case>.params          F32 [STEPS, N]  parameters after each step
  <case>.state.<name>    F32 [N]         optimizer state after the last step, under Tern's
                                         state names (momentum_buffer, exp_avg, ...)
  sched.<name>           F64 [SCHED_STEPS] learning rate used by step k (before scheduler.step())
The configurations (hyper-parameters) are listed in the metadata as JSON and repeated in
tests/test_optim.c.
"""
import json
import os
import struct

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optim.safetensors")
N = 50
STEPS = 5
LR_CHANGE_STEP = 3
GRAD_SCALE = [1.0, 0.5, 2.0, 0.1, 1.0]  # a small gradient late makes amsgrad's max matter
SCHED_STEPS = 20


def f32(x):
    return float(np.float32(x))


# name -> (torch optimizer class, arguments)
CASES = {
    "sgd_momentum": ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd_nesterov": ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    "sgd_dampening": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    "sgd_plain": ("SGD", dict(lr=0.1, weight_decay=0.01)),
    "adam": ("Adam", dict(lr=0.01, weight_decay=0.01)),
    "adam_amsgrad": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, amsgrad=True)),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad": ("AdamW", dict(lr=0.01, amsgrad=True)),
    "rmsprop": ("RMSprop", dict(lr=0.01)),
    "rmsprop_momentum": ("RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.01)),
    "rmsprop_centered": ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True)),
}

# torch state key -> Tern state name
STATE_NAMES = {
    "momentum_buffer": "momentum_buffer",
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "max_exp_avg_sq": "max_exp_avg_sq",
    "square_avg": "square_avg",
    "grad_avg": "grad_avg",
}


# torch's defaults, made explicit so that they too reach torch as float32 values
DEFAULTS = {
    "SGD": {},
    "Adam": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "AdamW": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "RMSprop": dict(alpha=0.99, eps=1e-8),
}


def as_f32(kw):
    out = {}
    for k, v in kw.items():
        if isinstance(v, bool):
            out[k] = v
        elif isinstance(v, tuple):
            out[k] = tuple(f32(x) for x in v)
        else:
            out[k] = f32(v)
    return out


def run_case(cls, kwargs, p0, grads):
    p = torch.nn.Parameter(p0.clone())
    opt = getattr(torch.optim, cls)([p], foreach=False, **as_f32({**DEFAULTS[cls], **kwargs}))
    rows = []
    for s in range(STEPS):
        if s == LR_CHANGE_STEP:
            for g in opt.param_groups:
                g["lr"] = f32(g["lr"] * 0.5)
        p.grad = grads[s].clone()
        opt.step()
        rows.append(p.detach().clone())
    state = {}
    for key, value in opt.state[p].items():
        if key in STATE_NAMES and value is not None:
            state[STATE_NAMES[key]] = value.detach().clone()
    return torch.stack(rows), state


SCHEDULES = {
    # warmup (LinearLR) then cosine annealing, as SequentialLR chains them
    "warmup_cosine": dict(base_lr=0.1, warmup_steps=5, warmup_start_factor=0.1, kind="cosine",
                          total_steps=20, min_lr=0.001),
    "cosine": dict(base_lr=0.05, warmup_steps=0, kind="cosine", total_steps=20, min_lr=0.0),
    "warmup_step": dict(base_lr=0.2, warmup_steps=3, warmup_start_factor=0.25, kind="step",
                        step_size=4, gamma=0.5),
    "step": dict(base_lr=0.1, warmup_steps=0, kind="step", step_size=6, gamma=0.1),
    "warmup_constant": dict(base_lr=0.1, warmup_steps=4, warmup_start_factor=0.5,
                            kind="constant"),
}


def run_schedule(c):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=f32(c["base_lr"]))
    S = torch.optim.lr_scheduler
    w = c["warmup_steps"]
    if c["kind"] == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=c["total_steps"] - w, eta_min=f32(c["min_lr"]))
    elif c["kind"] == "step":
        main = S.StepLR(opt, step_size=c["step_size"], gamma=f32(c["gamma"]))
    else:
        main = S.ConstantLR(opt, factor=1.0, total_iters=0)
    if w > 0:
        warm = S.LinearLR(opt, start_factor=f32(c["warmup_start_factor"]), end_factor=1.0,
                          total_iters=w)
        sched = S.SequentialLR(opt, [warm, main], milestones=[w])
    else:
        sched = main
    lrs = []
    for _ in range(SCHED_STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    return torch.tensor(lrs, dtype=torch.float64)


_DT = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def write_safetensors(path, tensors, metadata):
    header, blobs, off = {}, [], 0
    for name, t in tensors:
        t = t.detach().contiguous()
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        assert name not in header, name
        header[name] = {"dtype": _DT[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((-len(hj)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def main():
    g = torch.Generator().manual_seed(20240611)
    p0 = torch.randn(N, generator=g, dtype=torch.float32)
    grads = torch.stack([torch.randn(N, generator=g, dtype=torch.float32) * GRAD_SCALE[s]
                         for s in range(STEPS)])
    tensors = [("param0", p0), ("grads", grads)]
    for name, (cls, kwargs) in CASES.items():
        rows, state = run_case(cls, kwargs, p0, grads)
        tensors.append((f"{name}.params", rows))
        for sname in sorted(state):
            tensors.append((f"{name}.state.{sname}", state[sname]))
    for name, c in SCHEDULES.items():
        tensors.append((f"sched.{name}", run_schedule(c)))
    meta = {"torch": torch.__version__, "n": N, "steps": STEPS, "lr_change_step": LR_CHANGE_STEP,
            "cases": json.dumps({k: [c, kw] for k, (c, kw) in CASES.items()}),
            "schedules": json.dumps(SCHEDULES)}
    write_safetensors(OUT, tensors, meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
