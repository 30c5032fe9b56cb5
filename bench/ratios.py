#!/usr/bin/env python3
"""Reads the JSON lines of bench/peers.sh and prints Tern's ratios to its peers, as a Markdown
table (for the README) followed by one JSON object per comparison. Standard library only.

Latency ratio = Tern time / peer time (below 1: Tern faster). Throughput ratio = Tern images/s
/ peer images/s (above 1: Tern faster). PyTorch's figure is its faster memory layout."""
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def main():
    rows = load(sys.argv[1])
    tern = {(r["workload"], r["arch"].split("_")[-1], r["threads"]): r
            for r in rows if r.get("bench") == "tern"}
    ort = {(r["model"].split("_")[-1].split(".")[0], r["batch"], r["threads"]): r
           for r in rows if r.get("kind") == "ort_fp32_infer"}
    torch = {}
    for r in rows:
        if r.get("kind") in ("fp32_infer", "fp32_train_step"):
            key = (r["kind"], r["model"], r.get("res"), r["batch"], r["threads"])
            if key not in torch or r["img_per_s"] > torch[key]["img_per_s"]:
                torch[key] = r  # the faster layout
    out = []
    print("| workload | threads | Tern | onnxruntime | PyTorch (best layout) | Tern vs best peer |")
    print("|---|---|---|---|---|---|")
    for (work, arch, t), r in sorted(tern.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        batch = r["batch"]
        if work.startswith("infer"):
            o = ort.get((arch, batch, t))
            p = torch.get(("fp32_infer", arch, 224, batch, t))
            if batch == 1:
                fmt = lambda s: f"{1e3 * s:.2f} ms"  # noqa: E731
                mine = r["median_ms"] / 1e3
                peers = [x["median_s"] for x in (o, p) if x]
                ratio = mine / min(peers) if peers else None
                desc = "time ratio"
            else:
                fmt = lambda s: f"{batch / s:.1f} img/s"  # noqa: E731
                mine = r["median_ms"] / 1e3
                peers = [x["median_s"] for x in (o, p) if x]
                ratio = min(peers) / mine if peers else None
                desc = "speed ratio"
            cells = [fmt(mine), fmt(o["median_s"]) if o else "-", fmt(p["median_s"]) if p else "-"]
        else:
            res = 224 if work == "train_224" else 32
            p = torch.get(("fp32_train_step", arch, res, batch, t))
            cells = [f"{r['images_per_s']:.1f} img/s", "-",
                     f"{p['img_per_s']:.1f} img/s ({p['format']})" if p else "-"]
            ratio = r["images_per_s"] / p["img_per_s"] if p else None
            desc = "speed ratio"
        name = f"{work} {arch} b{batch}"
        rs = f"{ratio:.2f}x ({desc})" if ratio else "-"
        print(f"| {name} | {t} | " + " | ".join(cells) + f" | {rs} |")
        out.append({"workload": work, "arch": arch, "batch": batch, "threads": t,
                    "ratio": ratio, "ratio_kind": desc})
    print()
    print("| training workload | 1 thread | 2 threads | scaling |")
    print("|---|---|---|---|")
    for work in ("train_224", "train_fashion"):
        one, two = tern.get((work, "small", 1)), tern.get((work, "small", 2))
        if one and two:
            scale = two["images_per_s"] / one["images_per_s"]
            print(f"| {work} | {one['images_per_s']:.1f} img/s | {two['images_per_s']:.1f} img/s "
                  f"| {scale:.2f}x |")
            out.append({"workload": work, "threads_2_over_1": scale})
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
