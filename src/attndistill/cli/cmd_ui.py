"""``attndistill ui``: the web UI (Gradio), bound to localhost unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from . import app, common
from .common import AllowPickle, ConfigDir, Device, Dtype, Model, Vae, run_command

UI_EXAMPLE = "Example: attndistill ui --model stable-diffusion-v1-5/stable-diffusion-v1-5 --port 7860"


@app.command("ui", epilog=UI_EXAMPLE)
def ui(
    model: Model = None, vae: Vae = None, device: Device = "auto", dtype: Dtype = "auto",
    config: ConfigDir = None, allow_pickle: AllowPickle = False,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens the UI to your network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on")] = 7860,
    share: Annotated[bool, typer.Option(help="Also publish a temporary public gradio.live link")] = False,
    outputs: Annotated[Path | None, typer.Option(
        help="Folder for the result PNGs (and the uploads they were made from) \\[default: ./attndistill-outputs]",
        show_default=False)] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Refuse uploads larger than this many megabytes")] = 20,
) -> None:
    """Serve every task in the browser: live previews, cancel, results with their parameters, one job at a time.

    With --model the model is loaded before the server starts; otherwise the first run loads it. --config and
    --allow-pickle apply to every single-file checkpoint entered in the page's Model box.
    """

    def body() -> None:
        if port < 1 or port > 65535:
            raise UserError(f"port {port} is not a TCP port; use 1-65535")
        if not 0 < max_upload_mb < 2**40:  # NaN and inf too, which gradio's byte count cannot take
            raise UserError(f"--max-upload-mb must be a positive number of megabytes (got {max_upload_mb})")
        from ..model.models import resolve_device, resolve_dtype

        resolve_dtype(dtype, resolve_device(device))  # said now, not at the first run of the page
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        try:
            from ..webui.app import WebUI
        except ImportError as exc:
            raise UserError(f"the web UI needs Gradio ({exc}); pip install 'attndistill[ui]', or "
                            "pip install -e '.[ui]' in a source tree") from None
        webui = WebUI(model=model, vae=None if vae is None else str(vae), device=device, dtype=dtype,
                      outputs=outputs, perf=common.PERF, config=None if config is None else str(config),
                      allow_pickle=allow_pickle)
        if model is not None:
            typer.echo(f"loading {model} ...", err=True)
            webui.slot.get(model, None if vae is None else str(vae))
        try:
            webui.launch(host=host, port=port, share=share, max_upload_mb=max_upload_mb)
        except OSError:
            raise UserError(f"cannot serve on {host}:{port}: the port is taken or the address is not this "
                            "machine's; pass another --port or --host") from None

    run_command(body, say_once=False)
