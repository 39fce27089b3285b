"""Execute the notebooks, in quick mode for CI or in full to refresh their committed outputs.

    python tools/run_notebooks.py --quick            # CI: every notebook, small data, few steps
    python tools/run_notebooks.py notebooks/01_autoencoder.ipynb --write   # full run, save outputs

Quick mode sets SDJAX_QUICK=1, which each notebook reads in its first cell. Every run is offline
(SDJAX_OFFLINE=1) unless --online is given, so CI never waits on the network. Prints a table of
notebook, mode, wall time and result; exits non-zero if any notebook fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


def _final_text(text: str) -> str:
    """What a terminal would show: each line keeps only what follows its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def collapse_streams(nb) -> None:
    """Merge consecutive stdout/stderr outputs of a cell and resolve progress-bar redraws (tqdm's
    '\r' updates), so a saved notebook holds what the reader saw, not hundreds of fragments."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.get("outputs", []):
            if (
                out.output_type == "stream"
                and merged
                and merged[-1].output_type == "stream"
                and merged[-1].name == out.name
            ):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = _final_text(out.text)
        cell["outputs"] = merged


def run(path: Path, *, quick: bool, write: bool, online: bool, timeout: int) -> tuple[float, str]:
    nb = nbformat.read(path, as_version=4)
    os.environ["SDJAX_QUICK"] = "1" if quick else "0"
    # Saved outputs must read without a kernel (GitHub, nbviewer): sliders become their figure. Quick runs build the
    # widgets, so CI exercises them.
    os.environ["SDJAX_STATIC"] = "1" if write else "0"
    if not online:
        os.environ["SDJAX_OFFLINE"] = "1"
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
        status = "ok"
    except CellExecutionError as e:
        status = "FAILED"
        print(f"--- {path.name} failed ---\n{e}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    if write and status == "ok":
        collapse_streams(nb)
        nbformat.write(nb, path)
    return elapsed, status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--quick", action="store_true", help="small data and few steps (SDJAX_QUICK=1)")
    parser.add_argument("--write", action="store_true", help="save the executed notebook in place")
    parser.add_argument("--online", action="store_true", help="let notebooks use the Hugging Face Hub")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    rows = []
    for nb in notebooks:
        print(f"running {nb.name} ({'quick' if args.quick else 'full'}) ...", flush=True)
        rows.append((nb.name, *run(nb, quick=args.quick, write=args.write, online=args.online, timeout=args.timeout)))
    print("\n| notebook | mode | wall time | result |\n|---|---|---|---|")
    for name, secs, status in rows:
        print(f"| {name} | {'quick' if args.quick else 'full'} | {secs:.0f} s | {status} |")
    return 0 if all(status == "ok" for *_, status in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
