"""Where one ``attndistill style`` command spends its wall time: imports, the model's load, graph capture, steps.

Run 15 timed 8 such commands on an H200 at 21.5 s each for 50 steps that take about 1.3 s in a warmed-up
process: a user who runs one command waits mostly for what is outside the steps. This script runs one
command under Python's profiler (after an untimed one that reads the model files into the page cache) and
prints its wall time and the functions with the largest cumulative time, one JSON line each, to find what
to cut. The profiler slows Python-heavy work somewhat; time the GPU waits for is counted where the host waits.

    python benchmarks/command_profile.py --steps 50 --work /tmp/gcli   # reuses batch_vs_commands.py's model
    python benchmarks/command_profile.py --tiny --device cpu --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_vs_commands import CONTENT, ROOT, STYLE, _has_cuda, save_model, timed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="the tiny test model (CPU smoke runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=None, help="folder with (or for) the model; default: temporary")
    p.add_argument("--top", type=int, default=45, help="functions to list, by cumulative time")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="command-profile-"))
    folder = work / "model"
    if not (folder / "model_index.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        save_model(folder, tiny=args.tiny, device="cuda" if args.device in ("auto", "cuda") and _has_cuda() else "cpu")
    # the package from src/, beside what PYTHONPATH holds already (the GPU machine's wheels)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    command = ["style", str(CONTENT), str(STYLE), "--steps", str(args.steps), "-m", str(folder),
               "--device", args.device, "-q", "--overwrite"]
    timed([sys.executable, "-m", "attndistill", *command, "-o", str(work / "profile-warm.png")], env)
    profile = work / "command.prof"
    start = time.perf_counter()
    timed([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "attndistill", *command,
           "-o", str(work / "profile.png")], env)
    print(json.dumps({"what": "command under the profiler", "seconds": round(time.perf_counter() - start, 2),
                      "steps": args.steps, "model": "tiny" if args.tiny else "sd15 full size, bf16 on disk"}))
    stats = pstats.Stats(str(profile))
    imports = max((v[3] for (file, _, name), v in stats.stats.items() if name == "_find_and_load"), default=0.0)
    print(json.dumps({"what": "imports (all modules, nested ones included once)", "seconds": round(imports, 2)}))
    # this package's functions by cumulative time: the command's phases (load, capture, steps, decode, save)
    rows = sorted(((key, value) for key, value in stats.stats.items() if "attndistill" in key[0]),
                  key=lambda item: item[1][3], reverse=True)
    for (file, line, name), (_, calls, _, cumulative, _) in rows[:args.top]:
        where = Path(file).as_posix().split("attndistill/", 1)[-1]
        print(json.dumps({"function": f"{where}:{line}({name})", "calls": calls, "cumulative_s": round(cumulative, 3)}))


if __name__ == "__main__":
    main()
