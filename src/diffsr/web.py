"""The local web page (`diffsr web`): a gradio layer over `diffsr.studio`.

Bound to 127.0.0.1 by default, no share link, analytics off, system fonts only: the page makes no
request beyond the machine it is served from. Jobs run one at a time (a queue of one per device).
gradio is optional (`pip install diffsr[web]`) and imported only here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffSRError
from .io import ImageData, read_image
from .studio import (
    GRID_VALUES,
    ModelPool,
    PisaSession,
    Result,
    cli_command,
    run_patchscaler,
    run_s3diff,
    save_result,
)

TITLES = {"pisa": "PiSA-SR", "s3diff": "S3Diff", "patchscaler": "PatchScaler"}


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check
    try:
        import gradio as gr
    except ImportError:
        raise DiffSRError("the web page needs gradio: pip install 'diffsr[web]'") from None
    return gr


def preview(image: ImageData) -> np.ndarray:
    """An 8-bit RGB(A) array for display (the download keeps full precision)."""
    px = image.pixels if image.pixels.shape[-1] == 3 else np.repeat(image.pixels, 3, -1)
    if image.alpha is not None:
        px = np.concatenate([px, image.alpha[..., None]], -1)
    return (np.clip(px, 0, 1) * 255 + 0.5).astype(np.uint8)


def before(image: ImageData, size: tuple[int, int]) -> np.ndarray:
    """The input enlarged (bicubic) to the output's size, for the before/after slider."""
    from PIL import Image

    return np.asarray(Image.fromarray(preview(image)).resize(size[::-1], Image.Resampling.BICUBIC))


class _Progress:
    """diffsr progress events → a gradio progress bar."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, ev: dict) -> None:
        done, total = ev.get("done", ev.get("done_calls")), ev.get("total", ev.get("total_calls"))
        if done is not None and total:
            self.bar((done, total), desc=str(ev.get("stage", ev.get("group", "working"))), unit="steps")


def build(pool: ModelPool, *, workdir: str | None = None):
    """The gradio Blocks for the methods of `pool`."""
    gr = _gradio()
    out_dir = Path(workdir or tempfile.mkdtemp(prefix="diffsr-web-"))

    def guard(fn: Callable) -> Callable:
        """One-line errors in the page (never a black image)."""

        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except (
                DiffSRError,
                OSError,
                ValueError,
                RuntimeError,
            ) as e:  # e.g. out of memory: its first line
                raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

        wrapped.__name__ = fn.__name__
        return wrapped

    def finish(result: Result, image: ImageData, path: str):
        stem = Path(path).stem
        command = cli_command(result, Path(path).name, pool.load_args.get(result.settings["method"]))
        saved = save_result(result, out_dir, stem, command)
        pair = (before(image, result.image.pixels.shape[:2]), preview(result.image))
        return pair, str(saved), command

    with gr.Blocks(title="diffsr", analytics_enabled=False) as demo:
        gr.Markdown("## diffsr — real-world super-resolution with diffusion priors (×4)")
        with gr.Tabs():
            if "pisa" in pool.methods:
                with gr.Tab("PiSA-SR", id="pisa"):
                    _pisa_tab(gr, pool, guard, finish)
            if "s3diff" in pool.methods:
                with gr.Tab("S3Diff", id="s3diff"):
                    _s3diff_tab(gr, pool, guard, finish)
            if "patchscaler" in pool.methods:
                with gr.Tab("PatchScaler", id="patchscaler"):
                    _patchscaler_tab(gr, pool, guard, finish)
    demo.queue(default_concurrency_limit=1)  # one job at a time on the device
    return demo


def _input(gr, elem_id: str):
    # filepath + image_mode None: gradio hands over the uploaded file untouched, so diffsr's own reader
    # sees its 16 bits, alpha and EXIF orientation
    return gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Input",
                    elem_id=elem_id, height=320)  # fmt: skip


def _outputs(gr, prefix: str):
    slider = gr.ImageSlider(label="Before / after (bicubic input vs result)", format="png",
                            buttons=["fullscreen", "download"], elem_id=f"{prefix}-slider", max_height=640)  # fmt: skip
    with gr.Row():
        download = gr.File(
            label="Lossless PNG (settings in the name and in PNG text)", elem_id=f"{prefix}-download"
        )
        command = gr.Textbox(label="CLI command that reproduces this result", buttons=["copy"],
                             elem_id=f"{prefix}-command", lines=2)  # fmt: skip
    return slider, download, command


def _pisa_tab(gr, pool: ModelPool, guard, finish) -> None:
    gr.Markdown(
        "Upload once: the UNet runs **once**. Moving λ re-renders with the latent update and the VAE decoder "
        "only (paper Eq. 8); renders are cached, so returning to an earlier λ is instant."
    )
    with gr.Row():
        inp = _input(gr, "pisa-input")
        with gr.Column():
            lp = gr.Slider(0, 2, value=1.0, step=0.05, label="λ_pix (pixel fidelity)", elem_id="pisa-lp")
            ls = gr.Slider(0, 2, value=1.0, step=0.05, label="λ_sem (semantic detail)", elem_id="pisa-ls")
            color = gr.Radio(
                ["adain", "wavelet", "none"], value="adain", label="Colour fix", elem_id="pisa-color"
            )
            status = gr.Markdown(elem_id="pisa-status")
    slider, download, command = _outputs(gr, "pisa")
    with gr.Accordion("λ grid (from the stored UNet outputs)", open=False):
        grid_btn = gr.Button("Build the 3×3 grid", elem_id="pisa-grid-btn")
        gallery = gr.Gallery(columns=3, label="rows λ_pix, columns λ_sem", elem_id="pisa-grid", format="png")
    with gr.Accordion("A/B: compare any two results", open=False):
        with gr.Row():
            a = gr.Dropdown(label="A", choices=[], elem_id="pisa-a")
            b = gr.Dropdown(label="B", choices=[], elem_id="pisa-b")
        ab = gr.ImageSlider(label="A / B", format="png", elem_id="pisa-ab")
    state = gr.State()

    def describe(session: PisaSession) -> str:
        return (f"UNet runs for this image: **1** (at upload) · renders: {session.renders} · "
                f"cached: {len(session.cache)}")  # fmt: skip

    def render(session: PisaSession, path: str, lam_p: float, lam_s: float, cf: str):
        if session is None:
            raise gr.Error("upload an image first")
        result = session.render(lam_p, lam_s, color_fix=cf)
        pair, saved, cmd = finish(result, session.image, path)
        labels = [r.label for r in session.cache.values()]
        return pair, saved, cmd, describe(session), gr.update(choices=labels), gr.update(choices=labels)

    @guard
    def on_upload(path, lam_p, lam_s, cf, progress=gr.Progress()):  # noqa: B008 - gradio injects the tracker
        if not path:
            return (None,) * 7
        up = pool.get("pisa")
        image = read_image(path)
        session = PisaSession(up, image, progress=_Progress(progress))
        return session, *render(session, path, lam_p, lam_s, cf)

    @guard
    def on_lambda(session, path, lam_p, lam_s, cf):
        return render(session, path, lam_p, lam_s, cf)

    @guard
    def on_grid(session, cf):
        if session is None:
            raise gr.Error("upload an image first")
        results = session.grid(GRID_VALUES, color_fix=cf)
        labels = [r.label for r in session.cache.values()]
        return ([(preview(r.image), f"λ_pix {r.settings['lambda_pix']:g}, λ_sem {r.settings['lambda_sem']:g}")
                 for r in results], describe(session), gr.update(choices=labels), gr.update(choices=labels))  # fmt: skip

    @guard
    def on_ab(session, la, lb):
        if session is None or not la or not lb:
            return None
        by_label = {r.label: r for r in session.cache.values()}
        if la not in by_label or lb not in by_label:
            raise gr.Error("that result is no longer cached; render it again")
        return preview(by_label[la].image), preview(by_label[lb].image)

    outs = [slider, download, command, status, a, b]
    inp.change(on_upload, [inp, lp, ls, color], [state, *outs])
    for control in (lp, ls, color):
        control.change(on_lambda, [state, inp, lp, ls, color], outs, trigger_mode="always_last")
    grid_btn.click(on_grid, [state, color], [gallery, status, a, b])
    a.change(on_ab, [state, a, b], ab)
    b.change(on_ab, [state, a, b], ab)


def _s3diff_tab(gr, pool: ModelPool, guard, finish) -> None:
    gr.Markdown(
        "The degradation estimator scores blur and noise in [0, 1]; override either to steer the LoRA."
    )
    with gr.Row():
        inp = _input(gr, "s3diff-input")
        with gr.Column():
            estimated = gr.Markdown("Estimated blur / noise: (upload an image)", elem_id="s3diff-estimated")
            override = gr.Checkbox(label="Override the estimate", value=False, elem_id="s3diff-override")
            blur = gr.Slider(0, 1, value=0.5, step=0.01, label="blur", elem_id="s3diff-blur")
            noise = gr.Slider(0, 1, value=0.5, step=0.01, label="noise", elem_id="s3diff-noise")
            guidance = gr.Slider(0, 3, value=1.07, step=0.01, label="guidance scale (authors' code: 1.07)",
                                 elem_id="s3diff-guidance")  # fmt: skip
            run = gr.Button("Upscale", variant="primary", elem_id="s3diff-run")
    slider, download, command = _outputs(gr, "s3diff")

    @guard
    def on_run(path, use_override, b, n, g, progress=gr.Progress()):  # noqa: B008 - gradio injects the tracker
        if not path:
            raise gr.Error("upload an image first")
        image = read_image(path)
        up = pool.get("s3diff")
        kw: dict[str, Any] = {"guidance_scale": float(g)}
        if use_override:
            kw.update(blur=float(b), noise=float(n))
        result = run_s3diff(up, image, **kw, progress=_Progress(progress))
        est = result.info["estimated"]
        text = f"Estimated blur **{est['blur']:.3f}**, noise **{est['noise']:.3f}**"
        if use_override:
            text += f" · used blur {b:.2f}, noise {n:.2f}"
        return *finish(result, image, path), text

    run.click(on_run, [inp, override, blur, noise, guidance], [slider, download, command, estimated])


def _patchscaler_tab(gr, pool: ModelPool, guard, finish) -> None:
    gr.Markdown("Windows are grouped by the confidence map: simple (green) windows start late and take few "
                "steps, hard (red) ones take the full 20.")  # fmt: skip
    with gr.Row():
        inp = _input(gr, "ps-input")
        with gr.Column():
            unified = gr.Checkbox(label="Unified sampling (every window 20 steps, the baseline)", value=False)
            seed = gr.Number(value=0, precision=0, label="seed (the noise map)")
            run = gr.Button("Upscale", variant="primary", elem_id="ps-run")
            stats = gr.Markdown(elem_id="ps-stats")
    group_map = gr.Image(label="Groups: simple / medium / hard", format="png", elem_id="ps-map")
    slider, download, command = _outputs(gr, "ps")

    @guard
    def on_run(path, uni, sd, progress=gr.Progress()):  # noqa: B008 - gradio injects the tracker
        if not path:
            raise gr.Error("upload an image first")
        image = read_image(path)
        up = pool.get("patchscaler")
        result, picture = run_patchscaler(up, image, unified=bool(uni) or None, seed=int(sd),
                                          progress=_Progress(progress))  # fmt: skip
        info = result.info
        groups = info.get("groups", {})
        text = (f"windows: {info.get('patches')} ({', '.join(f'{k} {v}' for k, v in groups.items())}) · "
                f"patch evaluations {info.get('patch_evaluations')} vs {info.get('unified_patch_evaluations')} "
                f"unified · theoretical speed-up **{info.get('speedup', 1):.2f}×**")  # fmt: skip
        return *finish(result, image, path), preview(picture), text

    run.click(on_run, [inp, unified, seed], [slider, download, command, group_map, stats])


def serve(pool: ModelPool, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Build and launch the page. Returns the gradio Blocks (running in the background if not block)."""
    gr = _gradio()
    demo = build(pool)
    # system fonts: gradio's default theme would fetch web fonts from elsewhere
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block, ssr_mode=False, pwa=False, mcp_server=False,
                quiet=not block, theme=theme, footer_links=[])  # fmt: skip
    return demo
