"""diffsr beside the authors' own inference code, on identical weights and inputs (docs/compare_official.md).

    python benchmarks/compare_official.py --official-root ../official \\
        --official-python pisa=../official/pisa-venv/bin/python \\
        --official-python s3diff=../official/s3diff-venv/bin/python --rounds 3

Random weights of the real shapes (SD 2.1-base / SD-Turbo; LoRA deltas of the order of the base
weights) are written once under --work in the authors' formats: a diffusers folder, `pisa_sr.pkl`,
`s3diff.pkl`, `de_net.pth`. Each run is a fresh process; the authors' and diffsr's runs of a case
alternate, over --rounds rounds. Per case it prints the median wall time of the whole process, of
inference alone (first image in, last image out: the cold first call included), the peak RSS (on
CUDA: peak GPU memory), the ratios diffsr / authors, and the largest 8-bit difference between the
two tools' outputs.

The authors' scripts run from the checkouts under --official-root (PiSA-SR/, S3Diff/) at the commits
pinned below, through benchmarks/official_shim.py: their files are never edited (checked before and
after every run). The VAE posterior of the random VAE is made narrow (log-variance -30), so their
`latent_dist.sample()` and diffsr's default `.mode()` agree and the outputs can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "official_shim.py"
PINS = {
    "PiSA-SR": ("https://github.com/csslc/PiSA-SR", "9c76e12e261d1980148738a0cff41e5e27d18c9f"),
    "S3Diff": ("https://github.com/ArcticHare105/S3Diff", "6a2e0a47676f2f01fccdfd4e940077d3038d953e"),
}
PREPARED_VERSION = 1
LORA_STD = {"pisa": 0.06, "s3diff": 0.02}  # factor std: deltas of the order of the base weights


@dataclass(frozen=True)
class Case:
    name: str
    method: str  # pisa | s3diff | vae
    side: int  # LR side (vae: latent side)
    lambdas: tuple[float, float] | None = None

    @property
    def repo(self) -> str:
        return "S3Diff" if self.method == "s3diff" else "PiSA-SR"


CASES = {
    c.name: c
    for c in (
        Case("pisa-default-128", "pisa", 128),
        Case("pisa-adjustable-128", "pisa", 128, (0.6, 1.3)),
        Case("s3diff-128", "s3diff", 128),
        Case("pisa-default-512", "pisa", 512),
        Case("pisa-adjustable-512", "pisa", 512, (0.6, 1.3)),
        Case("s3diff-512", "s3diff", 512),
        Case("vae-decoder-256", "vae", 256),
    )
}


# ------------------------------------------------------------------------------------------------
# Weights and inputs in the authors' formats
def prepare(work: Path, *, seed: int = 0, log=print) -> dict:
    """Write (once) the SD folder, pisa_sr.pkl, s3diff.pkl, de_net.pth, the inputs and the latent."""
    manifest = work / "prepared.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("version") == PREPARED_VERSION:
        return json.loads(manifest.read_text())
    import torch
    from PIL import Image

    from diffsr.methods import pisa, s3diff
    from diffsr.synthetic import narrow_posterior, random_sd_parts, save_sd_parts

    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    sd = work / "sd21"
    parts = random_sd_parts("sd21", seed=seed, tokenizer_dir=sd / "tokenizer")
    narrow_posterior(parts.vae)
    save_sd_parts(parts, sd)
    log(f"SD 2.1-size random weights: {sd} ({time.perf_counter() - t:.0f} s)")
    pw = pisa.random_weights(parts.unet, seed=seed + 1, std=LORA_STD["pisa"])
    pw.to_official(work / "pisa_sr.pkl")
    sw = s3diff.random_weights(parts.unet, parts.vae, seed=seed + 2, std=LORA_STD["s3diff"])
    sw.to_official(work / "s3diff.pkl")
    torch.save(sw.de_net, work / "de_net.pth")
    src = Image.open(HERE.parent / "tests" / "data" / "baboon.png").convert("RGB")
    for side in sorted({c.side for c in CASES.values() if c.method != "vae"}):
        (work / f"in{side}").mkdir(exist_ok=True)
        src.resize((side, side), Image.LANCZOS).save(work / f"in{side}" / "baboon.png")
    for side in sorted({c.side for c in CASES.values() if c.method == "vae"}):
        z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(seed)) * 0.8
        torch.save(z, work / f"latent{side}.pt")
    info = {"version": PREPARED_VERSION, "seed": seed, "lora_std": LORA_STD}
    manifest.write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------------------
# The authors' checkouts: pinned, never edited
def tree_digest(root: Path) -> str:
    """sha256 over every file's path and bytes under root (.git excluded)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if ".git" in p.relative_to(root).parts or not p.is_file():
            continue
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def check_checkout(repo: Path, commit: str) -> str:
    """'' when repo is a clean git checkout of commit, else a one-line warning."""
    if not (repo / ".git").exists():
        return f"{repo}: not a git checkout, its commit cannot be checked (pinned: {commit[:12]})"
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if head != commit:
        return f"{repo}: at {head[:12]}, not the pinned {commit[:12]}"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return f"{repo}: tracked files are modified" if dirty else ""


# ------------------------------------------------------------------------------------------------
# One run
def official_command(case: Case, work: Path, repo: Path, out: Path, times: Path, python: str) -> list[str]:
    base = [python, str(SHIM), case.method, str(repo), str(times), "--"]
    if case.method == "pisa":
        args = ["--input_image", str(work / f"in{case.side}"), "--output_dir", str(out),
                "--pretrained_model_path", str(work / "sd21"), "--pretrained_path", str(work / "pisa_sr.pkl"),
                "--process_size", "512", "--upscale", "4", "--mixed_precision", "fp32"]  # fmt: skip
        if case.lambdas is None:
            args.append("--default")
        else:
            args += ["--lambda_pix", str(case.lambdas[0]), "--lambda_sem", str(case.lambdas[1])]
        return base + args
    if case.method == "s3diff":
        cfg = out / "sr_test.yaml"  # their config's one field to set: the input folder
        out.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"sf: 4\nvalidation:\n  lr_path: ['{work / f'in{case.side}'}']\n  image_type: png\n"
                       "  io_backend:\n    type: disk\n")  # fmt: skip
        return base + ["--base_config", str(cfg), "--sd_path", str(work / "sd21"),
                       "--pretrained_path", str(work / "s3diff.pkl"), "--de_net_path", str(work / "de_net.pth"),
                       "--output_dir", str(out), "--mixed_precision", "no", "--report_to", "tensorboard"]  # fmt: skip
    return base + [str(work / "sd21"), str(work / f"latent{case.side}.pt"), str(out / "decoded.png"), "224"]


def diffsr_command(case: Case, work: Path, out: Path, times: Path, device: str) -> list[str]:
    base = [sys.executable, str(Path(__file__).resolve()), "--worker", str(times), "--"]
    if case.method == "vae":
        return base + [
            "vae",
            str(work / "sd21"),
            str(work / f"latent{case.side}.pt"),
            str(out / "decoded.png"),
            device,
        ]
    args = ["upscale", str(work / f"in{case.side}"), "-o", str(out), "--method", case.method, "-q",
            "--base", str(work / "sd21"), "--weights", str(work / f"{'pisa_sr' if case.method == 'pisa' else 's3diff'}.pkl"),
            "--device", device]  # fmt: skip
    if case.method == "s3diff":
        args += ["--de-net", str(work / "de_net.pth")]
    if case.lambdas is not None:
        args += ["--lambda-pix", str(case.lambdas[0]), "--lambda-sem", str(case.lambdas[1])]
    return base + args


@dataclass
class Run:
    case: str
    tool: str  # authors | diffsr
    round: int
    wall_s: float
    inference_s: float | None
    peak_bytes: int | None
    peak_kind: str
    returncode: int
    out: str
    log: str = field(repr=False, default="")


def run_once(cmd: list[str], times: Path, env: dict | None = None) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, return code, output tail) of cmd in a fresh process."""
    times.unlink(missing_ok=True)
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode, out[-4000:]


def to_run(
    case: str, tool: str, rnd: int, wall: float, rss: int, rc: int, log: str, times: Path, out: Path
) -> Run:
    marks = json.loads(times.read_text()) if times.exists() else {}
    inf = marks["end"] - marks["first_call"] if marks.get("end") and marks.get("first_call") else None
    gpu = marks.get("cuda_peak")
    return Run(case, tool, rnd, wall, inf, gpu if gpu else rss, "gpu" if gpu else "rss", rc, str(out), log)


# ------------------------------------------------------------------------------------------------
# Arithmetic of the report
def median(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def summarize(runs: list[Run]) -> list[dict]:
    """Per case: medians over the successful runs of each tool and the ratios diffsr / authors."""
    rows = []
    for case in dict.fromkeys(r.case for r in runs):
        row: dict = {"case": case}
        for tool in ("authors", "diffsr"):
            ok = [r for r in runs if r.case == case and r.tool == tool and r.returncode == 0]
            row[tool] = {
                "runs": len(ok),
                "wall_s": median([r.wall_s for r in ok]),
                "inference_s": median([r.inference_s for r in ok]),
                "peak_bytes": median([r.peak_bytes for r in ok]),
                "peak_kind": ok[0].peak_kind if ok else None,
            }
        for key in ("wall_s", "inference_s", "peak_bytes"):
            row[f"ratio_{key}"] = ratio(row["diffsr"][key], row["authors"][key])
        rows.append(row)
    return rows


def max_diff(a: Path, b: Path) -> tuple[int, float] | None:
    """(max, mean) absolute 8-bit difference of two images; None if either is missing or sizes differ."""
    import numpy as np
    from PIL import Image

    if not (a.exists() and b.exists()):
        return None
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return None
    d = np.abs(x - y)
    return int(d.max()), float(d.mean())


def format_table(rows: list[dict]) -> str:
    def f(v, unit=""):
        if v is None:
            return "–"
        return f"{v / 2**30:.2f} GiB" if unit == "GiB" else f"{v:.1f} s" if unit == "s" else f"{v:.2f}×"

    lines = ["| case | authors: wall / inference / peak | diffsr: wall / inference / peak | ratio inference, peak | max / mean 8-bit diff |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        a, d = r["authors"], r["diffsr"]
        diff = r.get("diff")
        lines.append(
            f"| {r['case']} | {f(a['wall_s'], 's')} / {f(a['inference_s'], 's')} / {f(a['peak_bytes'], 'GiB')}"
            f" | {f(d['wall_s'], 's')} / {f(d['inference_s'], 's')} / {f(d['peak_bytes'], 'GiB')}"
            f" | {f(r['ratio_inference_s'])}, {f(r['ratio_peak_bytes'])}"
            f" | {'–' if not diff else f'{diff[0]} / {diff[1]:.2f}'} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# diffsr's side, run in a fresh process like the authors'
def worker(times: Path, argv: list[str]) -> int:
    """Run `diffsr <argv>` (or the VAE decoder alone) and record when inference starts and ends."""
    marks = {"start": time.time(), "first_call": None, "end": None, "cuda_peak": None}
    if argv[0] == "vae":
        rc = _vae_worker(marks, *argv[1:])
    else:
        from diffsr import api, cli

        for name in ("process", "process_batch"):
            inner = getattr(api.Upscaler, name)

            def wrapper(*a, _inner=inner, **k):
                marks["first_call"] = marks["first_call"] or time.time()
                return _inner(*a, **k)

            setattr(api.Upscaler, name, wrapper)
        rc = cli.main(argv)
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        marks["cuda_peak"] = torch.cuda.max_memory_allocated()
    marks["end"] = time.time()
    times.write_text(json.dumps(marks))
    return rc


def _vae_worker(marks: dict, sd: str, latent: str, out: str, device: str) -> int:
    """The VAE decoder alone, loaded and tiled as diffsr's pipelines do (defaults)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from diffsr.devices import resolve_device
    from diffsr.latents import vae_decode
    from diffsr.sd import own_aligned

    dev = resolve_device(device)
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").to(dev).eval().requires_grad_(False)
    own_aligned(vae, sorted((Path(sd) / "vae").glob("*.safetensors")))
    z = torch.load(latent).to(dev)
    with torch.no_grad():
        marks["first_call"] = time.time()
        x = vae_decode(vae, z)
    img = ((x[0].float().cpu().permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    Image.fromarray(img.astype(np.uint8)).save(out)  # the same quantization as official_shim.py
    return 0


# ------------------------------------------------------------------------------------------------
def parse_pythons(items: list[str]) -> dict[str, str]:
    """['pisa=PY', 's3diff=PY'] or ['PY'] (both) → {'pisa': PY, 's3diff': PY} ('vae' uses pisa's)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, path = item.partition("=")
        if sep and key in ("pisa", "s3diff"):
            out[key] = path
        else:
            out.setdefault("pisa", item)
            out.setdefault("s3diff", item)
    out.setdefault("vae", out.get("pisa", ""))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(Path(argv[1]), argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-root", type=Path, help="folder holding PiSA-SR/ and S3Diff/ checkouts")
    p.add_argument("--official-python", action="append", default=[], metavar="[pisa=|s3diff=]PYTHON",
                   help="the authors' venv's python (per method, or one for both)")  # fmt: skip
    p.add_argument("--work", type=Path, default=HERE.parent / ".artifacts" / "compare")
    p.add_argument("--cases", nargs="+", default=["pisa-default-128", "pisa-adjustable-128", "s3diff-128"],
                   choices=list(CASES), help="default: the three 128->512 cases (add the 512->2048 ones on a GPU)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--device", default="cpu", help="diffsr's --device (the authors' code uses CUDA when present)"
    )
    p.add_argument("--json", type=Path, help="write every run and the summary here")
    p.add_argument("--diffsr-only", action="store_true", help="skip the authors' runs (no checkouts needed)")
    args = p.parse_args(argv)

    pythons = parse_pythons(args.official_python)
    cases = [CASES[c] for c in args.cases]
    if not args.diffsr_only:
        if args.official_root is None:
            p.error("--official-root is required (or --diffsr-only)")
        for case in cases:
            if not pythons.get(case.method):
                p.error(f"--official-python for {case.method} is missing")
            repo = args.official_root / case.repo
            if not repo.is_dir():
                p.error(f"{repo}: no checkout (docs/compare_official.md says how to fetch it)")
            warning = check_checkout(repo, PINS[case.repo][1])
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
    prepare(args.work)
    digests = {c.repo: tree_digest(args.official_root / c.repo) for c in cases if not args.diffsr_only}
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs: list[Run] = []
    for rnd in range(1, args.rounds + 1):
        for case in cases:
            tools = ["authors", "diffsr"] if rnd % 2 else ["diffsr", "authors"]
            for tool in tools:
                if tool == "authors" and args.diffsr_only:
                    continue
                out = args.work / "out" / case.name / tool / f"r{rnd}"
                shutil.rmtree(out, ignore_errors=True)  # every run writes its outputs anew
                out.mkdir(parents=True)
                times = out / "times.json"
                if tool == "authors":
                    repo = args.official_root / case.repo
                    cmd = official_command(case, args.work, repo, out, times, pythons[case.method])
                else:
                    cmd = diffsr_command(case, args.work, out, times, args.device)
                wall, rss, rc, log = run_once(cmd, times, env)
                run = to_run(case.name, tool, rnd, wall, rss, rc, log, times, out)
                runs.append(run)
                inf = f"{run.inference_s:.1f}" if run.inference_s is not None else "–"
                print(f"round {rnd} {case.name} {tool}: wall {wall:.1f} s, inference {inf} s, "
                      f"peak {run.peak_bytes / 2**30:.2f} GiB ({run.peak_kind}), exit {rc}", flush=True)  # fmt: skip
                if rc != 0:
                    print(log, file=sys.stderr)
                if tool == "authors" and tree_digest(repo) != digests[case.repo]:
                    print(f"error: {repo} changed during the run", file=sys.stderr)
                    return 1
    rows = summarize(runs)
    for row in rows:
        last = {r.tool: Path(r.out) for r in runs if r.case == row["case"] and r.returncode == 0}
        if "authors" in last and "diffsr" in last:
            row["diff"] = max_diff(*(next(iter(sorted(last[t].glob("*.png")))) if list(last[t].glob("*.png")) else last[t] / "none"
                                     for t in ("authors", "diffsr")))  # fmt: skip
    env_line = _environment(args.device)
    print(f"\n{env_line}\n\n{format_table(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env_line, "rows": rows,
                                         "runs": [r.__dict__ for r in runs]}, indent=2))  # fmt: skip
    return 0 if all(r.returncode == 0 for r in runs) else 1


def _environment(device: str) -> str:
    import platform

    import torch

    from diffsr.bench import _commit

    dev = (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda") and torch.cuda.is_available()
        else platform.processor() or "cpu"
    )
    return f"diffsr {_commit()}, {dev}, {os.cpu_count()} CPUs, torch {torch.__version__} (diffsr side), fp32"


if __name__ == "__main__":
    sys.exit(main())
