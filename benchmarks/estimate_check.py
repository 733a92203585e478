#!/usr/bin/env python
"""How close ``--print-config``'s wall-time estimate comes to the run it estimates, on digits.

    python benchmarks/estimate_check.py                           # README command 1 (both CLIs)
    python benchmarks/estimate_check.py --iters 300 --epochs 3    # a shorter check
    python benchmarks/estimate_check.py --iters 100 --epochs 1 --ssl-args "--sup-rounds 2"

For each CLI in turn (pretraining, then LaplaceNet from its checkpoint, as README command 1): the
estimate of ``--print-config``, then the same command run in a subprocess and timed end to end
(start-up, data, the run, writing its files). Prints one JSON line: the estimate, the measured wall
time and their ratio per CLI, and ``within_2x`` (both ratios in [0.5, 2]). Run it on a quiet machine:
the estimate times a few steps, so other processes that come or go during the run move the ratio.
"""
import argparse
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import pretrain_drl  # noqa: E402
import train_ssl  # noqa: E402


def estimate_and_run(script, main, args) -> dict:
    """``{"estimate_s", "measured_s", "ratio"}`` of one CLI with ``args``."""
    with contextlib.redirect_stdout(io.StringIO()):
        estimate = main([*args, "--print-config"])["seconds"]
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--no-progress"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    measured = time.perf_counter() - start
    return {"estimate_s": None if estimate is None else round(estimate, 1), "measured_s": round(measured, 1),
            "ratio": None if estimate is None else round(estimate / measured, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=0, help="pretraining iterations (0: digits' default, 2,000)")
    p.add_argument("--epochs", type=int, default=0, help="LaplaceNet semi-supervised epochs (0: the default)")
    p.add_argument("--drl-args", default="", help="more flags for pretrain_drl.py")
    p.add_argument("--ssl-args", default="", help="more flags for train_ssl.py")
    p.add_argument("--out", default="", help="folder for the two run dirs (default: a temporary one)")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="estimate_check_")
    drl = ["--out", os.path.join(out, "drl")] + (["--iters", str(args.iters)] if args.iters else [])
    ssl = ["--init", os.path.join(out, "drl", "ckpt.pt"), "--out", os.path.join(out, "ssl")]
    ssl += ["--epochs", str(args.epochs)] if args.epochs else []
    rows = {}
    for name, script, main, flags in (("pretrain_drl", "pretrain_drl.py", pretrain_drl.main, drl + shlex.split(args.drl_args)),
                                      ("train_ssl", "train_ssl.py", train_ssl.main, ssl + shlex.split(args.ssl_args))):
        rows[name] = estimate_and_run(script, main, flags)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)         # progress; the JSON line comes last
    import torch
    ok = all(r["ratio"] is not None and 0.5 <= r["ratio"] <= 2 for r in rows.values())
    print(json.dumps({"benchmark": "estimate_check", "dataset": "digits", "iters": args.iters or 2000,
                      "epochs": args.epochs or "default", "drl_args": args.drl_args, "ssl_args": args.ssl_args,
                      "threads": torch.get_num_threads(),
                      "load_average": os.getloadavg()[0], **rows, "within_2x": ok}), flush=True)


if __name__ == "__main__":
    main()
